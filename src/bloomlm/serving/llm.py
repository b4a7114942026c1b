"""`LLM`: the engine for offline batch jobs, without HTTP (vLLM's `LLM.generate` shape).

    from bloomlm.serving import LLM, SamplingParams
    llm = LLM("bloomlm-tiny")
    for out in llm.generate(["Once upon a time", "A list is"], SamplingParams(max_tokens=20)):
        print(out.outputs[0].text)

All prompts are queued at once; the engine runs as many at a time as its memory plan allows and
starts the next as soon as one finishes, so prompts of different lengths waste no padding and
a short continuation does not wait for the longest of its batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from bloomlm.serving.engine import Engine, RequestOutput
from bloomlm.serving.params import SamplingParams

_PromptLike = str | Sequence[int]


# generate() keywords the engine takes (the rest of a GenerationConfig must be at its default)
_ENGINE_KEYWORDS = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "no_repeat_ngram_size", "num_return_sequences", "num_beams",
    "suppress_tokens",
}  # fmt: skip
_TOKEN_IDS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"}


# Over 40 lines: one generate keyword after another, mapped or refused.
def params_from_generate(
    keywords: dict[str, Any], defaults: Any, seed: int | None, stop: Sequence[str]
) -> SamplingParams | None:
    """The SamplingParams doing what `model.generate(**keywords)` does with the model's
    generation config `defaults`, or None when only generate can (beam search, a setting the
    engine lacks, max_length instead of max_new_tokens)."""
    from bloomlm.generation import GenerationConfig

    if set(keywords) - _ENGINE_KEYWORDS:
        return None
    plain = GenerationConfig().to_dict()
    for name, value in defaults.to_dict().items():
        if name in _ENGINE_KEYWORDS or name in _TOKEN_IDS or name.startswith("_"):
            continue
        if name in plain and name != "max_length" and value != plain[name]:
            return None  # the folder sets something the engine does not do

    def setting(name: str) -> Any:
        return keywords[name] if name in keywords else getattr(defaults, name, None)

    eos = defaults.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    suppress = setting("suppress_tokens")
    if (setting("num_beams") or 1) > 1 or setting("max_new_tokens") is None:
        return None
    if suppress and sorted(suppress) != sorted(eos):
        return None
    sampling = bool(setting("do_sample"))
    return SamplingParams(
        n=setting("num_return_sequences") or 1,
        max_tokens=setting("max_new_tokens"),
        min_tokens=setting("min_new_tokens") or 0,
        temperature=float(setting("temperature") or 1.0) if sampling else 0.0,
        top_k=(setting("top_k") or 0) if sampling else 0,
        top_p=float(setting("top_p") or 1.0) if sampling else 1.0,
        repetition_penalty=float(setting("repetition_penalty") or 1.0),
        no_repeat_ngram_size=setting("no_repeat_ngram_size") or 0,
        stop=list(stop),
        seed=seed,
        ignore_eos=bool(suppress),
    )


class GenerationError(RuntimeError):
    """A request failed inside the engine (the message names the error)."""


class LLM:
    """A model, its tokenizer and an Engine. `model` is a folder or name (loaded in float32 on
    the CPU unless `from_pretrained` keywords say otherwise) or a loaded BloomForCausalLM (then
    pass `tokenizer`). Engine keywords: max_model_len, max_sequences, kv_cache_memory,
    prefill_chunk."""

    def __init__(
        self,
        model: Any = "bloomlm-tiny",
        tokenizer: Any = None,
        *,
        max_model_len: int | None = None,
        max_sequences: int | None = None,
        kv_cache_memory: int | None = None,
        prefill_chunk: int | None = None,
        **from_pretrained: Any,
    ):
        if isinstance(model, str):
            import bloomlm

            tokenizer = tokenizer or bloomlm.AutoTokenizer.from_pretrained(model)
            from_pretrained.setdefault("torch_dtype", "float32")
            model = bloomlm.BloomForCausalLM.from_pretrained(model, **from_pretrained)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer with a loaded model: LLM(model, tokenizer)")
        options: dict[str, Any] = {"prefill_chunk": prefill_chunk} if prefill_chunk else {}
        self.engine = Engine(model.eval(), tokenizer, max_model_len=max_model_len,
                             max_sequences=max_sequences, kv_cache_memory=kv_cache_memory,
                             **options)  # fmt: skip
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: _PromptLike | Sequence[_PromptLike],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in the prompts' order. A prompt is a string
        or a list of token ids; `params` one for all or one per prompt. GenerationError when a
        request failed."""
        results: dict[int, RequestOutput] = dict(self.iter_generate(prompts, params))
        return [results[i] for i in range(len(results))]

    def iter_generate(
        self,
        prompts: _PromptLike | Sequence[_PromptLike],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """(prompt index, finished RequestOutput) as each request finishes."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = params if params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        batch, index = [], {}
        for i, (prompt, param) in enumerate(zip(prompts, params)):
            if isinstance(prompt, str):
                text, ids = prompt, self.tokenizer(prompt)["input_ids"]
            else:
                text, ids = None, list(prompt)
            request_id = f"llm-{next(self._ids)}"
            index[request_id] = i
            batch.append((request_id, ids, param, text))
        self.engine.add_requests(batch)
        try:
            while index:
                for output in self.engine.step():
                    if output.finished and output.request_id in index:
                        if output.error:
                            raise GenerationError(f"prompt {index[output.request_id]}: "
                                                  f"{output.error}")  # fmt: skip
                        yield index.pop(output.request_id), output
        finally:  # an error or a caller that stopped iterating: nothing is left running
            for request_id in index:
                self.engine.abort(request_id)
            while self.engine.has_work():
                self.engine.step()


__all__ = ["LLM", "GenerationError", "params_from_generate"]

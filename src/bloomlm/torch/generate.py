"""Text generation for BLOOM causal LMs: greedy, sampling, beam search and beam sampling.

Token for token the same as transformers 4.37.2's `generate` (same logits filters in the same order,
same beam bookkeeping, same random draws for a given `torch.manual_seed`). The loops know the model
only through the engine's step protocol (`torch/engine.py`):

    decoder = model.make_decoder(rows, max_length, compile=...)
    out = decoder.prefill(prompt_ids, prompt_mask)   # out.logits [N, 1, V]: the last position only
    out = decoder.step(next_ids [N, 1])               # then one token per row per step
    decoder.reorder(beam_idx)                         # beams

bloomlm's BloomForCausalLM makes its own decoder (a preallocated KV cache, compiled step on
request); any other model with BLOOM's forward signature (transformers' in the parity tests) is
driven through `ForwardDecoder`. The ids and mask live in buffers preallocated to max_length
(a step writes one column); the filters see the view of the columns so far. Steps run under
`no_grad`, so what `generate` returns is an ordinary tensor, never a copy made to leave
`inference_mode`.

Notation: B prompts, N rows decoded together (B * num_beams, or B * num_return_sequences when
sampling), L tokens so far, V vocabulary. Every logits filter is a small pure function of
(input_ids [N, L], scores [N, V]) returning new scores; `build_logits_processors` and
`build_logits_warpers` chain them in transformers' order.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bloomlm.generation import GenerationConfig
from bloomlm.torch.decoding.beams import BeamHypotheses, BeamSearchScorer, beam_search
from bloomlm.torch.decoding.processors import (
    LogitsFn,
    apply_repetition_penalty,
    apply_sequence_bias,
    apply_temperature,
    bad_words_bias,
    ban_repeated_ngrams,
    ban_tokens,
    boost_eos_exponentially,
    build_logits_processors,
    build_logits_warpers,
    eos_list,
    epsilon_filter,
    eta_filter,
    force_tokens,
    log_normalize,
    remove_inf_nan,
    run_chain,
    top_k_filter,
    top_p_filter,
    typical_filter,
)
from bloomlm.torch.decoding.search import greedy_or_sample
from bloomlm.torch.decoding.state import (
    GenerateBeamDecoderOnlyOutput,
    GenerateDecoderOnlyOutput,
    Loop,
    LoopTokens,
    Recorder,
    Sequences,
    StoppingCriteria,
    as_generation_config,
    model_generation_config,
)
from bloomlm.torch.engine import decoder_source

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

# Settings of transformers' other decoding modes, with their "off" values.
_UNSUPPORTED_SETTINGS = {
    "num_beam_groups": 1,  # group (diverse) beam search
    "diversity_penalty": 0.0,
    "constraints": None,  # constrained beam search
    "force_words_ids": None,
    "forced_decoder_ids": None,
    "prompt_lookup_num_tokens": None,  # assisted decoding
    "encoder_repetition_penalty": 1.0,  # encoder-decoder only
    "encoder_no_repeat_ngram_size": 0,
}


def generate(
    model: Any,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: Sequence[LogitsFn] | None = None,
    stopping_criteria: Sequence[Callable] | None = None,
    prefix_allowed_tokens_fn: Callable | None = None,
    synced_gpus: bool | None = None,
    assistant_model: Any = None,
    streamer: Any = None,
    negative_prompt_ids: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    *,
    compile: bool | str | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    max_model_len: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
    """transformers 4.37's `generate` for a BLOOM causal LM: same arguments, same tokens.

    `inputs` (or `input_ids=`) is [B, L]; `attention_mask=` [B, L] marks left padding. Any
    GenerationConfig field may be passed as a keyword. `logits_processor` / `stopping_criteria` are
    lists of callables `(input_ids, scores)`, run after the built-in ones as in transformers.
    Returns the sequences [B * num_return_sequences, L'] or, with `return_dict_in_generate=True`,
    a `GenerateDecoderOnlyOutput` / `GenerateBeamDecoderOnlyOutput`.

    `model` is bloomlm's BloomForCausalLM, or any model with BLOOM's forward signature (driven
    through `ForwardDecoder`). bloomlm's own keywords: `compile` (True or a torch.compile mode:
    run the decode step compiled; default: the model's `from_pretrained(compile=...)`),
    `generator` (one torch.Generator per prompt, so each prompt's draws are its own and its text
    does not depend on the rest of the batch; default: the global generator, transformers'
    draws), `max_model_len` (the most tokens a row may reach, prompt included: a longer request
    is a ValueError before anything runs).
    """
    # Over 40 lines: transformers' signature and docstring; the body resolves, checks, dispatches.
    _reject_unsupported_arguments(
        prefix_allowed_tokens_fn, synced_gpus, assistant_model, negative_prompt_ids
    )
    del negative_prompt_attention_mask  # only meaningful with negative_prompt_ids, rejected above
    source = decoder_source(model)
    user_max_length = kwargs.get("max_length")
    config, model_kwargs = _resolve_config(source, generation_config, kwargs)
    input_ids, attention_mask = _prepare_inputs(source, inputs, model_kwargs, config)
    _finish_lengths(config, input_ids.shape[-1], user_max_length)
    _check_usable_length(config, input_ids.shape[-1], max_model_len)
    _check_streamer(streamer, config, input_ids.shape[0])
    loop = _make_loop(source, config, input_ids, attention_mask, logits_processor,
                      stopping_criteria, generator, compile)  # fmt: skip
    with torch.no_grad():  # not inference_mode: what is returned is an ordinary tensor
        if streamer is not None:
            streamer.put(input_ids.cpu())
        try:
            if config.num_beams > 1:
                return beam_search(loop, input_ids.shape[0])
            return greedy_or_sample(loop, streamer)
        finally:
            if streamer is not None:  # also on error, so a consumer thread is never left waiting
                streamer.end()


def _make_loop(
    source: Any,
    config: GenerationConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_processor: Sequence[LogitsFn] | None,
    stopping_criteria: Sequence[Callable] | None,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    compile: bool | str | None,
) -> Loop:
    """Expand the prompts to their rows (beams, or returned sequences) and set up the loop."""
    batch_size, prompt_len = input_ids.shape
    expand = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    generators = _row_generators(generator, batch_size, expand)
    tokens = LoopTokens.resolve(source, config)
    processors = build_logits_processors(config, prompt_len, logits_processor or ())
    warpers = build_logits_warpers(config) if config.do_sample else []
    stop = StoppingCriteria(config, stopping_criteria or ())
    rows_ids, rows_mask = (t.repeat_interleave(expand, dim=0) for t in (input_ids, attention_mask))
    seqs = Sequences(rows_ids, rows_mask, config.max_length)
    decoder = source.make_decoder(batch_size * expand, config.max_length, compile=compile)
    record = Recorder(config)
    return Loop(config, decoder, seqs, tokens, processors, warpers, stop, record, generators)


def _row_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None, batch_size: int, expand: int
) -> list[torch.Generator] | None:
    """One generator per row: prompt b's for each of its `expand` rows."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        generators = [generator] * batch_size
    else:
        generators = list(generator)
    if len(generators) != batch_size or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            f"`generator` must be a torch.Generator or a list of one per prompt ({batch_size}), "
            f"got {generator!r}"
        )
    return [g for g in generators for _ in range(expand)]


def _reject_unsupported_arguments(
    prefix_fn: Any, synced_gpus: Any, assistant: Any, negative_ids: Any
) -> None:
    for name, value in (
        ("prefix_allowed_tokens_fn", prefix_fn),
        ("assistant_model", assistant),
        ("negative_prompt_ids", negative_ids),
    ):
        if value is not None:
            raise ValueError(f"`{name}` is not supported by bloomlm's generate; leave it None")
    if synced_gpus:
        raise ValueError(
            "`synced_gpus=True` is not supported by bloomlm's generate (single process only)"
        )


def _resolve_config(
    model: Any, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> tuple[GenerationConfig, dict[str, Any]]:
    """Copy the given (or the model's) config, apply the keyword overrides, validate; return leftovers."""
    if generation_config is None:
        generation_config = model_generation_config(model)
    config = copy.deepcopy(as_generation_config(generation_config))
    model_kwargs = config.update(**kwargs)
    config.validate()
    for name, off in _UNSUPPORTED_SETTINGS.items():
        if getattr(config, name) != off:
            raise ValueError(
                f"`{name}`={getattr(config, name)!r} is not supported by bloomlm's generate; use {off!r}"
            )
    if config.guidance_scale is not None and config.guidance_scale != 1:
        raise ValueError(
            "`guidance_scale` (classifier-free guidance) is not supported by bloomlm's generate"
        )
    contrastive = (
        config.penalty_alpha is not None and config.penalty_alpha > 0 and (config.top_k or 0) > 1
    )
    if contrastive and config.num_beams == 1 and not config.do_sample:
        raise ValueError(
            "contrastive search (`penalty_alpha` > 0) is not supported by bloomlm's generate"
        )
    if config.pad_token_id is None and config.eos_token_id is not None:
        if model_kwargs.get("attention_mask") is None:
            logger.warning(
                "The attention mask and the pad token id were not set; pass `attention_mask` for reliable results."
            )
        pad = eos_list(config.eos_token_id)[0]
        logger.warning(f"Setting `pad_token_id` to `eos_token_id`:{pad} for open-end generation.")
        config.pad_token_id = pad
    return config, model_kwargs


def _prepare_inputs(
    model: Any, inputs: torch.Tensor | None, model_kwargs: dict[str, Any], config: GenerationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the prompt and its mask; build the mask as transformers does when none is given."""
    input_ids = model_kwargs.pop("input_ids", None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    if "inputs_embeds" in model_kwargs:
        raise ValueError("`inputs_embeds` is not supported by bloomlm's generate; pass `input_ids`")
    if model_kwargs:
        raise ValueError(
            f"generate() got unknown arguments {sorted(model_kwargs)}: allowed are `input_ids`, "
            "`attention_mask`, the GenerationConfig fields, `compile`, `generator` and "
            "`max_model_len`"
        )
    if inputs is not None and input_ids is not None:
        raise ValueError("pass the prompt once: either `inputs` or `input_ids`, not both")
    input_ids = _prompt_ids(model, inputs if inputs is not None else input_ids, attention_mask,
                            config)  # fmt: skip
    if attention_mask is None:
        attention_mask = _default_attention_mask(
            input_ids, config.pad_token_id, config.eos_token_id
        )
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = (
            list(attention_mask.shape)
            if isinstance(attention_mask, torch.Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(
            f"`attention_mask` must have the shape of `input_ids` {list(input_ids.shape)}, got {shape}"
        )
    pad = config.pad_token_id
    if pad is not None and bool((input_ids[:, -1] == pad).any()):
        logger.warning(
            "A decoder-only architecture is being used, but right-padding was detected! For correct generation "
            "results, please set `padding_side='left'` when initializing the tokenizer."
        )
    return input_ids, attention_mask


def _prompt_ids(
    model: Any, input_ids: Any, attention_mask: Any, config: GenerationConfig
) -> torch.Tensor:
    """The checked prompt [B, L] as int64, or a lone bos token when none is given."""
    if input_ids is None:  # start from a lone bos token
        if attention_mask is not None:
            raise ValueError("`attention_mask` was given without `input_ids`; pass both or neither")
        if config.bos_token_id is None:
            raise ValueError("`bos_token_id` has to be defined when no `input_ids` are provided")
        device = getattr(model, "device", None)  # None for a model without parameters
        return torch.full((1, 1), config.bos_token_id, dtype=torch.long, device=device)
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
    ):
        got = (
            f"{input_ids.dtype} of shape {list(input_ids.shape)}"
            if isinstance(input_ids, torch.Tensor)
            else repr(input_ids)
        )
        raise ValueError(
            f"`input_ids` must be an integer tensor of shape [batch, length], got {got}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"`input_ids` must hold at least one token per row, got shape {list(input_ids.shape)}"
        )
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} in `input_ids` is outside the vocabulary: ids must lie in "
                f"[0, {vocab_size})"
            )
    return input_ids.long()


def _default_attention_mask(
    input_ids: torch.Tensor, pad: int | None, eos: int | list[int] | None
) -> torch.Tensor:
    """Mask out pad tokens, unless pad is also an eos token (then nothing can be told apart)."""
    eos_ids = eos_list(eos)
    if (
        pad is not None
        and bool((input_ids == pad).any())
        and (eos_ids is None or pad not in eos_ids)
    ):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids)


def _finish_lengths(config: GenerationConfig, prompt_len: int, user_max_length: int | None) -> None:
    """Turn max_new_tokens into max_length, as transformers does, and check the lengths fit."""
    default_max_length = user_max_length is None
    if config.max_new_tokens is not None:
        if not default_max_length:
            logger.warning(
                f"Both `max_new_tokens` (={config.max_new_tokens}) and `max_length` (={config.max_length}) "
                "are set; `max_new_tokens` takes precedence."
            )
        config.max_length = config.max_new_tokens + prompt_len
    elif default_max_length and config.max_length == 20:
        warnings.warn(
            "Using the model-agnostic default `max_length` (=20) to control the generation length; "
            "set `max_new_tokens` instead.",
            UserWarning,
            stacklevel=3,
        )
    if prompt_len >= config.max_length:
        raise ValueError(
            f"`max_length` ({config.max_length}) must be larger than the prompt length ({prompt_len}); "
            "set `max_new_tokens` to the number of tokens to generate"
        )
    if config.min_length and config.min_length > config.max_length:
        warnings.warn(
            f"`min_length` ({config.min_length}) is larger than `max_length` ({config.max_length}); "
            "generation stops at max_length.",
            UserWarning,
            stacklevel=3,
        )
    if config.min_new_tokens and config.min_new_tokens + prompt_len > config.max_length:
        warnings.warn(
            f"`min_new_tokens` ({config.min_new_tokens}) plus the prompt length ({prompt_len}) is larger "
            f"than `max_length` ({config.max_length}); generation stops at max_length.",
            UserWarning,
            stacklevel=3,
        )


def _check_usable_length(
    config: GenerationConfig, prompt_len: int, max_model_len: int | None
) -> None:
    """A request longer than the usable length fails now, before any memory is allocated."""
    if max_model_len is None:
        return
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1:
        raise ValueError(f"`max_model_len` must be a positive integer, got {max_model_len!r}")
    if config.max_length > max_model_len:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) plus the tokens to generate make "
            f"{config.max_length}, "
            f"more than the usable length max_model_len={max_model_len}; lower max_new_tokens "
            "or raise max_model_len"
        )


def _check_streamer(streamer: Any, config: GenerationConfig, batch_size: int) -> None:
    if streamer is None:
        return
    if config.num_beams > 1:
        raise ValueError("`streamer` cannot be used with beam search; set `num_beams=1`")
    rows = batch_size * config.num_return_sequences
    if rows > 1:
        raise ValueError(
            f"`streamer` needs a single sequence (batch size 1, num_return_sequences 1), got {rows} rows"
        )
    if not (hasattr(streamer, "put") and hasattr(streamer, "end")):
        raise ValueError(
            "`streamer` must have `put(token_ids)` and `end()` methods, like TextStreamer"
        )


# The logits filters and the beam bookkeeping stay importable from here (their home is decoding/).
__all__ = [
    "BeamHypotheses",
    "BeamSearchScorer",
    "GenerateBeamDecoderOnlyOutput",
    "GenerateDecoderOnlyOutput",
    "apply_repetition_penalty",
    "apply_sequence_bias",
    "apply_temperature",
    "bad_words_bias",
    "ban_repeated_ngrams",
    "ban_tokens",
    "boost_eos_exponentially",
    "build_logits_processors",
    "build_logits_warpers",
    "epsilon_filter",
    "eta_filter",
    "force_tokens",
    "generate",
    "log_normalize",
    "remove_inf_nan",
    "run_chain",
    "top_k_filter",
    "top_p_filter",
    "typical_filter",
]

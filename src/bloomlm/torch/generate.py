"""Text generation for BLOOM causal LMs: every decoding strategy of transformers 4.37's `generate`.

Token for token the same as transformers 4.37.2's `generate` where it is deterministic (same logits
filters in the same order, same beam bookkeeping, same random draws for a given
`torch.manual_seed`). This module resolves the settings, checks the inputs once, and picks the loop
as transformers' `_get_generation_mode` does; the loops live in `torch/decoding/`:

    search.py       greedy search, multinomial sampling
    beams.py        beam search, beam sampling, group (diverse) beam search
    constrained.py  constrained beam search (constraints: bloomlm/constraints.py)
    contrastive.py  contrastive search
    assisted.py     assisted (speculative) decoding: an assistant model, or prompt lookup
    processors.py   the logits processors and warpers, small pure functions, and their chains
    guidance.py     classifier-free guidance (a processor with its own decoder)
    inputs.py       the prompt: ids, mask, `inputs_embeds`, PEFT's prompt-learning inputs
    state.py        what the loops share: sequences, recorder, stopping rule, outputs

The loops know the model only through the engine's step protocol (`torch/engine.py`):

    decoder = model.make_decoder(rows, capacity, compile=...)
    out = decoder.prefill(prompt_ids, prompt_mask)   # out.logits [N, 1, V]: the last position only
    out = decoder.step(next_ids [N, T], num_logits=k, hidden=...)  # T > 1: verify drafts
    decoder.reorder(beam_idx); decoder.crop(length)   # beams; rejected drafts

bloomlm's BloomForCausalLM makes its own decoder (a preallocated KV cache, compiled step on
request); any other model with BLOOM's forward signature (transformers' in the parity tests) is
driven through `ForwardDecoder`. Steps run under `no_grad`, so what `generate` returns is an
ordinary tensor, never a copy made to leave `inference_mode`.

Notation: B prompts, N rows decoded together (B * num_beams, or B * num_return_sequences when
sampling, B * top_k in contrastive search), L tokens so far, V vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bloomlm.constraints import constraints_from_force_words
from bloomlm.generation import GenerationConfig
from bloomlm.torch.decoding.assisted import (
    AssistantDrafter,
    PromptLookupDrafter,
    assisted_decoding,
)
from bloomlm.torch.decoding.beams import (
    BeamHypotheses,
    BeamSearchScorer,
    beam_search,
    group_beam_search,
)
from bloomlm.torch.decoding.constrained import constrained_beam_search
from bloomlm.torch.decoding.contrastive import contrastive_search
from bloomlm.torch.decoding.guidance import ClassifierFreeGuidance
from bloomlm.torch.decoding.inputs import PrefillInputs, Prompt, prepare_inputs
from bloomlm.torch.decoding.processors import (
    ChainExtras,
    GroupStep,
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
from bloomlm.torch.engine import ForwardModel, decoder_source

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

# Settings only an encoder-decoder model uses, with their "off" values: BLOOM has no encoder.
_UNSUPPORTED_SETTINGS = {
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
}

# How transformers 4.37's `_get_generation_mode` names the loops, and which one runs each.
_ASSISTED_MODES = ("greedy", "sample")


# Over 40 lines: transformers' generate signature and its documented checks, then one dispatch.
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

    `inputs` (or `input_ids=`) is [B, L]; `attention_mask=` [B, L] marks left padding;
    `inputs_embeds=` [B, T, C] replaces the prompt's embeddings in the first pass. Any
    GenerationConfig field may be passed as a keyword; the fields choose the loop as in
    transformers (`generation_mode`). `logits_processor` / `stopping_criteria` are lists of
    callables `(input_ids, scores)`, run after the built-in ones. Returns the sequences
    [B * num_return_sequences, L'] or, with `return_dict_in_generate=True`, a
    `GenerateDecoderOnlyOutput` / `GenerateBeamDecoderOnlyOutput`.

    `model` is bloomlm's BloomForCausalLM, or any model with BLOOM's forward signature (driven
    through `ForwardDecoder`). bloomlm's own keywords: `compile` (True or a torch.compile mode:
    run the decode step compiled; default: the model's `from_pretrained(compile=...)`),
    `generator` (one torch.Generator per prompt, so each prompt's draws are its own and its text
    does not depend on the rest of the batch; default: the global generator, transformers'
    draws), `max_model_len` (the most tokens a row may reach, prompt included: a longer request
    is a ValueError before anything runs).
    """
    # Over 40 lines: transformers' signature and docstring; the body resolves, checks, dispatches.
    source = decoder_source(model)
    user_max_length = kwargs.get("max_length")
    config, model_kwargs = _resolve_config(source, generation_config, kwargs)
    prompt = prepare_inputs(source, inputs, model_kwargs, config)
    _finish_lengths(config, prompt.length, user_max_length)
    _check_usable_length(config, prompt.length, max_model_len)
    mode = generation_mode(config, assistant_model)
    _check_mode(mode, config, prompt, streamer, synced_gpus)
    request = _Request(source, config, prompt, logits_processor or (), stopping_criteria or (),
                       prefix_allowed_tokens_fn, generator, compile)  # fmt: skip
    request.guidance = _guidance(request, negative_prompt_ids, negative_prompt_attention_mask)
    with torch.no_grad():  # not inference_mode: what is returned is an ordinary tensor
        if streamer is not None:
            streamer.put(prompt.ids.cpu())
        try:
            return _run(mode, request, streamer, assistant_model)
        finally:
            if streamer is not None:  # also on error, so a consumer thread is never left waiting
                streamer.end()


def generation_mode(config: GenerationConfig, assistant_model: Any = None) -> str:
    """The loop transformers 4.37 runs for `config`: greedy, sample, contrastive, beam,
    beam_sample, group_beam, constrained or assisted."""
    if config.constraints is not None or config.force_words_ids is not None:
        mode = "constrained"
    elif config.num_beams == 1:
        contrastive = (config.top_k or 0) > 1 and (config.penalty_alpha or 0) > 0
        mode = "sample" if config.do_sample else "contrastive" if contrastive else "greedy"
    elif config.num_beam_groups > 1:
        mode = "group_beam"
    else:
        mode = "beam_sample" if config.do_sample else "beam"
    if assistant_model is not None or config.prompt_lookup_num_tokens is not None:
        if mode not in _ASSISTED_MODES:
            raise ValueError(
                "assisted decoding (`assistant_model`, `prompt_lookup_num_tokens`) works with "
                f"greedy search and sampling only, not with {mode.replace('_', ' ')} (num_beams="
                f"{config.num_beams}, penalty_alpha={config.penalty_alpha}, constraints)"
            )
        mode = "assisted"
    return mode


def _run(mode: str, request: _Request, streamer: Any, assistant_model: Any) -> Any:
    batch_size = request.prompt.batch_size
    if mode in ("greedy", "sample"):
        return greedy_or_sample(_make_loop(request), streamer)
    if mode in ("beam", "beam_sample"):
        return beam_search(_make_loop(request), batch_size)
    if mode == "group_beam":
        group_step = GroupStep()
        return group_beam_search(_make_loop(request, group_step=group_step), batch_size, group_step)
    if mode == "constrained":
        constraints = list(request.config.constraints or [])
        if request.config.force_words_ids is not None:
            constraints += constraints_from_force_words(request.config.force_words_ids)
        return constrained_beam_search(_make_loop(request), batch_size, constraints)
    if mode == "contrastive":
        low_memory = bool(request.config.low_memory)
        rows = batch_size if low_memory else batch_size * request.config.top_k
        return contrastive_search(_make_loop(request, decoder_rows=rows), streamer, low_memory)
    drafter = _drafter(request, assistant_model)
    return assisted_decoding(
        _make_loop(request, extra_columns=drafter.overshoot), drafter, streamer
    )


@dataclasses.dataclass
class _Request:
    """What `generate` was asked, checked: the model, the resolved config, the prompt, the
    caller's processors and criteria, and the engine options."""

    source: Any
    config: GenerationConfig
    prompt: Prompt
    logits_processor: Sequence[LogitsFn]
    stopping_criteria: Sequence[Callable]
    prefix_allowed_tokens_fn: Callable | None
    generator: torch.Generator | Sequence[torch.Generator] | None
    compile: bool | str | None
    guidance: LogitsFn | None = None

    @property
    def expand(self) -> int:
        """Rows per prompt: beams, or returned samples."""
        config = self.config
        return config.num_beams if config.num_beams > 1 else config.num_return_sequences


def _make_loop(
    request: _Request,
    *,
    decoder_rows: int | None = None,
    extra_columns: int = 0,
    group_step: GroupStep | None = None,
) -> Loop:
    """Expand the prompts to their rows (beams, or returned sequences) and set up the loop."""
    config, prompt, expand = request.config, request.prompt, request.expand
    generators = _row_generators(request.generator, prompt.batch_size, expand)
    tokens = LoopTokens.resolve(request.source, config)
    extras = ChainExtras(request.prefix_allowed_tokens_fn, group_step, request.guidance)
    processors = build_logits_processors(config, prompt.length, request.logits_processor, extras)
    warpers = build_logits_warpers(config) if config.do_sample else []
    stop = StoppingCriteria(config, request.stopping_criteria)
    rows_ids, rows_mask = (t.repeat_interleave(expand, dim=0) for t in (prompt.ids, prompt.mask))
    seqs = Sequences(rows_ids, rows_mask, config.max_length)
    prefill_inputs = PrefillInputs.for_prompt(_hook_owner(request.source), prompt, expand)
    columns = prefill_inputs.columns(rows_ids, rows_mask) - prompt.length  # soft-prompt columns
    capacity = config.max_length + columns + extra_columns
    rows = decoder_rows or rows_ids.shape[0]
    decoder = request.source.make_decoder(rows, capacity, compile=request.compile)
    return Loop(config, decoder, seqs, tokens, processors, warpers, stop, Recorder(config),
                generators, prefill_inputs, group_step)  # fmt: skip


def _hook_owner(source: Any) -> Any:
    """The model whose prepare_inputs_for_generation builds the first pass's inputs."""
    return source.model if isinstance(source, ForwardModel) else source


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


def _drafter(request: _Request, assistant_model: Any) -> Any:
    """Who proposes the tokens assisted decoding verifies: the prompt itself (prompt lookup) or
    the assistant model."""
    config = request.config
    if config.prompt_lookup_num_tokens is not None:
        return PromptLookupDrafter(config.prompt_lookup_num_tokens)
    if getattr(assistant_model, "config", None) is None:
        raise ValueError(
            "`assistant_model` must be a causal LM with a config (bloomlm's BloomForCausalLM, or a "
            f"model with BLOOM's forward signature), got {type(assistant_model).__name__}"
        )
    assistant = decoder_source(assistant_model)
    return AssistantDrafter(assistant, request.source, config, request.logits_processor,
                            request.prompt.mask, request.compile)  # fmt: skip


def _guidance(request: _Request, negative_ids: Any, negative_mask: Any) -> LogitsFn | None:
    """Classifier-free guidance, when `guidance_scale` asks for it."""
    scale = request.config.guidance_scale
    if scale is None or scale == 1:
        if negative_ids is not None or negative_mask is not None:
            raise ValueError(
                "`negative_prompt_ids` / `negative_prompt_attention_mask` are read by "
                "classifier-free guidance only: set `guidance_scale` != 1"
            )
        return None
    return ClassifierFreeGuidance.build(request.source, request.config, request.prompt,
                                        negative_ids, negative_mask)  # fmt: skip


def _resolve_config(
    model: Any, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
) -> tuple[GenerationConfig, dict[str, Any]]:
    """Copy the given (or the model's) config, apply the keyword overrides, validate; return
    leftovers."""
    if generation_config is None:
        generation_config = model_generation_config(model)
    config = copy.deepcopy(as_generation_config(generation_config))
    model_kwargs = config.update(**kwargs)
    config.validate()
    for name, off in _UNSUPPORTED_SETTINGS.items():
        if getattr(config, name) != off:
            raise ValueError(
                f"`{name}`={getattr(config, name)!r} is for encoder-decoder models; BLOOM has no "
                f"encoder: use {off!r}"
            )
    if config.pad_token_id is None and config.eos_token_id is not None:
        if model_kwargs.get("attention_mask") is None:
            logger.warning(
                "The attention mask and the pad token id were not set; pass `attention_mask` for "
                "reliable results."
            )
        pad = eos_list(config.eos_token_id)[0]
        logger.warning(f"Setting `pad_token_id` to `eos_token_id`:{pad} for open-end generation.")
        config.pad_token_id = pad
    return config, model_kwargs


def _check_mode(
    mode: str, config: GenerationConfig, prompt: Prompt, streamer: Any, synced_gpus: Any
) -> None:
    """What transformers refuses for the chosen loop, refused here with the reason."""
    if synced_gpus:
        raise ValueError(
            "`synced_gpus=True` is not supported by bloomlm's generate (single process only)"
        )
    if config.diversity_penalty and mode != "group_beam":
        raise ValueError(
            f"`diversity_penalty` ({config.diversity_penalty}) is used by group beam search only "
            "(num_beams > 1, num_beam_groups > 1); set it to 0.0"
        )
    if mode == "constrained" and config.num_beams < 2:
        raise ValueError(
            "constrained beam search (`constraints`, `force_words_ids`) needs num_beams > 1"
        )
    if mode in ("contrastive", "assisted") and not config.use_cache:
        raise ValueError(f"{mode} decoding needs the cache: use_cache=True")
    if mode == "assisted":
        if prompt.batch_size > 1 or config.num_return_sequences > 1:
            raise ValueError(
                "assisted decoding takes one prompt and returns one sequence (as in transformers), "
                f"got batch size {prompt.batch_size}, num_return_sequences "
                f"{config.num_return_sequences}"
            )
        if prompt.embeds is not None:
            raise ValueError("assisted decoding takes `input_ids`, not `inputs_embeds`")
    if config.guidance_scale not in (None, 1) and mode in ("group_beam", "assisted"):
        raise ValueError(
            f"`guidance_scale` (classifier-free guidance) is not supported with {mode} decoding "
            "in bloomlm (transformers runs the unconditional model once per processor call, which "
            "these loops make several times per step)"
        )
    _check_streamer(streamer, config, prompt.batch_size)


def _finish_lengths(config: GenerationConfig, prompt_len: int, user_max_length: int | None) -> None:
    """Turn max_new_tokens into max_length, as transformers does, and check the lengths fit."""
    default_max_length = user_max_length is None
    if config.max_new_tokens is not None:
        if not default_max_length:
            logger.warning(
                f"Both `max_new_tokens` (={config.max_new_tokens}) and `max_length` "
                f"(={config.max_length}) are set; `max_new_tokens` takes precedence."
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
            f"`max_length` ({config.max_length}) must be larger than the prompt length "
            f"({prompt_len}); set `max_new_tokens` to the number of tokens to generate"
        )
    if config.min_length and config.min_length > config.max_length:
        warnings.warn(
            f"`min_length` ({config.min_length}) is larger than `max_length` "
            f"({config.max_length}); generation stops at max_length.",
            UserWarning,
            stacklevel=3,
        )
    if config.min_new_tokens and config.min_new_tokens + prompt_len > config.max_length:
        warnings.warn(
            f"`min_new_tokens` ({config.min_new_tokens}) plus the prompt length ({prompt_len}) "
            f"is larger than `max_length` ({config.max_length}); generation stops at max_length.",
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
            "`streamer` needs a single sequence (batch size 1, num_return_sequences 1), got "
            f"{rows} rows"
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
    "generation_mode",
    "log_normalize",
    "remove_inf_nan",
    "run_chain",
    "top_k_filter",
    "top_p_filter",
    "typical_filter",
]

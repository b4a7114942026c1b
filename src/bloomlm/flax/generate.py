"""Text generation for the Flax causal LM, compiled with jax.jit end to end.

The prompt is run once into a preallocated cache of `max_length` slots, then a `lax.while_loop` adds
one token per iteration: no Python runs per step. The loops know the model only through

    tokens_to_logits(tokens [N, T], cache) -> (logits of the last token [N, V], cache)

(flax's lm1b sampler pattern), so they are tested with a fake model too. Strategies: greedy,
sampling (`temperature`, `top_k`, `top_p` filters, transformers' order and semantics, `prng_key`),
and beam search with transformers 4.37's PyTorch bookkeeping (2 * num_beams candidates per step,
finished hypotheses kept by length-penalised score, its `early_stopping` rules), so greedy and beam
ids equal PyTorch's.

Outputs are `[B, max_length]` like transformers' Flax `generate`: the prompt (left padding kept),
the new tokens, and `pad_token_id` after a row's `eos_token_id`. Only `max_length`, `num_beams`,
sampling or not, the number of eos ids, `num_return_sequences` and the logits processors' settings
(`min_length`, forced and suppressed tokens, `no_repeat_ngram_size`: see `bloomlm.flax.processors`)
shape the compiled loop; other settings (eos and pad ids, temperature, top_k, top_p, length_penalty,
early_stopping) are traced values, so changing them does not recompile.

Notation: B prompts, K beams, N rows decoded together (B or B * K), P prompt length, L max_length, V
vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from bloomlm.flax import checks, sharding
from bloomlm.flax.model import make_cache, module_for_key, module_key
from bloomlm.flax.processors import LogitsProcessors
from bloomlm.generation import GenerationConfig
from bloomlm.outputs import ModelOutput

NEG_INF = -jnp.inf
# Settings this loop implements; any other generation setting away from its default is refused.
_SUPPORTED = {
    "max_length", "max_new_tokens", "do_sample", "num_beams", "temperature", "top_k", "top_p",
    "eos_token_id", "pad_token_id", "bos_token_id", "length_penalty", "early_stopping", "use_cache",
    "min_length", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
    "begin_suppress_tokens", "forced_decoder_ids", "no_repeat_ngram_size", "num_return_sequences",
}  # fmt: skip


@struct.dataclass(repr=False)
class FlaxGreedySearchOutput(ModelOutput):
    sequences: Any = None


@struct.dataclass(repr=False)
class FlaxSampleOutput(ModelOutput):
    sequences: Any = None


@struct.dataclass(repr=False)
class FlaxBeamSearchOutput(ModelOutput):
    sequences: Any = None
    scores: Any = None  # [B] length-penalised log-probability of the returned beam


# -- logits filters: pure functions of scores [N, V] -----------------------------------------------


def top_k_filter(scores: jax.Array, top_k: int | jax.Array) -> jax.Array:
    """Keep the `top_k` largest scores (ties with the k-th kept), -inf elsewhere; 0 keeps all.

    `top_k` may be traced, so changing it does not recompile.
    """
    vocab = scores.shape[-1]
    k = jnp.clip(top_k, 1, vocab)
    kth = jnp.take(jnp.sort(scores, axis=-1), vocab - k, axis=-1)[..., None]
    return jnp.where((top_k > 0) & (scores < kth), NEG_INF, scores)


def top_p_filter(scores: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p` (at least one);
    1 keeps all."""
    order = jnp.argsort(scores, axis=-1)  # ascending, as transformers sorts
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove & (top_p < 1.0), NEG_INF, scores)


def warp_for_sampling(scores: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """transformers' sampling warpers in its order:
    temperature, top-k, top-p (all may be traced)."""
    return top_p_filter(top_k_filter(scores / temperature, top_k), top_p)


# -- the loops -------------------------------------------------------------------------------------
# `eos` is an int32 array of end-of-sequence ids ([-1] when there is none), `pad` an int32 scalar.


# Over 40 lines: the loop state is spelled out field by field, each with its meaning.
def sample_loop(
    tokens_to_logits: Callable,
    input_ids: jax.Array,
    cache: Any,
    max_length: int,
    eos: jax.Array,
    pad: jax.Array,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
    prng_key: jax.Array,
    process: Callable | None = None,
) -> jax.Array:
    """Greedy or sampled decoding: `choose(scores [N, V], key) -> tokens [N]` after the logits
    processors `process(sequences, scores, length) -> scores`. Returns [N, max_length]."""
    batch, prompt_length = input_ids.shape
    logits, cache = tokens_to_logits(input_ids, cache)
    sequences = jnp.full((batch, max_length), pad, jnp.int32).at[:, :prompt_length].set(input_ids)
    state = (
        jnp.array(prompt_length),  # length so far (the next token's position)
        sequences,
        jnp.zeros(batch, bool),  # per row: has produced eos
        logits,  # [N, V] scores of the next token
        cache,
        prng_key,
    )

    def not_done(state):
        length, _, finished, *_ = state
        return (length < max_length) & ~finished.all()

    def step(state):
        length, sequences, finished, logits, cache, key = state
        key, draw_key = jax.random.split(key)
        scores = logits.astype(jnp.float32)
        if process is not None:
            scores = process(sequences, scores, length)
        tokens = jnp.where(finished, pad, choose(scores, draw_key)).astype(jnp.int32)
        sequences = lax.dynamic_update_slice(sequences, tokens[:, None], (0, length))
        finished = finished | jnp.isin(tokens, eos)
        logits, cache = tokens_to_logits(tokens[:, None], cache)
        return length + 1, sequences, finished, logits, cache, key

    return lax.while_loop(not_done, step, state)[1]


EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}


class _Beams(NamedTuple):
    """What one beam search keeps fixed: sizes (static) and settings (traced)."""

    batch: int  # B prompts
    beams: int  # K
    num_candidates: int  # candidates ranked per prompt and step
    prompt_length: int
    max_length: int
    eos: jax.Array
    pad: jax.Array
    length_penalty: jax.Array
    early_stopping: jax.Array  # a code from EARLY_STOPPING_CODES
    process: Callable | None = None  # the logits processors, on log-probabilities
    num_return: int = 1  # hypotheses returned per prompt, best first

    def penalised(self, score: jax.Array, generated) -> jax.Array:
        """transformers' hypothesis score: sum of log-probs / generated length ** length_penalty."""
        return score / jnp.asarray(generated, jnp.float32) ** self.length_penalty

    def cannot_improve(self, hyp_scores: jax.Array, best_candidate: jax.Array, generated):
        """transformers' BeamHypotheses.is_done once the pool is full."""
        worst = hyp_scores.min(axis=1)
        never = (self.early_stopping == 2) & (self.length_penalty > 0)
        horizon = jnp.where(never, self.max_length - self.prompt_length, generated)
        return (self.early_stopping == 1) | (worst >= self.penalised(best_candidate, horizon))


def beam_search_loop(
    tokens_to_logits: Callable,
    input_ids: jax.Array,
    cache: Any,
    max_length: int,
    num_beams: int,
    eos: jax.Array,
    pad: jax.Array,
    length_penalty: jax.Array,
    early_stopping: jax.Array,
    process: Callable | None = None,
    num_return: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """transformers 4.37's beam search on [B * K] rows (each prompt repeated K times); returns
    ([B * num_return, L], [B * num_return]), each prompt's best hypotheses first.

    `early_stopping` is a code from EARLY_STOPPING_CODES. Finished hypotheses live in a pool of K
    per prompt, scored sum_logprobs / generated_length ** length_penalty, as transformers'
    BeamHypotheses.
    """
    rows, prompt_length = input_ids.shape
    num_candidates = max(2, 1 + eos.shape[0]) * num_beams
    sizes = (rows // num_beams, num_beams, num_candidates, prompt_length, max_length)
    spec = _Beams(*sizes, eos, pad, length_penalty, early_stopping, process, num_return)
    logits, cache = tokens_to_logits(input_ids, cache)

    def not_done(s):
        return (s["length"] < max_length) & ~s["done"].all()

    state = _beam_start(spec, input_ids, logits, cache)
    state = lax.while_loop(not_done, functools.partial(_beam_step, spec, tokens_to_logits), state)
    return _best_hypotheses(spec, state)


def _beam_start(spec: _Beams, input_ids: jax.Array, logits: jax.Array, cache: Any) -> dict:
    """The loop state after the prompt: K copies of each prompt, one of them live; no hypotheses."""
    batch, beams, max_length = spec.batch, spec.beams, spec.max_length
    running = jnp.full((batch * beams, max_length), spec.pad, jnp.int32)
    running = running.at[:, : spec.prompt_length].set(input_ids)
    return dict(
        length=jnp.array(spec.prompt_length),
        running=running.reshape(batch, beams, max_length),
        running_scores=jnp.zeros((batch, beams)).at[:, 1:].set(-1e9),  # sums of log-probs
        logits=logits,
        cache=cache,
        hyps=jnp.full((batch, beams, max_length), spec.pad, jnp.int32),  # finished, eos left out
        hyp_scores=jnp.full((batch, beams), NEG_INF),  # length-penalised; -inf = empty slot
        hyp_lengths=jnp.zeros((batch, beams), jnp.int32),
        done=jnp.zeros(batch, bool),
    )


# Over 40 lines: one beam step in its named stages (rank, pool, continue, step the model).
def _beam_step(spec: _Beams, tokens_to_logits: Callable, s: dict) -> dict:
    """One token for every live beam: rank 2K candidates per prompt, pool the finished ones, go on
    with the K best that are not eos."""
    batch, beams = spec.batch, spec.beams
    length, vocab = s["length"], s["logits"].shape[-1]
    scores = jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1)
    if spec.process is not None:
        scores = spec.process(s["running"].reshape(batch * beams, -1), scores, length)
    scores = scores.reshape(batch, beams, vocab)
    scores = (scores + s["running_scores"][..., None]).reshape(batch, beams * vocab)
    cand_scores, cand_ids = lax.top_k(scores, spec.num_candidates)  # [B, 2K], best first
    cand_beams, cand_tokens = cand_ids // vocab, cand_ids % vocab
    is_eos = jnp.isin(cand_tokens, spec.eos)
    generated = length + 1 - spec.prompt_length  # length of a hypothesis ending here, eos included
    pool = _pool_hypotheses(spec, s, cand_scores, cand_beams, is_eos, generated)

    # The K best candidates that are not eos continue; finished prompts continue with pad (unused).
    rank = jnp.arange(spec.num_candidates)
    order = jnp.argsort(jnp.where(is_eos, rank + spec.num_candidates, rank), axis=1)[:, :beams]
    was_done = s["done"][:, None]
    next_beams = jnp.where(was_done, 0, jnp.take_along_axis(cand_beams, order, axis=1))
    next_tokens = jnp.where(was_done, spec.pad, jnp.take_along_axis(cand_tokens, order, axis=1))
    next_tokens = next_tokens.astype(jnp.int32)
    next_scores = jnp.where(was_done, 0.0, jnp.take_along_axis(cand_scores, order, axis=1))

    full = jnp.isfinite(pool["hyp_scores"]).all(axis=1)
    running = jnp.take_along_axis(s["running"], next_beams[..., None], axis=1)
    running = lax.dynamic_update_slice(running, next_tokens[..., None], (0, 0, length))
    flat_rows = (jnp.arange(batch)[:, None] * beams + next_beams).reshape(-1)
    cache = jax.tree_util.tree_map(lambda x: _select_rows(x, flat_rows, batch * beams), s["cache"])
    logits, cache = tokens_to_logits(next_tokens.reshape(-1, 1), cache)
    cannot_improve = spec.cannot_improve(pool["hyp_scores"], cand_scores[:, 0], generated)
    done = s["done"] | (full & cannot_improve)
    return dict(
        length=length + 1,
        running=running,
        running_scores=next_scores,
        logits=logits,
        cache=cache,
        done=done,
        **pool,
    )


def _pool_hypotheses(spec: _Beams, s: dict, cand_scores, cand_beams, is_eos, generated) -> dict:
    """Eos candidates ranked among the top K become hypotheses; the pool keeps the K best scores."""
    rank = jnp.arange(spec.num_candidates)
    adds = is_eos & (rank < spec.beams) & ~s["done"][:, None]
    new_scores = jnp.where(adds, spec.penalised(cand_scores, generated), NEG_INF)
    pool_scores = jnp.concatenate([s["hyp_scores"], new_scores], axis=1)
    new_hyps = jnp.take_along_axis(s["running"], cand_beams[..., None], axis=1)
    pool = jnp.concatenate([s["hyps"], new_hyps], axis=1)
    new_lengths = jnp.broadcast_to(s["length"], adds.shape)
    pool_lengths = jnp.concatenate([s["hyp_lengths"], new_lengths], axis=1)
    keep = lax.top_k(pool_scores, spec.beams)[1]  # ties keep the older hypothesis
    return dict(
        hyps=jnp.take_along_axis(pool, keep[..., None], axis=1),
        hyp_scores=jnp.take_along_axis(pool_scores, keep, axis=1),
        hyp_lengths=jnp.take_along_axis(pool_lengths, keep, axis=1),
    )


def _best_hypotheses(spec: _Beams, s: dict) -> tuple[jax.Array, jax.Array]:
    """([B, L] sequences, [B] scores): each prompt's best hypothesis. Prompts still running at
    max_length add their live beams to the pool with their current scores."""
    max_length, batch, beams = spec.max_length, spec.batch, spec.beams
    live_scores = spec.penalised(s["running_scores"], max_length - spec.prompt_length)
    final_scores = jnp.where(s["done"][:, None], NEG_INF, live_scores)
    pool_scores = jnp.concatenate([s["hyp_scores"], final_scores], axis=1)
    pool = jnp.concatenate([s["hyps"], s["running"]], axis=1)
    pool_lengths = jnp.concatenate([s["hyp_lengths"], jnp.full((batch, beams), max_length)], axis=1)
    if spec.num_return == 1:
        best = jnp.argmax(pool_scores, axis=1)[:, None]  # ties: the older hypothesis
    else:
        best = lax.top_k(pool_scores, spec.num_return)[1]  # [B, n], best first
    sequences = jnp.take_along_axis(pool, best[..., None], axis=1)  # [B, n, L]
    lengths = jnp.take_along_axis(pool_lengths, best, axis=1)[..., None]
    positions = jnp.arange(max_length)[None, None, :]
    # A hypothesis shorter than max_length ends with the first eos id, then padding (transformers').
    after_end = jnp.where(positions == lengths, spec.eos[0], spec.pad)
    sequences = jnp.where(positions < lengths, sequences, after_end).reshape(-1, max_length)
    return sequences, jnp.take_along_axis(pool_scores, best, axis=1).reshape(-1)


def _select_rows(x: jax.Array, rows_index: jax.Array, rows: int) -> jax.Array:
    """Reorder the cache's batch axis (axis 0, or 1 for stacked layers) after beams were chosen."""
    if x.ndim == 0 or rows not in x.shape[:2]:
        return x
    axis = 0 if x.shape[0] == rows else 1
    return jnp.take(x, rows_index, axis=axis)


# -- the entry point -------------------------------------------------------------------------------


# Over 40 lines: transformers' Flax generate signature and its checks, then one dispatch.
def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    generation_config: GenerationConfig | None = None,
    *,
    params: Any = None,
    prng_key: jax.Array | None = None,
    **kwargs: Any,
):
    """Generate from `model` (a FlaxBloomForCausalLM); settings as `GenerationConfig` fields or
    keywords.

    Returns `FlaxGreedySearchOutput`, `FlaxSampleOutput` or `FlaxBeamSearchOutput` with `sequences`
    [B, max_length]. `max_new_tokens` counts from the prompt length (padding included, as in
    transformers). Without `pad_token_id` the first eos id pads, as in transformers. `prng_key`
    defaults to PRNGKey(0).
    """
    config = _resolve_config(model, generation_config, kwargs)
    input_ids = checks.check_input_ids(input_ids, model.config.vocab_size)
    batch, prompt_length = input_ids.shape
    attention_mask = checks.check_attention_mask(attention_mask, batch, prompt_length, None)
    max_length = _checked_max_length(config, prompt_length)
    mesh = getattr(model, "mesh", None)
    run = _jitted_generate(module_key(model.module), mesh)
    if mesh is not None:  # rows over the mesh's "data" axis
        rows = sharding.batch_sharding(mesh, batch)
        input_ids, attention_mask = jax.device_put((input_ids, attention_mask), rows)
    key = jax.random.PRNGKey(0) if prng_key is None else prng_key
    params = model.params if params is None else params
    num_beams, sampling = int(config.num_beams), bool(config.do_sample)
    processors = LogitsProcessors.from_config(config, prompt_length, int(max_length))
    sequences, scores = run(
        params, input_ids, attention_mask, key, _traced_settings(config),
        max_length=int(max_length), num_beams=num_beams, sampling=sampling,
        processors=processors, num_return=int(config.num_return_sequences),
    )  # fmt: skip
    if num_beams > 1:
        return FlaxBeamSearchOutput(sequences=sequences, scores=scores)
    output_class = FlaxSampleOutput if sampling else FlaxGreedySearchOutput
    return output_class(sequences=sequences)


def _checked_max_length(config: GenerationConfig, prompt_length: int) -> int:
    """The total length to generate to: `max_new_tokens` after the prompt, else `max_length`."""
    max_length = config.max_length
    if config.max_new_tokens is not None:
        max_length = prompt_length + config.max_new_tokens
    if max_length <= prompt_length:
        raise ValueError(
            f"max_length ({max_length}) leaves no room after the prompt ({prompt_length} tokens); "
            "raise max_length or set max_new_tokens"
        )
    if config.min_length > max_length:
        raise ValueError(
            f"min_length ({config.min_length}) is larger than max_length ({max_length}); no "
            "sequence can meet both"
        )
    return max_length


def _traced_settings(config: GenerationConfig) -> dict[str, jax.Array]:
    """The settings the compiled loop takes as values, so changing them does not recompile.

    Without `pad_token_id` the first eos id pads, as in transformers; no eos at all is [-1].
    """
    eos = config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    return dict(
        eos=jnp.asarray(eos_ids or [-1], jnp.int32),
        pad=jnp.int32(pad),
        temperature=jnp.float32(config.temperature),
        top_k=jnp.int32(config.top_k or 0),
        top_p=jnp.float32(1.0 if config.top_p is None else config.top_p),
        length_penalty=jnp.float32(config.length_penalty),
        early_stopping=jnp.int32(EARLY_STOPPING_CODES[config.early_stopping]),
    )


def _resolve_config(
    model: Any, generation_config: GenerationConfig | None, kwargs: dict
) -> GenerationConfig:
    base = generation_config or getattr(model, "generation_config", None)
    base = GenerationConfig.from_model_config(model.config) if base is None else base
    config = GenerationConfig.from_dict(base.to_dict())
    unknown = config.update(**kwargs)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
    config.validate()
    defaults = GenerationConfig()
    unsupported = sorted(
        field.name
        for field in dataclasses.fields(GenerationConfig)
        if field.name not in _SUPPORTED
        and getattr(config, field.name) != getattr(defaults, field.name)
    )
    if unsupported:
        raise ValueError(
            f"Flax generate does not implement {unsupported}; "
            f"supported settings: {sorted(_SUPPORTED)}"
        )
    if config.do_sample and config.num_beams > 1:
        raise ValueError(
            "Flax generate does not implement beam sampling (do_sample=True with num_beams > 1)"
        )
    if config.num_return_sequences > 1 and config.num_beams == 1:
        raise ValueError(
            "Flax generate returns num_return_sequences > 1 only from beam search (transformers' "
            "Flax generate ignores it otherwise); set num_beams >= num_return_sequences"
        )
    return config


# Over 40 lines: the compiled function, holding the model step and both loops' entry points.
@functools.lru_cache(maxsize=16)
def _jitted_generate(key: tuple, mesh: jax.sharding.Mesh | None = None):
    """One jitted generate per `module_key` (its module shared with the jitted forward) and mesh;
    it compiles once per (max_length, num_beams, sampling, number of eos ids, processors,
    num_return). On a mesh the cache stays split by heads over "model" and by rows over "data"
    at every step."""
    module = module_for_key(key)
    static = ("max_length", "num_beams", "sampling", "processors", "num_return")

    # Over 40 lines: one traced program (cache, step function, beam or sampling loop) for jit.
    @functools.partial(jax.jit, static_argnames=static)
    def run(
        params, input_ids, attention_mask, key, traced, *,
        max_length, num_beams, sampling, processors, num_return,
    ):  # fmt: skip
        input_ids = jnp.repeat(input_ids, num_beams, axis=0)
        prompt_mask = jnp.repeat(attention_mask, num_beams, axis=0)
        rows, prompt_length = input_ids.shape
        # transformers' Flax mask: the prompt's, then ones; the cache hides the slots not yet
        # written.
        mask = jnp.ones((rows, max_length), jnp.int32).at[:, :prompt_length].set(prompt_mask)
        config, dtype, scan_layers = module.config, module.dtype, module.scan_layers
        cache = make_cache(config, rows, max_length, dtype, scan_layers, is_head=True)
        cache = sharding.constrain_cache(cache, mesh)

        def tokens_to_logits(tokens, cache):
            variables = {"params": params, "cache": cache}
            out, mutated = module.apply(
                variables, tokens, mask, True, False, False, mutable=["cache"]
            )
            return out.logits[:, -1], sharding.constrain_cache(mutated["cache"], mesh)

        eos, pad = traced["eos"], traced["pad"]
        if num_beams > 1:
            beam_settings = (traced["length_penalty"], traced["early_stopping"])
            return beam_search_loop(
                tokens_to_logits, input_ids, cache, max_length, num_beams, eos, pad,
                *beam_settings, processors, num_return,
            )  # fmt: skip

        def choose(scores, draw_key):
            if not sampling:
                return jnp.argmax(scores, axis=-1)
            warped = warp_for_sampling(
                scores, traced["temperature"], traced["top_k"], traced["top_p"]
            )
            return jax.random.categorical(draw_key, warped, axis=-1)

        sequences = sample_loop(
            tokens_to_logits, input_ids, cache, max_length, eos, pad, choose, key, processors
        )
        return sequences, jnp.zeros(rows, jnp.float32)

    return run

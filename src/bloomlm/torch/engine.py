"""The decoding engine: a step protocol over one preallocated KV cache, and its compiled step.

Every decoding loop (`generate`'s greedy, sampling and beam search; later the server's continuous
batching, assisted decoding, contrastive search) drives a model through this protocol only:

    decoder = model.make_decoder(rows, capacity, compile=False)
    out = decoder.prefill(ids [N, T], mask [N, T], num_logits=1, hidden=False)  # left-padded
    out = decoder.prefill(None, mask, inputs_embeds=[N, T, C])  # embeddings instead (soft prompts)
    out = decoder.step(ids [N, T], num_logits=1, hidden=False)  # every row advances T tokens
    out.logits   # [N, k, V]: the last k = num_logits positions only (the LM head sees no more)
    out.hidden   # [N, k, C]: the last hidden state (after ln_f), when hidden=True
    decoder.crop(length); decoder.reorder(rows)           # drop rejected drafts; beams
    decoder.fill(row, ids [T]) -> StepOutput              # reset one row and prefill it alone
    decoder.extend(row, ids [T]) -> StepOutput            # append to one row (chunked prefill)
    decoder.copy_row(source, target); decoder.grow_rows(rows)  # continuous batching's rows
    decoder.step_rows(ids [n], rows=slice(0, n)) -> [n, V]  # one token per row, own column each
    decoder.reset(row); decoder.legacy_cache()            # BLOOM's tuples of the used columns

`Decoder` serves bloomlm's BloomForCausalLM (`make_decoder`; the model side is `decode` and
`static_step` in model.py). `ForwardDecoder` serves any model with BLOOM's forward signature and
tuple caches (transformers' BloomForCausalLM in the parity tests): `ForwardDecoder.wrap(model)`
gives it the same `make_decoder`, so `generate` needs no probing of the model. Steps run under
`no_grad` (not `inference_mode`): returned tensors are ordinary ones, never cloned. Ids are
checked once at the boundary (`generate`, the public forward), never per step.

The compiled step (`compile=True` or a torch.compile mode): the T = 1 step of all rows is one
fixed-shape function (`BloomForCausalLM.static_step`) of (ids [Nb, 1], starts [Nb], valid [Nb, S],
keys, values), compiled once per (row bucket Nb = next power of two >= N, capacity S). The cache
buffers are graph inputs written in place, so a new Decoder of the same shape reuses the compiled
code; padding rows (N < Nb) are dropped from the output. Mode by default: CUDA graphs on a GPU
("reduce-overhead", untested here: no GPU on the development machine); on CPU inductor's
`DEFAULT_CPU_MODE`, chosen by measurement (README, "Compiled decoding"). Compile time is logged
and kept in `decoder.compile_seconds`; where compilation fails the step runs eagerly after one
warning naming the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from bloomlm.alibi import alibi_slopes
from bloomlm.torch.cache import KVCache, LayerPast, bucket, reorder_legacy_cache

logger = logging.getLogger(__name__)

# torch.compile mode of the CPU decode step. Measured at the bloom-560m shape, fp32, 2 threads, on
# a 2-core AVX-512/AMX machine shared with other jobs (load 4-8; benchmarks/compiled_decoding.py):
# generate's tokens/s, eager / default / max-autotune-no-cudagraphs, batch 1: 2.69 / 2.84 / 2.98
# and 2.76 / 2.54 / 2.54 in two runs, batch 8: 7.05 / 7.90 / 8.34 and 8.07 / 8.02 / 8.04; CPU time
# per step, batch 1: 165 / 162 / 163 ms, batch 8: 451 / 445 / 443 ms (freezing the weights into
# the graph, which lets inductor use its packed GEMM templates: 160 and 449 ms). The steps stay
# MKL matmuls either way: no mode is measurably faster than eager here. Cold compile: 246-283 s
# (default) and 74-172 s (max-autotune), warm inductor cache 5-9 s and 3.6-4.6 s; max-autotune is
# never the worse of the two, so it is the default.
DEFAULT_CPU_MODE = "max-autotune-no-cudagraphs"
DEFAULT_CUDA_MODE = "reduce-overhead"


@dataclasses.dataclass
class StepOutput:
    """What a prefill or step returns: logits [N, k, V] of the last k positions; the last hidden
    state [N, k, C] when asked for; per-layer attentions / hidden states when asked for."""

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None


@runtime_checkable
class DecoderSource(Protocol):
    """What `generate` drives: a config and `make_decoder` (bloomlm's BloomForCausalLM, or a
    model wrapped by `ForwardDecoder.wrap`)."""

    config: Any

    def make_decoder(
        self, rows: int, capacity: int, *, compile: bool | str | None = None
    ) -> Any: ...


def decoder_source(model: Any) -> DecoderSource:
    """`model` when it makes its own decoders, else the forward-call adapter around it."""
    return model if isinstance(model, DecoderSource) else ForwardDecoder.wrap(model)


def sample_tokens(
    probs: torch.Tensor, generators: Sequence[torch.Generator | None] | None, num_samples: int = 1
) -> torch.Tensor:
    """torch.multinomial over the rows of `probs` [N, V] -> [N, num_samples]. With `generators`
    (one per row) each row draws from its own, so its tokens do not depend on the other rows."""
    if generators is None:
        return torch.multinomial(probs, num_samples=num_samples)
    draws = [
        torch.multinomial(row[None], num_samples=num_samples, generator=generator)
        for row, generator in zip(probs, generators, strict=True)
    ]
    return torch.cat(draws)


# --------------------------------------------------------------------------------------------------
# bloomlm's decoder
# --------------------------------------------------------------------------------------------------


class Decoder:
    """The step protocol over one KVCache for bloomlm's BloomForCausalLM (see the module doc).

    `capacity` is the most columns a row may use; the cache starts small and grows in
    power-of-two buckets up to it.
    """

    def __init__(self, model: Any, rows: int, capacity: int, *, compile: bool | str = False):
        if rows < 1 or capacity < 1:
            raise ValueError(f"a Decoder needs rows >= 1 and capacity >= 1, got {rows}, {capacity}")
        if compile and getattr(model, "tensor_parallel_mesh", None) is not None:
            # as from_pretrained(compile=) with tp_plan=: the split model's steps run eager
            raise ValueError("compile= cannot be combined with tp_plan= or device_mesh=")
        self.model = model
        self.rows = rows
        self.compiled = _CompiledStep.for_model(model, compile) if compile else None
        cache_rows = 1 << (rows - 1).bit_length() if self.compiled is not None else rows
        config, device, base = model.config, model.device, model.base_model
        # Under tensor parallelism the model computes its rank's heads, with their global slopes.
        self.cache = KVCache.for_config(config, cache_rows, bucket(1, capacity), model.dtype,
                                        device, limit=capacity, n_head=base.num_heads)  # fmt: skip
        slopes = base.alibi_slopes
        slopes = torch.from_numpy(alibi_slopes(config.n_head)) if slopes is None else slopes
        self.slopes = slopes.to(device)
        self._step_ids = torch.zeros(cache_rows, 1, dtype=torch.long, device=device)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling the step for this decoder's shapes (0 when none was needed)."""
        return self.compiled.seconds if self.compiled is not None else 0.0

    @torch.no_grad()
    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        num_logits: int = 1,
        hidden: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> StepOutput:
        """Append T tokens to every row: ids [N, T] (or their `inputs_embeds` [N, T, C], e.g. a
        soft prompt's), `mask` [N, T] marks left padding (default: none). Every row must be at the
        same length (a fresh decoder, or after `crop`)."""
        flags = (num_logits, hidden, output_attentions, output_hidden_states)
        return self._run(slice(0, self.rows), ids, mask, *flags, inputs_embeds)

    @torch.no_grad()
    def step(
        self,
        ids: torch.Tensor,
        *,
        num_logits: int = 1,
        hidden: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> StepOutput:
        """Every row advances by T = ids.shape[1] tokens (1 when decoding, more to verify
        drafts). The compiled step serves T = 1 when nothing but the logits is asked for."""
        plain = num_logits == 1 and not (hidden or output_attentions or output_hidden_states)
        if self.compiled is not None and ids.shape[1] == 1 and plain:
            logits = self._compiled_step(ids)
            if logits is not None:
                return StepOutput(logits[:, None])
        flags = (num_logits, hidden, output_attentions, output_hidden_states)
        return self._run(slice(0, self.rows), ids, None, *flags)

    @torch.no_grad()
    def step_rows(self, ids: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """One token per row (ids [n]) for the rows `rows` (default the first n), each written at
        its own next column: rows may be at different lengths. Returns logits [n, V]."""
        rows = slice(0, ids.shape[0]) if rows is None else rows
        self._check_rows(rows, ids.shape[0])
        write = self.cache.open(rows, torch.ones_like(ids[:, None], dtype=torch.bool))
        valid = self.cache.valid[rows, : write.read]
        return self.model.decode(ids[:, None], write, valid).logits[:, 0]

    @torch.no_grad()
    def fill(
        self, row: int, ids: torch.Tensor, *, num_logits: int = 1, hidden: bool = False
    ) -> StepOutput:
        """Reset `row` and prefill it alone with ids [T] (a new request in a freed slot)."""
        self.reset(row)
        return self.extend(row, ids, num_logits=num_logits, hidden=hidden)

    @torch.no_grad()
    def extend(
        self, row: int, ids: torch.Tensor, *, num_logits: int = 1, hidden: bool = False
    ) -> StepOutput:
        """Append ids [T] to `row` alone, after the columns it holds (a prompt prefilled in
        chunks: `fill` with the first chunk, `extend` with the next ones)."""
        self._check_rows(slice(row, row + 1), 1)
        return self._run(slice(row, row + 1), ids[None], None, num_logits, hidden, False, False)

    def reset(self, row: int) -> None:
        self._check_rows(slice(row, row + 1), 1)
        self.cache.reset(row)

    def copy_row(self, source: int, target: int, *, decoder: Decoder | None = None) -> None:
        """Row `target` becomes a copy of row `source` of `decoder` (default: this one)."""
        decoder = self if decoder is None else decoder
        decoder._check_rows(slice(source, source + 1), 1)
        self._check_rows(slice(target, target + 1), 1)
        self.cache.copy_row(source, target, cache=decoder.cache)

    def grow_rows(self, rows: int) -> None:
        """Room for `rows` sequences (more than now; the new rows are empty). Eager decoders
        only: the compiled step is specialised to its row bucket."""
        if self.compiled is not None:
            raise ValueError("a compiled Decoder keeps its rows; make a new one to have more")
        if rows > self.rows:
            self.cache.grow_rows(rows)
            self._step_ids = self._step_ids.new_zeros(rows, 1)
            self.rows = rows

    def crop(self, length: int) -> None:
        """Forget every token from column `length` on, in every row."""
        self.cache.crop(length)

    def reorder(self, rows: torch.Tensor, *, masks: bool = True) -> None:
        """Row i becomes a copy of row rows[i] (beam search); `masks=False` keeps each row's
        padding mask in place, as transformers' beam search does."""
        rows = rows.to(self.cache.keys.device)
        if self.cache.rows > self.rows:  # the compiled step's padding rows stay where they are
            padding = torch.arange(self.rows, self.cache.rows, device=rows.device)
            rows = torch.cat([rows, padding])
        self.cache.reorder(rows, masks=masks)

    def legacy_cache(self) -> tuple[LayerPast, ...]:
        """BLOOM's tuple layout of the used columns, as transformers returns its cache."""
        return self.cache.to_legacy(slice(0, self.rows))

    def _run(self, rows, ids, mask, num_logits, hidden, output_attentions, output_hidden_states,
             inputs_embeds=None):  # fmt: skip
        if mask is None:
            shape = (ids if inputs_embeds is None else inputs_embeds).shape[:2]
            mask = torch.ones(shape, dtype=torch.bool, device=self.cache.valid.device)
        write = self.cache.open(rows, mask)
        valid = self.cache.valid[rows, : write.read]
        return self.model.decode(ids, write, valid, num_logits=num_logits, hidden=hidden,
                                 output_attentions=output_attentions,
                                 output_hidden_states=output_hidden_states,
                                 inputs_embeds=inputs_embeds)  # fmt: skip

    def _compiled_step(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Logits [N, V] from the compiled step, or None when it could not be compiled."""
        cache = self.cache
        if cache.used + 1 > cache.capacity:
            cache.grow(bucket(cache.used + 1, cache.limit))
        # One input buffer (padding rows stay 0): the compiled code is specialised to strides,
        # and a caller's [N, 1] view of a longer id buffer has other strides than a fresh tensor.
        self._step_ids[: self.rows] = ids
        args = (self._step_ids, cache.positions, cache.valid, cache.keys, cache.values, self.slopes)
        logits = self.compiled(*args)
        if logits is None:
            self.compiled = None
            return None
        cache.positions += 1
        cache.lengths = [n + 1 for n in cache.lengths]
        return logits[: self.rows]

    def _check_rows(self, rows: slice, count: int) -> None:
        covered = range(self.rows)[rows]
        inside = rows.start is None or 0 <= rows.start < self.rows
        inside = inside and (rows.stop is None or rows.stop <= self.rows)
        if not inside or covered.step != 1 or len(covered) != count:
            raise ValueError(
                f"rows {rows} must be a contiguous slice of {count} of the decoder's "
                f"{self.rows} rows"
            )


# --------------------------------------------------------------------------------------------------
# The compiled step
# --------------------------------------------------------------------------------------------------

# One torch.compile'd `static_step` per (model class, mode); dynamo keeps a graph per shape and
# per model under it. Models whose compilation failed decode eagerly from then on.
_COMPILED_FUNCTIONS: dict[tuple[type, str], Any] = {}
_FAILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MAX_GRAPHS = 64  # dynamo's recompile limit (8 by default) would fall back to eager silently


class _CompiledStep:
    """A model's compiled `static_step` in one mode. A call that compiles (a new shape, or a
    changed model) is timed and logged; one that fails to compile returns None after one
    warning, and the model decodes eagerly from then on."""

    def __init__(self, model: Any, mode: str):
        self.model, self.mode = model, mode
        key = (type(model), mode)
        if key not in _COMPILED_FUNCTIONS:
            function = type(model).static_step
            _COMPILED_FUNCTIONS[key] = torch.compile(
                function, mode=mode, fullgraph=True, dynamic=False
            )
        self.function = _COMPILED_FUNCTIONS[key]
        self.seconds = 0.0

    @classmethod
    def for_model(cls, model: Any, compile: bool | str) -> _CompiledStep | None:
        if model in _FAILED:
            return None
        if compile is True:
            compile = DEFAULT_CUDA_MODE if model.device.type == "cuda" else DEFAULT_CPU_MODE
        return cls(model, compile)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor | None:
        stats = torch._dynamo.utils.counters["stats"]
        graphs, start = stats["unique_graphs"], time.perf_counter()
        try:
            with torch._dynamo.config.patch(recompile_limit=_MAX_GRAPHS):
                logits = self.function(self.model, *args)
        except Exception as error:  # no compiler, an op inductor cannot lower, ...
            inner = error.__cause__ or getattr(error, "inner_exception", None)
            while inner is not None and inner is not error:  # the compiler's error, not dynamo's
                error, inner = inner, inner.__cause__ or getattr(inner, "inner_exception", None)
            reason = f"{type(error).__name__}: {(str(error).strip() or '?').splitlines()[0][:300]}"
            _FAILED[self.model] = reason
            warnings.warn(
                f"the compiled decode step is unavailable ({reason}); decoding runs eagerly",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        if stats["unique_graphs"] > graphs:  # this call compiled a graph
            seconds = time.perf_counter() - start
            self.seconds += seconds
            rows, capacity = args[0].shape[0], args[3].shape[3]
            logger.info("compiled the decode step (%s, %d rows x %d columns) in %.1f s",
                        self.mode, rows, capacity, seconds)  # fmt: skip
        return logits


# --------------------------------------------------------------------------------------------------
# Any model with BLOOM's forward signature
# --------------------------------------------------------------------------------------------------


class ForwardDecoder:
    """The step protocol over a model's own forward call with BLOOM's signature and tuple caches
    (`model(input_ids=, past_key_values=, attention_mask=, use_cache=True, return_dict=True)`
    returning `.logits` [N, T, V] and `.past_key_values`). The attention mask is a preallocated
    buffer; per-row columns (`fill`, `step_rows`, `reset`) need a KVCache and are not offered."""

    def __init__(self, model: Any, rows: int, capacity: int, device: torch.device | None = None):
        self.model, self.rows = model, rows
        self.mask = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        self.length = 0
        self.past: Any = None

    @staticmethod
    def wrap(model: Any) -> ForwardModel:
        """`model` with `make_decoder` (and its config, generation config and device)."""
        return ForwardModel(model)

    @torch.no_grad()
    def prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        num_logits: int = 1,
        hidden: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> StepOutput:
        T = (ids if inputs_embeds is None else inputs_embeds).shape[1]
        self.mask[:, self.length : self.length + T] = 1 if mask is None else mask
        self.length += T
        extra = {"output_attentions": True} if output_attentions else {}
        if output_hidden_states or hidden:
            extra["output_hidden_states"] = True
        inputs = {"input_ids": ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        out = self.model(**inputs, past_key_values=self.past,
                         attention_mask=self.mask[:, : self.length], use_cache=True,
                         return_dict=True, **extra)  # fmt: skip
        self.past = out.past_key_values
        return StepOutput(
            out.logits[:, -num_logits:],
            out.hidden_states[-1][:, -num_logits:] if hidden else None,
            out.attentions if output_attentions else None,
            out.hidden_states if output_hidden_states else None,
        )

    def step(self, ids: torch.Tensor, **flags: Any) -> StepOutput:
        return self.prefill(ids, None, **flags)

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)
        if self.past is not None:
            self.past = tuple((k[..., :length], v[:, :length]) for k, v in self.past)
            if length == 0:
                self.past = None

    def reorder(self, rows: torch.Tensor, *, masks: bool = True) -> None:
        if self.past is not None:
            self.past = reorder_legacy_cache(self.past, rows)
        if masks:
            self.mask = self.mask[rows.to(self.mask.device)]

    def legacy_cache(self) -> Any:
        return self.past

    def fill(self, row: int, ids: torch.Tensor, **flags: Any) -> StepOutput:
        raise NotImplementedError("ForwardDecoder cannot fill one row: use bloomlm's model")

    def step_rows(self, ids: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        raise NotImplementedError("ForwardDecoder has no per-row columns: use bloomlm's model")

    def reset(self, row: int) -> None:
        raise NotImplementedError("ForwardDecoder cannot reset one row: use bloomlm's model")


class ForwardModel:
    """A forward-call model made a DecoderSource (what `ForwardDecoder.wrap` returns)."""

    def __init__(self, model: Any):
        self.model = model
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)  # optional in models
        device = getattr(model, "device", None)
        if not isinstance(device, torch.device) and isinstance(model, torch.nn.Module):
            device = next((p.device for p in model.parameters()), None)
        self.device = device if isinstance(device, torch.device) else None

    def make_decoder(
        self, rows: int, capacity: int, *, compile: bool | str | None = None
    ) -> ForwardDecoder:
        if compile:
            warnings.warn(
                f"compile={compile!r} needs bloomlm's BloomForCausalLM; "
                f"{type(self.model).__name__} decodes eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
        return ForwardDecoder(self.model, rows, capacity, self.device)


__all__ = [
    "Decoder",
    "DecoderSource",
    "ForwardDecoder",
    "ForwardModel",
    "StepOutput",
    "decoder_source",
    "sample_tokens",
]

"""The key/value cache of the PyTorch model and the attention bias built from it.

`KVCache` is one preallocated, fixed-shape buffer pair for all layers, indexed by position, with
per-row bookkeeping. Every cached call (`generate`'s decoder, a public forward given a cache)
writes into it in place; BLOOM's tuple layout (`LayerPast` per layer: key (B * H, D, S), value
(B * H, S, D)), the layout transformers' API takes and returns, is converted once per public call
at the boundary (`from_legacy`, `to_legacy`), never per layer.

Notation: L layers, N rows, H heads (local heads under tensor parallelism: shard `keys` and `values`
on dim 2), S capacity (columns), D head dim, T new tokens per row.

    keys, values  [L, N, H, S, D]   model dtype and device, zero-filled once
    valid         bool [N, S]       column s of row n holds a real token (False: left padding,
                                    unused columns)
    lengths       list[int]         columns in use per row (host ints); a row's next token goes to
                                    column lengths[n]. `positions` is their device mirror, for the
                                    compiled step (no host sync).

A call opens a `CacheWrite` over a contiguous slice of rows (views, never copies): every layer then
writes its T new keys/values through it and reads the keys to attend to. All rows of the slice at
the same length (prefill, `generate`): slice writes. Rows at different lengths (continuous
batching, T == 1): one advanced-index write per layer, each row at its own column.

The attention bias (ALiBi and visibility) is built once per call from `valid`, not per layer:
ALiBi's key positions are `cumsum(valid) - 1` over the row (left padding is invisible, as with
transformers' mask cumsum), and query t of row n sees column s when valid[n, s] and
s <= start[n] + t.

Capacity grows in power-of-two buckets (`bucket`) up to a limit, so a short answer to a large
`max_new_tokens` costs little memory and every capacity is one fixed shape for the compiled step.
"""

from __future__ import annotations

import dataclasses

import torch

from bloomlm.alibi import alibi_slopes
from bloomlm.config import BloomConfig
from bloomlm.torch import checks

LayerPast = tuple[torch.Tensor, torch.Tensor]

MIN_BUCKET = 16  # the smallest capacity a cache is given: below it, growth costs more than memory


def bucket(columns: int, limit: int) -> int:
    """The capacity for `columns`: the next power of two (at least MIN_BUCKET), at most `limit`."""
    if columns > limit:
        raise ValueError(f"{columns} cache columns are needed but the limit is {limit}")
    return min(limit, max(MIN_BUCKET, 1 << (columns - 1).bit_length()))


# --------------------------------------------------------------------------------------------------
# Attention bias
# --------------------------------------------------------------------------------------------------


def build_alibi(
    attention_mask: torch.Tensor,
    n_head: int,
    dtype: torch.dtype,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """ALiBi bias (N * H, 1, S): slope[h] * position of key s, counted over kept tokens only.

    `attention_mask` [N, S] (0/1 or bool) marks the kept keys; `slopes` [H] (float32) saves
    rebuilding them (the compiled step passes them in).
    """
    batch_size, key_length = attention_mask.shape
    if slopes is None:
        slopes = torch.from_numpy(alibi_slopes(n_head)).to(attention_mask.device)
    mask = attention_mask.long()
    positions = ((mask.cumsum(dim=-1) - 1) * mask)[:, None, :]  # (N, 1, S)
    alibi = slopes[None, :, None] * positions  # (N, H, S)
    return alibi.reshape(batch_size * n_head, 1, key_length).to(dtype)


def build_causal_mask(
    attention_mask: torch.Tensor, query_length: int, query_start: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask (N, 1, T, S), True where a query may NOT look: later columns and padding.

    Query t of row n sits at column query_start[n] + t and sees columns 0 .. query_start[n] + t;
    by default the T queries are the last T columns (a cache of S - T tokens before them).
    """
    _, key_length = attention_mask.shape
    device = attention_mask.device
    offsets = torch.arange(query_length, device=device)
    if query_start is None:
        query_pos = (offsets + key_length - query_length)[None, :]  # (1, T)
    else:
        query_pos = query_start[:, None] + offsets[None, :]  # (N, T)
    key_pos = torch.arange(key_length, device=device)
    later = key_pos[None, None, :] > query_pos[:, :, None]  # (N or 1, T, S)
    padding = attention_mask[:, None, None, :] == 0  # (N, 1, 1, S)
    return later[:, None] | padding


def attention_bias(
    alibi: torch.Tensor, causal_mask: torch.Tensor, n_head: int, dtype: torch.dtype
) -> torch.Tensor:
    """ALiBi and masking as one additive bias (N, H, T, S) for the fused attention path.

    Masked entries get dtype's lowest value, not -inf: a query that sees nothing (a padding row)
    then gets uniform weights, as in transformers' eager path, instead of NaN.
    """
    batch_size = causal_mask.shape[0]
    bias = alibi.view(batch_size, n_head, 1, -1).to(dtype)
    return bias.masked_fill(causal_mask, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer, preallocated and written in place (see the module doc).

    `limit` is the most columns `grow` may reach (default: `capacity`).
    """

    def __init__(
        self,
        n_layer: int,
        rows: int,
        n_head: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        limit: int | None = None,
    ):
        shape = (n_layer, rows, n_head, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.lengths = [0] * rows
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.limit = capacity if limit is None else max(limit, capacity)

    @classmethod
    def for_config(
        cls,
        config: BloomConfig,
        rows: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        limit: int | None = None,
        n_head: int | None = None,  # a rank's heads under tensor parallelism
    ) -> KVCache:
        n_head = config.n_head if n_head is None else n_head
        return cls(config.n_layer, rows, n_head, config.head_dim, capacity, dtype=dtype,
                   device=device, limit=limit)  # fmt: skip

    @property
    def rows(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def used(self) -> int:
        """Columns in use by the longest row."""
        return max(self.lengths)

    # -- writing ----------------------------------------------------------------------------

    def open(self, rows: slice, new_valid: torch.Tensor) -> CacheWrite:
        """Reserve T = new_valid.shape[1] columns for each row of `rows` and mark them with
        `new_valid` [n, T] (a prompt's attention mask; ones for generated tokens), growing the
        buffer if needed. Returns the CacheWrite the layers write through."""
        lengths = self.lengths[rows]
        T = new_valid.shape[1]
        first = range(self.rows)[rows]
        end = max(lengths) + T
        if end > self.capacity:
            self.grow(bucket(end, self.limit))
        if min(lengths) == max(lengths):
            start = lengths[0]
            self.valid[rows, start : start + T] = new_valid.bool()
            write = CacheWrite(self.keys, self.values, rows, end, start=start)
        else:
            if T != 1:
                raise ValueError(
                    f"rows at different lengths {lengths} take one new token each, got {T}"
                )
            starts = self.positions[rows]
            index = torch.arange(len(first), device=starts.device)
            self.valid[rows][index, starts] = new_valid[:, 0].bool()
            write = CacheWrite(self.keys, self.values, rows, end, starts=starts.clone())
        for n in first:
            self.lengths[n] += T
        self.positions[rows] += T
        return write

    def grow(self, capacity: int) -> None:
        """Copy into a buffer of `capacity` columns (more than now, at most `limit`)."""
        if capacity > self.limit:
            raise ValueError(
                f"the cache may hold at most {self.limit} columns per row, "
                f"{capacity} were asked for"
            )
        if capacity <= self.capacity:
            return
        old = self.capacity
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            bigger = tensor.new_zeros(*tensor.shape[:3], capacity, tensor.shape[4])
            bigger[:, :, :, :old] = tensor
            setattr(self, name, bigger)
        valid = self.valid.new_zeros(self.rows, capacity)
        valid[:, :old] = self.valid
        self.valid = valid

    # -- editing ----------------------------------------------------------------------------

    def crop(self, length: int) -> None:
        """Forget every column from `length` on (rejected draft tokens), in every row."""
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        self.lengths = [min(n, length) for n in self.lengths]
        self.valid[:, length:] = False
        self.positions.clamp_(max=length)

    def reset(self, row: int) -> None:
        """Empty one row (its slot is reused for a new sequence); other rows are untouched."""
        self.lengths[row] = 0
        self.valid[row] = False
        self.positions[row] = 0

    def copy_row(self, source: int, target: int, *, cache: KVCache | None = None) -> None:
        """Row `target` becomes a copy of row `source` of `cache` (default: this one): its used
        columns, mask and length; other rows are untouched. Continuous batching copies a prompt
        prefilled once into a row per continuation, and moves a running row down into a freed
        one so the running rows stay contiguous."""
        cache = self if cache is None else cache
        if cache is self and source == target:
            return
        used = cache.lengths[source]
        if used > self.capacity:
            self.grow(bucket(used, self.limit))
        self.keys[:, target, :, :used] = cache.keys[:, source, :, :used]
        self.values[:, target, :, :used] = cache.values[:, source, :, :used]
        self.valid[target] = False
        self.valid[target, :used] = cache.valid[source, :used]
        self.lengths[target] = used
        self.positions[target] = used

    def grow_rows(self, rows: int) -> None:
        """Copy into buffers of `rows` rows (more than now): the new rows are empty. A server
        grows its cache with its load instead of allocating its largest batch up front."""
        if rows <= self.rows:
            return
        extra = rows - self.rows
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            more = tensor.new_zeros(tensor.shape[0], extra, *tensor.shape[2:])
            setattr(self, name, torch.cat([tensor, more], dim=1))
        self.valid = torch.cat([self.valid, self.valid.new_zeros(extra, self.capacity)])
        self.positions = torch.cat([self.positions, self.positions.new_zeros(extra)])
        self.lengths = self.lengths + [0] * extra

    def reorder(self, rows: torch.Tensor, *, masks: bool = True) -> None:
        """Row i becomes a copy of row rows[i] (beam search), in place (the buffers keep their
        storage). `masks=False` keeps each row's `valid` where it is, as transformers' beam search
        keeps its attention mask (rows are then assumed to be at the same length)."""
        rows = rows.to(self.keys.device)
        self.keys.copy_(self.keys.index_select(1, rows))
        self.values.copy_(self.values.index_select(1, rows))
        if masks:
            self.valid.copy_(self.valid.index_select(0, rows))
            self.positions.copy_(self.positions.index_select(0, rows))
            order = rows.tolist()
            self.lengths = [self.lengths[i] for i in order]

    # -- BLOOM's tuple layout ----------------------------------------------------------------

    def to_legacy(self, rows: slice = slice(None)) -> tuple[LayerPast, ...]:
        """BLOOM's tuples of the used columns of `rows`. Rows of different lengths keep the common
        column layout: a shorter row's unused columns are zeros, masked by the caller's mask."""
        S = max(self.lengths[rows])
        keys, values = self.keys[:, rows, :, :S], self.values[:, rows, :, :S]
        _, N, H, _, D = keys.shape
        return tuple(
            (k.transpose(-1, -2).reshape(N * H, D, S), v.reshape(N * H, S, D))
            for k, v in zip(keys, values)
        )

    @classmethod
    def from_legacy(
        cls,
        past: tuple[LayerPast, ...],
        attention_mask: torch.Tensor,
        n_head: int,
        capacity: int | None = None,
    ) -> KVCache:
        """A cache holding `past` (BLOOM's tuples), whose columns `attention_mask` [N, P] marks,
        with room for `capacity` columns (default P)."""
        rows_heads, D, P = past[0][0].shape
        N = rows_heads // n_head
        key0 = past[0][0]
        cache = cls(len(past), N, n_head, D, max(P, capacity or P), dtype=key0.dtype,
                    device=key0.device)  # fmt: skip
        for i, (key, value) in enumerate(past):
            cache.keys[i, :, :, :P] = key.view(N, n_head, D, P).transpose(-1, -2)
            cache.values[i, :, :, :P] = value.view(N, n_head, P, D)
        cache.valid[:, :P] = attention_mask.to(cache.valid.device).bool()
        cache.lengths = [P] * N
        cache.positions.fill_(P)
        return cache


class CacheWrite:
    """One call's writes into a cache: which rows, at which columns, and how many columns its
    queries read. Built by `KVCache.open` (eager calls) or directly on the buffers (the compiled
    step: per-row `starts`, `read` = the whole capacity)."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: slice,
        read: int,
        *,
        start: int | None = None,
        starts: torch.Tensor | None = None,
    ):
        self.keys, self.values, self.rows, self.read = keys, values, rows, read
        self.start, self.starts = start, starts

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys and values (n, H, T, D); return the keys and values the
        queries attend to (n, H, read, D)."""
        T = key.shape[2]
        if self.starts is None:
            columns = slice(self.start, self.start + T)
            self.keys[layer, self.rows, :, columns] = key
            self.values[layer, self.rows, :, columns] = value
            if self.start == 0 and self.read == T:  # nothing cached before: the call's own keys
                return key, value
        else:
            # One index_put_ on the whole buffer (not on a view of it): the compiled step then
            # writes in place instead of copying the layer's cache around the write.
            n, H = key.shape[:2]
            rows = torch.arange(n, device=key.device) + (self.rows.start or 0)
            heads = torch.arange(H, device=key.device)
            index = (
                rows.new_full((n, 1), layer),
                rows[:, None],
                heads[None, :],
                self.starts[:, None],
            )
            self.keys.index_put_(index, key[:, :, 0])
            self.values.index_put_(index, value[:, :, 0])
        keys, values = self.keys[layer, self.rows], self.values[layer, self.rows]
        keys, values = keys[:, :, : self.read], values[:, :, : self.read]
        if keys.requires_grad:
            # autograd saves what attention reads; the next layer's write into the same buffer
            # would invalidate a view, so recording calls read a copy (as transformers' torch.cat)
            return keys.clone(), values.clone()
        return keys, values

    def query_start(self) -> torch.Tensor | None:
        """Per-row column of the first query (None: the last T of the `read` columns)."""
        return self.starts


@dataclasses.dataclass
class AttentionInputs:
    """What every layer's attention shares in one call, built once (not once per layer)."""

    eager: bool
    blocked: torch.Tensor  # (N, 1, T, S) bool, True where a query may not look
    alibi: torch.Tensor | None = None  # eager path: (N * H, 1, S)
    bias: torch.Tensor | None = None  # fused path: (N, H, T, S), ALiBi and masking in one
    write: CacheWrite | None = None  # where the layers write keys/values; what they read

    @classmethod
    def build(
        cls,
        valid: torch.Tensor,
        query_length: int,
        n_head: int,
        dtype: torch.dtype,
        *,
        eager: bool,
        write: CacheWrite | None = None,
        slopes: torch.Tensor | None = None,
    ) -> AttentionInputs:
        """`valid` [N, S]: the key columns holding real tokens (the attention mask)."""
        alibi = build_alibi(valid, n_head, dtype, slopes)
        query_start = write.query_start() if write is not None else None
        blocked = build_causal_mask(valid, query_length, query_start)
        if eager:
            return cls(True, blocked, alibi=alibi, write=write)
        return cls(False, blocked, bias=attention_bias(alibi, blocked, n_head, dtype), write=write)


def call_cache(
    config: BloomConfig,
    past_key_values: tuple[LayerPast, ...] | KVCache | None,
    attention_mask: torch.Tensor | None,
    hidden_states: torch.Tensor,
    use_cache: bool,
    n_head: int | None = None,
) -> tuple[KVCache | None, torch.Tensor, CacheWrite | None]:
    """For one public forward call (hidden_states [B, T, C]): the cache it writes (None: no cache
    in or out), the key columns' mask [B, S], and the call's CacheWrite. BLOOM's tuples are
    converted here, once per call, never in the layers. `n_head`: the heads the model computes
    (a rank's H / N under tensor parallelism; default config.n_head)."""
    B, T = hidden_states.shape[:2]
    n_head = config.n_head if n_head is None else n_head
    if isinstance(past_key_values, KVCache):
        past_length = checks.check_kv_cache(past_key_values, B, T)
    else:
        past_length = checks.check_past(config, past_key_values, B, n_head)
    if attention_mask is None:
        attention_mask = torch.ones((B, past_length + T), device=hidden_states.device)
    else:
        checks.check_attention_mask(attention_mask, B, past_length, T)
        attention_mask = attention_mask.to(hidden_states.device)
    cache = past_key_values
    if isinstance(past_key_values, tuple | list):
        past_mask = attention_mask[:, :past_length]
        cache = KVCache.from_legacy(past_key_values, past_mask, n_head, past_length + T)
    elif cache is None and use_cache:
        dtype, device = hidden_states.dtype, hidden_states.device
        cache = KVCache.for_config(config, B, T, dtype, device, n_head=n_head)
    if cache is None:
        return None, attention_mask, None
    write = cache.open(slice(None), attention_mask[:, past_length:])
    return cache, cache.valid[:, : write.read], write


def reorder_legacy_cache(
    past: tuple[LayerPast, ...], beam_idx: torch.LongTensor
) -> tuple[LayerPast, ...]:
    """Row i of the result is batch row beam_idx[i] of `past` (beam search), in BLOOM's layout:
    a batch row is H consecutive rows of the leading B * H dimension."""
    batch_size = beam_idx.numel()

    def select(tensor: torch.Tensor) -> torch.Tensor:
        rows = tensor.view(batch_size, -1, *tensor.shape[1:])  # (B * H, ...) -> (B, H, ...)
        return rows.index_select(0, beam_idx.to(tensor.device)).view(tensor.shape)

    return tuple((select(key), select(value)) for key, value in past)

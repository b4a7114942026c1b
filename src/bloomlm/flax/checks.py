"""Input checks at the Flax API boundary: each raises ValueError saying what came in and what is
allowed.

Shapes are static, so they are checked even under a user's `jax.jit`. Values (ids inside the
vocabulary, 0/1 masks, room left in the cache) can only be read from concrete arrays; under jit the
arrays are tracers and these checks are skipped (the model then marks the damage with NaN instead,
see `pretrained`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bloomlm.config import BloomConfig


def is_concrete(array: Any) -> bool:
    return not isinstance(array, jax.core.Tracer)


def _as_array(value: Any) -> Any:
    """NumPy for concrete non-jax inputs (lists, torch tensors),
    jax arrays and tracers untouched."""
    return np.asarray(value) if is_concrete(value) and not isinstance(value, jax.Array) else value


def check_input_ids(input_ids: Any, vocab_size: int) -> jax.Array:
    """int32 [B, T] ids; concrete ids must lie in [0, vocab_size)."""
    if input_ids is None:
        raise ValueError("input_ids is required: integer token ids of shape [batch, seq]")
    input_ids = _as_array(input_ids)
    if input_ids.ndim != 2 or 0 in input_ids.shape:
        raise ValueError(
            f"input_ids must have shape [batch, seq] with both > 0, got {tuple(input_ids.shape)}"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if is_concrete(input_ids):
        values = np.asarray(input_ids)
        bad = values[(values < 0) | (values >= vocab_size)]
        if bad.size:
            raise ValueError(
                f"input_ids holds ids outside the vocabulary [0, {vocab_size}): "
                f"{sorted(set(bad.tolist()))[:10]}"
            )
    return jnp.asarray(input_ids, jnp.int32)


@dataclass(frozen=True)
class CacheInfo:
    stacked: bool  # layers stacked under one `h/self_attention` (scan_layers) or `h/<i>/...`
    length: int  # slots per row (max_length)
    index: Any  # positions written so far: an int when concrete, else a tracer


# Over 40 lines: one check per cache property, each naming what was wrong.
def check_cache(
    cache: Any, config: BloomConfig, prefix: str | None, batch_size: int, new_tokens: int
) -> CacheInfo:
    """A cache from init_cache (either layer layout) that fits these inputs and has room for them.

    `prefix` is "transformer" for the heads (their cache sits under it), None for the base model.
    """
    body = cache.get(prefix) if prefix and isinstance(cache, Mapping) else cache
    if not isinstance(body, Mapping) or not isinstance(body.get("h"), Mapping):
        where = f"'{prefix}/h'" if prefix else "'h'"
        raise ValueError(
            f"past_key_values must be a cache made by init_cache (a tree with {where})"
        )
    layers = body["h"]
    stacked = "0" not in layers
    layer = layers.get("self_attention", {}) if stacked else layers["0"].get("self_attention", {})
    key, index = layer.get("cached_key"), layer.get("cache_index")
    count = (np.shape(key)[0] if key is not None else 0) if stacked else len(layers)
    if key is None or index is None or count != config.n_layer:
        raise ValueError(
            f"past_key_values must hold a cache for {config.n_layer} layers (from init_cache); "
            f"got {count}"
        )
    key_shape = tuple(np.shape(key))[1:] if stacked else tuple(np.shape(key))
    if len(key_shape) != 4 or key_shape != (
        batch_size,
        key_shape[1],
        config.n_head,
        config.head_dim,
    ):
        raise ValueError(
            f"past_key_values holds keys of shape {key_shape}; for these input_ids and this config "
            f"[batch={batch_size}, max_length, n_head={config.n_head}, head_dim={config.head_dim}] "
            "is needed"
        )
    index = index[0] if stacked else index
    if is_concrete(index):
        index = int(index)
        if index + new_tokens > key_shape[1]:
            raise ValueError(
                f"the cache is too short: it holds {index} positions of {key_shape[1]} and "
                f"{new_tokens} new tokens do not fit; make it with "
                "init_cache(batch_size, max_length) for a larger max_length"
            )
    return CacheInfo(stacked=stacked, length=key_shape[1], index=index)


def check_attention_mask(
    attention_mask: Any, batch_size: int, new_tokens: int, cache: CacheInfo | None
) -> jax.Array:
    """int32 [B, S]: ones when None. With a cache, S is past + new or the full cache length;
    else S = T."""
    if attention_mask is None:
        return jnp.ones((batch_size, cache.length if cache else new_tokens), jnp.int32)
    attention_mask = _as_array(attention_mask)
    shape = tuple(attention_mask.shape)
    if cache is None:
        allowed = f"[{batch_size}, {new_tokens}] (the shape of input_ids)"
        ok = shape == (batch_size, new_tokens)
    else:
        past = cache.index if isinstance(cache.index, int) else None
        lengths = {cache.length} | (
            {past + new_tokens} if past is not None else set(range(new_tokens, cache.length + 1))
        )
        allowed = f"[{batch_size}, past + new]" + (
            f" = [{batch_size}, {past + new_tokens}]" if past is not None else ""
        )
        allowed += f" or the full cache length [{batch_size}, {cache.length}]"
        ok = len(shape) == 2 and shape[0] == batch_size and shape[1] in lengths
    if not ok:
        raise ValueError(f"attention_mask has shape {shape}; allowed: {allowed}")
    if is_concrete(attention_mask) and not np.isin(np.asarray(attention_mask), (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    return jnp.asarray(attention_mask, jnp.int32)

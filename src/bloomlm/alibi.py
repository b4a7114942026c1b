"""ALiBi, framework-free: the per-head slopes and the key positions BLOOM multiplies them by.

BLOOM has no position embeddings. Each head h adds `slope[h] * position(key)` to its attention
scores, and since softmax ignores a constant per query row, that equals a penalty proportional to
the distance between query and key. Positions count only real tokens, so a left-padded row scores
exactly like the same row without padding:

    attention_mask   0 0 1 1 1        (two pads on the left)
    key positions    0 0 0 1 2        = (cumsum(mask) - 1) * mask

The torch and JAX models build their bias from these two functions (through their own array ops).
"""

from __future__ import annotations

import math

import numpy as np


def alibi_slopes(n_head: int) -> np.ndarray:
    """Slopes of the ALiBi paper as BLOOM computes them, float32, shape (n_head,).

    For a power of two n, slope[i] = 2 ** (-8 (i + 1) / n). Other head counts take the slopes of the
    nearest lower power of two, then every other slope of the next power of two.
    """
    if n_head < 1:
        raise ValueError(f"n_head must be positive, got {n_head}")
    closest_power_of_2 = 2 ** math.floor(math.log2(n_head))
    # The base is rounded to float32 as BLOOM does; the power is taken in float64 and rounded once:
    # torch's float32 `pow` on its reference CPU kernel, bit for bit. Its SIMD kernels miss by one
    # ulp for some heads, so transformers' own slopes vary that much with the CPU (test_alibi.py).
    base = np.float64(np.float32(2 ** (-(2 ** -(math.log2(closest_power_of_2) - 3)))))
    slopes = base ** np.arange(1, 1 + closest_power_of_2, dtype=np.float64)
    if closest_power_of_2 != n_head:
        extra_base = np.float64(np.float32(2 ** (-(2 ** -(math.log2(2 * closest_power_of_2) - 3)))))
        n_remaining = min(closest_power_of_2, n_head - closest_power_of_2)
        extra_powers = np.arange(1, 1 + 2 * n_remaining, 2, dtype=np.float64)
        slopes = np.concatenate([slopes, extra_base**extra_powers])
    return slopes.astype(np.float32)


def alibi_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Key positions (batch, kv_len): 0, 1, 2, ... over the kept tokens, 0 on padding."""
    mask = np.asarray(attention_mask)
    return (np.cumsum(mask, axis=-1) - 1) * mask


def alibi_bias(attention_mask: np.ndarray, n_head: int) -> np.ndarray:
    """Reference bias (batch, n_head, 1, kv_len) = slope[h] * position[b, k]."""
    positions = alibi_positions(attention_mask).astype(np.float32)
    return alibi_slopes(n_head)[None, :, None, None] * positions[:, None, None, :]

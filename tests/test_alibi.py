"""ALiBi and the attention masks: the NumPy reference in `bloomlm.alibi` is the specification.

The PyTorch builders (`torch/model.py`: build_alibi, build_causal_mask, attention_bias) and the JAX
one (`flax/model.py`: build_attention_bias, bias and visibility together) must equal it exactly,
and the slopes must equal transformers 4.37's bit for bit for every head count 1..128 (powers of
two and not: the second branch interleaves the next power's slopes).

transformers takes the slopes as `torch.pow(float32 base, powers)`. torch's reference CPU kernel
rounds that correctly, as `alibi_slopes` does; its SIMD kernels (AVX2, AVX512, chosen by the CPU)
miss by one ulp for some heads (measured: AVX512 at 33 head counts, AVX2 at 65, 16 and 112
included). So the bit-for-bit check runs transformers on the reference kernel in a fresh process,
and the check in this process allows the one ulp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from bloomlm.alibi import alibi_bias, alibi_positions, alibi_slopes
from bloomlm.flax.model import build_attention_bias
from bloomlm.torch.model import attention_bias, build_alibi, build_causal_mask

MASKS = {
    "left_padded": [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]],
    "right_padded": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]],
    "holes": [[1, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1]],
    "all_padding_row": [[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
}
HEAD_COUNTS = (1, 3, 4, 12, 16, 112)


def _reference_blocked(mask: np.ndarray, query_length: int) -> np.ndarray:
    """(B, 1, T, S), True where query t (at slot S - T + t) may not look: later slots, padding."""
    key_length = mask.shape[1]
    query_slots = np.arange(key_length - query_length, key_length)[:, None]
    future = np.arange(key_length)[None, :] > query_slots
    return future[None, None] | (mask[:, None, None, :] == 0)


# Key position 1 of a two-token row holds exactly 1 * slope[h] in transformers' tensor.
THEIR_SLOPE_BITS = """
import json, torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
ones = torch.ones(1, 2, dtype=torch.long)
slopes = {n: build_alibi_tensor(ones, n, torch.float32)[:, 0, 1] for n in range(1, 129)}
print(json.dumps({n: s.view(torch.int32).tolist() for n, s in slopes.items()}))
"""


def test_slopes_equal_transformers_bit_for_bit():
    """Every head count 1..128, against transformers on torch's reference CPU kernel."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    result = subprocess.run(
        [sys.executable, "-c", THEIR_SLOPE_BITS],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(theirs) == 128
    for n_head in range(1, 129):
        ours = alibi_slopes(n_head)
        assert ours.dtype == np.float32 and ours.shape == (n_head,)
        assert ours.view(np.int32).tolist() == theirs[str(n_head)], f"n_head={n_head}"


@pytest.mark.parametrize("n_head", range(1, 129))
def test_slopes_within_one_ulp_of_transformers_on_this_cpu(n_head):
    theirs = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, torch.float32)[:, 0, 1]
    ulps = alibi_slopes(n_head).view(np.int32).astype(np.int64) - theirs.numpy().view(np.int32)
    assert np.abs(ulps).max() <= 1, f"n_head={n_head}: {ulps.tolist()}"


def test_slopes_reject_a_non_positive_head_count():
    with pytest.raises(ValueError, match="n_head"):
        alibi_slopes(0)


@pytest.mark.parametrize("n_head", HEAD_COUNTS)
@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_torch_alibi_equals_the_reference(mask, n_head):
    mask = np.asarray(mask)
    for torch_mask in (torch.tensor(mask), torch.tensor(mask, dtype=torch.float32)):
        ours = build_alibi(torch_mask, n_head, torch.float32)  # (B * H, 1, S)
        assert ours.dtype == torch.float32
        ours = ours.view(mask.shape[0], n_head, 1, mask.shape[1]).numpy()
        # Exact values; a float mask gives -0.0 on padding, which equals the reference's 0.0.
        np.testing.assert_array_equal(ours, alibi_bias(mask, n_head), strict=True)


@pytest.mark.parametrize("query_length", (1, 2, 6))
@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_torch_masks_equal_the_reference(mask, query_length):
    mask, n_head = np.asarray(mask), 3
    blocked = build_causal_mask(torch.tensor(mask), query_length).numpy()
    np.testing.assert_array_equal(blocked, _reference_blocked(mask, query_length))
    # The fused path's one additive bias: ALiBi where visible, float32's lowest value elsewhere.
    alibi = build_alibi(torch.tensor(mask), n_head, torch.float32)
    fused = attention_bias(alibi, torch.from_numpy(blocked), n_head, torch.float32).numpy()
    expected = np.where(blocked, np.finfo(np.float32).min, alibi_bias(mask, n_head))
    np.testing.assert_array_equal(fused, expected, strict=True)


@pytest.mark.parametrize("n_head", HEAD_COUNTS)
@pytest.mark.parametrize("query_length", (1, 2, 6))
@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_jax_bias_and_visibility_equal_the_reference(mask, query_length, n_head):
    mask = np.asarray(mask)
    offset = mask.shape[1] - query_length  # the queries are the last T slots, after the cache
    alibi, visible = build_attention_bias(jnp.asarray(mask), offset, query_length, n_head)
    np.testing.assert_array_equal(np.asarray(alibi), alibi_bias(mask, n_head), strict=True)
    np.testing.assert_array_equal(np.asarray(visible), ~_reference_blocked(mask, query_length))


def test_left_padded_row_with_a_cache_drawn():
    """Row 0 has two pads on the left; 3 slots are cached (P = 3) and 2 new tokens arrive (T = 2).

        slot                0 1 2 3 4
        attention_mask      0 0 1 1 1        row 0: two pads, then real tokens
                            1 1 1 1 1        row 1: no padding
        ALiBi positions     0 0 0 1 2        row 0: real tokens counted, pads 0
                            0 1 2 3 4        row 1

        may look (1), query slot ↓ key slot →      row 0          row 1
                                        query 3    0 0 1 1 0      1 1 1 1 0
                                        query 4    0 0 1 1 1      1 1 1 1 1

    A query never sees a pad or a later slot; the first new token (slot 3) sees the cached real
    token and itself, the second also sees the first.
    """
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    may_look = np.array(
        [
            [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
            [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
        ],
        dtype=bool,
    )[:, None]  # (B, 1, T, S)

    np.testing.assert_array_equal(alibi_positions(mask), positions)
    torch_blocked = build_causal_mask(torch.tensor(mask), query_length=2)
    assert torch_blocked.dtype == torch.bool and tuple(torch_blocked.shape) == (2, 1, 2, 5)
    np.testing.assert_array_equal(torch_blocked.numpy(), ~may_look)
    _, jax_visible = build_attention_bias(jnp.asarray(mask), 3, 2, n_head=4)
    np.testing.assert_array_equal(np.asarray(jax_visible), may_look)

    slopes = alibi_slopes(4)
    torch_alibi = build_alibi(torch.tensor(mask), 4, torch.float32).view(2, 4, 5).numpy()
    np.testing.assert_array_equal(torch_alibi[0], slopes[:, None] * np.float32([0, 0, 0, 1, 2]))
    np.testing.assert_array_equal(torch_alibi[1], slopes[:, None] * np.float32([0, 1, 2, 3, 4]))

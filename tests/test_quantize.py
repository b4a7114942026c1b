"""Weight-only int8: weights stay int8 in memory, the LM head is tied to the int8 embedding, and the
logits stay close to float32's."""

import subprocess
import sys

import pytest
import torch

from bloomlm import BloomConfig, BloomForCausalLM
from bloomlm.torch.quantize import Int8Embedding, Int8Linear, int8_linear, quantize_rows


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = BloomForCausalLM(
        BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, pad_token_id=3)
    )
    path = tmp_path_factory.mktemp("int8")
    model.save_pretrained(path)
    return path


def test_quantize_rows_round_trip():
    weight = (
        torch.randn(8, 32) * torch.logspace(-3, 1, 8)[:, None]
    )  # rows of very different magnitude
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.shape == (8,) and q.abs().max() == 127
    error = (q.float() * scale[:, None] - weight).abs().amax(dim=1)
    assert torch.all(error <= scale / 2 + 1e-7)  # half a quantization step, per row
    x = torch.randn(3, 32)
    exact = x @ (q.float() * scale[:, None]).T
    # float32 activations enter the int8 kernel as bfloat16 (8 mantissa bits): ~0.4% per product
    assert (int8_linear(x, q, scale) - exact).abs().max() <= 1e-2 * exact.abs().max()
    assert int8_linear(x, q, scale).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_model(folder, dtype):
    reference = BloomForCausalLM.from_pretrained(folder)
    model = BloomForCausalLM.from_pretrained(folder, quantize="int8", torch_dtype=dtype)
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 4 + 1  # four per block and the LM head
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    assert all(m.weight.dtype == torch.int8 for m in linears)
    assert (
        model.lm_head.weight is model.transformer.word_embeddings.weight
    )  # one int8 matrix, stored once
    assert all(
        p.dtype == dtype for p in model.parameters()
    )  # only biases and LayerNorms stay float
    ids = torch.randint(4, 256, (2, 12))
    ours, ref = model(ids).logits.float(), reference(ids).logits
    bound = (
        0.05 if dtype == torch.float32 else 0.1
    )  # measured ~0.01 / ~0.03 with these random weights
    assert (ours - ref).abs().max() <= bound * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_bad_quantize_value(folder):
    with pytest.raises(ValueError, match="quantize"):
        BloomForCausalLM.from_pretrained(folder, quantize="int4")


# VmHWM, not getrusage's ru_maxrss: a child inherits its parent's maxrss across fork and exec.
PEAK_RSS = """
import sys, torch
from bloomlm import BloomForCausalLM
mode = sys.argv[2]
if mode == "bf16":
    model = BloomForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)
else:
    model = BloomForCausalLM.from_pretrained(sys.argv[1], quantize=None if mode == "none" else mode)
model(torch.tensor([[5, 6]]))
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) // 1024)
"""


def test_int8_and_bf16_loads_peak_below_float32(tmp_path):
    # Layers dominate this shape (100M weights, 400 MB in float32, 100 MB in int8): an int8 load that kept
    # float copies, or mapped the whole file at once, would peak near the float32 load. The margin leaves
    # room for the allocator's run-to-run noise (up to ~130 MB seen here).
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=4096, hidden_size=1024, n_layer=8, n_head=8))
    model.save_pretrained(tmp_path)
    del model
    peaks = {}
    for mode in ("none", "int8", "bf16"):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(tmp_path), mode], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        peaks[mode] = int(out.stdout.split()[-1])
    assert peaks["int8"] < peaks["none"] - 150, peaks
    # a float32 checkpoint loaded as bfloat16 is converted block by block, never held whole beside the result
    assert peaks["bf16"] < peaks["none"] - 100, peaks


def test_decode_and_prefill_kernels_agree():
    q, scale = quantize_rows(torch.randn(48, 64))
    x = torch.randn(40, 64)
    many = int8_linear(x, q, scale)  # > 8 rows: bfloat16 matmul on the converted weight
    few = torch.cat(
        [int8_linear(x[i : i + 4], q, scale) for i in range(0, 40, 4)]
    )  # fused int8 kernel
    assert (many - few).abs().max() <= 1e-2 * many.abs().max()

"""The `quantize=` modes: int8 W8A8 (fbgemm), int8 weight-only, fp16 weights.

Weights stay quantized in memory (the tied LM head shares the embedding's quantized matrix), the
logits stay close to float32's, an int8 row's result never depends on the rest of its batch, and
quantized checkpoints are written under their own names, load without quantizing again, and are
refused by transformers instead of misread.
"""

import json
import struct
import subprocess
import sys
import threading

import pytest
import torch

from bloomlm import BloomConfig, BloomForCausalLM, BloomForSequenceClassification
from bloomlm.errors import CheckpointError
from bloomlm.torch import pretrained
from bloomlm.torch import quantize as quantization
from bloomlm.torch.quantize import (
    Fp16Linear,
    Int8Linear,
    Int8WeightOnlyLinear,
    Packer,
    QuantizedEmbedding,
    activation_bits,
    int8_linear,
    quantize_rows,
)

MODES = {"int8": Int8Linear, "int8-weight-only": Int8WeightOnlyLinear, "fp16": Fp16Linear}
# Measured max|logit error| / max|logit| against float32 with these random weights: int8 ~0.02,
# weight-only ~0.01 (bfloat16 activations), fp16 ~1e-4; bound with headroom.
LOGIT_BOUND = {"int8": 0.06, "int8-weight-only": 0.05, "fp16": 1e-3}

pytestmark = pytest.mark.skipif(
    not quantization.fbgemm_available(), reason="needs torch's fbgemm kernels (x86 builds)"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = BloomForCausalLM(
        BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, pad_token_id=3)
    )
    path = tmp_path_factory.mktemp("float")
    model.save_pretrained(path)
    return path


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(4, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def _header(path) -> dict:
    """A safetensors file's header: {name: {dtype, shape, data_offsets}}."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(length))


# -- the layers --------------------------------------------------------------------------------


def test_quantize_rows_round_trip():
    weight = torch.randn(8, 32) * torch.logspace(-3, 1, 8)[:, None]  # rows of different magnitude
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.shape == (8,) and q.abs().max() == 127
    error = (q.float() * scale[:, None] - weight).abs().amax(dim=1)
    assert torch.all(error <= scale / 2 + 1e-7)  # half a quantization step, per row
    x = torch.randn(3, 32)
    exact = x @ (q.float() * scale[:, None]).T
    # float32 activations enter the int8 kernel as bfloat16 (8 mantissa bits): ~0.4% per product
    assert (int8_linear(x, q, scale) - exact).abs().max() <= 1e-2 * exact.abs().max()
    assert int8_linear(x, q, scale).dtype == torch.float32


@pytest.mark.parametrize("bits", [None, 7])
def test_int8_linear_is_close_to_its_float_weights(bits):
    """None: the bits this CPU's fbgemm kernel takes without overflow (8 with VNNI, else 7)."""
    torch.manual_seed(0)
    weight, scale = quantize_rows(torch.randn(96, 256))
    bias = torch.randn(96)
    layer = Int8Linear(weight, scale, bias, bits=bits)
    assert layer.bits == (bits or activation_bits())
    x = torch.randn(5, 7, 256)
    expected = torch.nn.functional.linear(x, weight.float() * scale[:, None], bias)
    out = layer(x)
    assert out.shape == (5, 7, 96) and out.dtype == torch.float32 and layer.is_packed
    # 8-bit activations: ~0.5% of the largest output; 7-bit: twice the step
    bound = 0.01 if layer.bits == 8 else 0.02
    assert (out - expected).abs().max() <= bound * expected.abs().max()


@pytest.mark.parametrize("bits", [8, 7])
def test_int8_rows_never_depend_on_the_batch(bits):
    torch.manual_seed(0)
    layer = Int8Linear(*quantize_rows(torch.randn(64, 128)), torch.randn(64), bits=bits)
    # rows of very different magnitude: one scale for the batch would crush the small ones
    x = torch.randn(40, 128) * torch.logspace(-2, 2, 40)[:, None]
    batched = layer(x)
    for i in range(40):
        assert torch.equal(layer(x[i : i + 1])[0], batched[i]), f"row {i}"
    for size in (1, 3, 8, 17):
        assert torch.equal(layer(x[:size]), batched[:size])
    # fbgemm's own dynamic linear (one scale per call) fails this very check
    (packed,) = layer._packed
    dynamic = torch.ops.quantized.linear_dynamic(x, packed)
    assert not torch.equal(torch.ops.quantized.linear_dynamic(x[:1], packed)[0], dynamic[0])


def test_an_int8_model_is_batch_invariant(folder):
    model = BloomForCausalLM.from_pretrained(folder, quantize="int8")
    ids = _ids(batch=4)
    with torch.no_grad():
        batched = model(ids).logits
        for i in range(4):
            assert torch.equal(model(ids[i : i + 1]).logits[0], batched[i]), f"row {i}"


def test_activation_bits_follow_fbgemms_kernel(monkeypatch):
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")  # fbgemm's int16-pair kernel
    assert activation_bits() == 7
    monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS")
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        vnni = "avx512_vnni" in cpuinfo.read().split()
    assert activation_bits() == (8 if vnni else 7)


def test_decode_and_prefill_kernels_agree():
    q, scale = quantize_rows(torch.randn(48, 64))
    x = torch.randn(40, 64)
    many = int8_linear(x, q, scale)  # > 8 rows: bfloat16 matmul on the converted weight
    few = torch.cat([int8_linear(x[i : i + 4], q, scale) for i in range(0, 40, 4)])  # fused kernel
    assert (many - few).abs().max() <= 1e-2 * many.abs().max()


# -- whole models ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model(folder, mode, dtype):
    reference = BloomForCausalLM.from_pretrained(folder)
    model = BloomForCausalLM.from_pretrained(folder, quantize=mode, torch_dtype=dtype)
    linears = [m for m in model.modules() if isinstance(m, MODES[mode])]
    assert len(linears) == 2 * 4 + 1  # four per block and the LM head
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in model.modules())
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, QuantizedEmbedding)
    stored = torch.float16 if mode == "fp16" else torch.int8
    assert embedding.weight.dtype == stored
    # the tied head computes on the embedding's quantized matrix: no float copy anywhere
    assert model.lm_head.weight is embedding.weight
    assert all(p.dtype == dtype for p in model.parameters())  # only biases and LayerNorms
    assert all(b.dtype in (stored, torch.float32) for b in model.buffers())
    ids = _ids()
    with torch.no_grad():
        ours, ref = model(ids).logits.float(), reference(ids).logits
    bound = LOGIT_BOUND[mode] + (0.05 if dtype == torch.bfloat16 else 0)
    assert (ours - ref).abs().max() <= bound * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_heads_other_than_the_lm_quantize_too(tmp_path):
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, pad_token_id=3)
    BloomForSequenceClassification(config).save_pretrained(tmp_path)
    reference = BloomForSequenceClassification.from_pretrained(tmp_path)
    model = BloomForSequenceClassification.from_pretrained(tmp_path, quantize="int8")
    assert isinstance(model.score, Int8Linear)
    with torch.no_grad():
        ours, ref = model(_ids()).logits, reference(_ids()).logits
    assert (ours - ref).abs().max() <= 0.06 * ref.abs().max()


def test_bad_quantize_values(folder, tmp_path):
    with pytest.raises(ValueError, match="quantize must be None or one of 'int8'"):
        BloomForCausalLM.from_pretrained(folder, quantize="int4")
    model = BloomForCausalLM.from_pretrained(folder, quantize="int8")
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(RuntimeError, match="CPU only"):
        model.to("meta")  # any device but the CPU: fbgemm's packed weights cannot move
    with pytest.raises(ValueError, match="needs a float model"):
        model.resize_token_embeddings(300)


# -- quantized checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(MODES))
def saved(request, folder, tmp_path_factory):
    """(mode, the quantized model, the folder it saved itself to)."""
    model = BloomForCausalLM.from_pretrained(folder, quantize=request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_quantized_save_names_its_file_and_format(saved):
    mode, _, path = saved
    stored = "fp16" if mode == "fp16" else "int8"
    weights = f"model.{stored}.safetensors"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", weights]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"format": stored, "weights": weights}
    header = _header(path / weights)
    matrices = {k: v["dtype"] for k, v in header.items() if k.endswith(".weight") and "ln" not in k}
    matrices = {k: v for k, v in matrices.items() if "layernorm" not in k}
    assert set(matrices.values()) == {"I8" if stored == "int8" else "F16"}, matrices
    assert "lm_head.weight" not in header  # tied: stored once, as the embedding
    if stored == "int8":
        assert header["transformer.word_embeddings.weight_scale"]["dtype"] == "F32"


def test_quantized_checkpoint_loads_without_quantizing_again(saved, monkeypatch):
    mode, model, path = saved

    def fail(*args, **kwargs):
        raise AssertionError("a quantized checkpoint was quantized again")

    monkeypatch.setattr(pretrained, "_quantize_blocks", fail)  # quantizes checkpoint tensors
    monkeypatch.setattr(quantization, "materialise_", fail)  # quantizes missing ones
    loaded = BloomForCausalLM.from_pretrained(path)  # its mode comes from config.json
    assert type(loaded.lm_head) is (Int8Linear if mode != "fp16" else Fp16Linear)
    if mode == "int8-weight-only":  # the same int8 tensors, loaded into the weight-only kernel
        loaded = BloomForCausalLM.from_pretrained(path, quantize="int8-weight-only")
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name])
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, loaded(_ids()).logits)


def test_transformers_refuses_a_quantized_folder(saved):
    transformers = pytest.importorskip("transformers")
    _, _, path = saved
    with pytest.raises(OSError, match="no file named"):
        transformers.BloomForCausalLM.from_pretrained(path)


def test_int8_checkpoint_refuses_other_formats(saved):
    mode, _, path = saved
    if mode == "fp16":
        return  # float16 weights load into any mode (int8 quantizes them)
    with pytest.raises(ValueError, match="holds int8 weights"):
        BloomForCausalLM.from_pretrained(path, quantize="fp16")


def test_sharded_quantized_save(folder, tmp_path):
    model = BloomForCausalLM.from_pretrained(folder, quantize="int8")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.int8.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model.int8-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    loaded = BloomForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, loaded(_ids()).logits)


def test_a_new_save_replaces_the_other_kind(folder, tmp_path):
    """A float save over a quantized one (and back) leaves one checkpoint, matching config.json."""
    BloomForCausalLM.from_pretrained(folder, quantize="int8").save_pretrained(tmp_path)
    BloomForCausalLM.from_pretrained(folder).save_pretrained(tmp_path)
    assert not (tmp_path / "model.int8.safetensors").exists()
    assert "quantization" not in json.loads((tmp_path / "config.json").read_text())
    BloomForCausalLM.from_pretrained(tmp_path, quantize="fp16").save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert isinstance(BloomForCausalLM.from_pretrained(tmp_path).lm_head, Fp16Linear)


def test_unknown_quantization_entry(saved, tmp_path):
    _, model, _ = saved
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization"] = {"format": "nf4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'format' must be one of"):
        BloomForCausalLM.from_pretrained(tmp_path)


def test_load_state_dict_into_a_packed_model(folder):
    source = BloomForCausalLM.from_pretrained(folder, quantize="int8")
    target = BloomForCausalLM.from_pretrained(folder, quantize="int8")
    layer = target.transformer.h[0].mlp.dense_h_to_4h
    state = source.state_dict()
    name = "transformer.h.0.mlp.dense_h_to_4h.weight"
    state[name] = torch.flip(state[name], dims=[0])  # a visibly different weight
    target.load_state_dict(state)
    assert layer.is_packed and torch.equal(target.state_dict()[name], state[name])


@pytest.mark.parametrize("cls", [Int8Linear, Fp16Linear])
def test_a_layer_packed_in_pieces_computes_what_one_piece_does(cls, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 300)
    whole = cls.from_linear(linear)
    whole.pack_()
    # 3 pieces (128, 128, 44 rows), as the 560m LM head is packed in 4
    monkeypatch.setattr(quantization, "_INT8_PIECE_ELEMENTS", 64 * 128)
    monkeypatch.setattr(quantization, "_FP16_PIECE_ELEMENTS", 64 * 128)
    pieces = cls.from_linear(linear)
    saved = {name: tensor.clone() for name, tensor in pieces.state_dict().items()}
    pieces.pack_()
    assert len(whole._packed) == 1 and len(pieces._packed) == 3
    x = torch.randn(5, 64)
    assert torch.equal(pieces(x), whole(x))
    state = pieces.state_dict()  # unpacked from the pieces, in order
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[name], saved[name]) for name in saved)


def test_packer_packs_on_worker_threads_and_reports_their_errors(monkeypatch):
    threads = set()
    pack_piece = Int8Linear.pack_piece

    def recording(piece, scratch):
        threads.add(threading.current_thread().name)
        return pack_piece(piece, scratch)

    monkeypatch.setattr(Int8Linear, "pack_piece", staticmethod(recording))
    layers = [Int8Linear(*quantize_rows(torch.randn(64, 32)), None) for _ in range(7)]
    expected = [layer.state_dict()["weight"].clone() for layer in layers]
    with Packer(threads=2) as packer:
        for layer in layers:
            packer.submit(layer)
    assert all(layer.is_packed and layer.weight is None for layer in layers)
    assert threads and all(name.startswith("bloomlm-pack") for name in threads), threads
    assert all(torch.equal(layer.state_dict()["weight"], w) for layer, w in zip(layers, expected))

    def failing(piece, scratch):
        raise RuntimeError("fbgemm failed")

    monkeypatch.setattr(Int8Linear, "pack_piece", staticmethod(failing))
    layer = Int8Linear(*quantize_rows(torch.randn(64, 32)), None)
    with pytest.raises(RuntimeError, match="fbgemm failed"), Packer(threads=2) as packer:
        packer.submit(layer)
    assert not layer.is_packed and layer.weight is not None  # nothing half-installed


def test_a_model_loads_alike_whatever_the_pieces_and_threads(folder, monkeypatch):
    ids = _ids()
    with torch.no_grad():
        reference = BloomForCausalLM.from_pretrained(folder, quantize="int8")(ids).logits
        monkeypatch.setattr(quantization, "_INT8_PIECE_ELEMENTS", 64 * 100)  # head: 3 pieces
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # the packer's default workers
        model = BloomForCausalLM.from_pretrained(folder, quantize="int8")
        assert len(model.lm_head._packed) == 3
        assert torch.equal(model(ids).logits, reference)


def test_a_saved_int8_folder_loads_weight_only_from_the_mapped_file(folder, tmp_path):
    # Nothing to quantize or pack: the file is mapped, not streamed; int8 weights the mapping puts
    # on 8-byte boundaries are copied, as torch's AVX-512 int8 kernel crashes on them.
    BloomForCausalLM.from_pretrained(folder, quantize="int8").save_pretrained(tmp_path)
    model = BloomForCausalLM.from_pretrained(tmp_path, quantize="int8-weight-only")
    weights = [m.weight for _, m in quantization.quantized_modules(model)]
    assert all(w.dtype == torch.int8 and w.data_ptr() % 16 == 0 for w in weights)
    streamed = BloomForCausalLM.from_pretrained(folder, quantize="int8-weight-only")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, streamed(ids).logits)


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


def test_quantized_and_bf16_loads_peak_below_float32(tmp_path):
    # Layers dominate this shape (100M weights, 400 MB in float32, 100 MB in int8): an int8 load
    # that kept float copies, or mapped the whole file at once, would peak near the float32 load.
    # The margin leaves room for the allocator's run-to-run noise (up to ~130 MB seen here).
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=4096, hidden_size=1024, n_layer=8, n_head=8))
    model.save_pretrained(tmp_path)
    del model
    peaks = {}
    for mode in ("none", "int8", "fp16", "bf16"):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(tmp_path), mode], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        peaks[mode] = int(out.stdout.split()[-1])
    # 60, not the 260 this shape saves: fbgemm allocates each packed weight on a packing thread
    # (quantize.Packer), in that thread's malloc arena, where the memory the unpacked weights
    # free on the loading thread cannot be reused: measured 386-515 MB here, 369 when packing ran
    # on the loading thread (the 560m's peak went down, 1307 -> 1236-1280 MB, as its head now
    # packs in pieces). Kept float copies (+400 MB) would still put int8 above this bound.
    assert peaks["int8"] < peaks["none"] - 60, peaks
    # fp16 saves 200 MB of weights; fbgemm's packing keeps ~60 MB of its temporaries, and the
    # packing threads' arenas (above) up to ~40 MB more (measured 508-568 MB, 529 on one thread)
    assert peaks["fp16"] < peaks["none"] - 40, peaks
    # a float32 checkpoint loaded as bfloat16 is converted block by block, never held whole
    assert peaks["bf16"] < peaks["none"] - 100, peaks

"""bloomlm.convert as a library: convert_checkpoint keeps the head class and the numbers, refuses
bad options before writing anything; the size arithmetic behind `bloomlm info`.

(The command line over the same functions, every format round trip included, is in test_cli.py.)
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from bloomlm import AutoTokenizer, BloomConfig, BloomForCausalLM, BloomForTokenClassification
from bloomlm.convert import convert_checkpoint, memory_estimate, model_summary, parameter_count

FIXTURE_TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"


@pytest.fixture(scope="module")
def tagger(tmp_path_factory, one_thread) -> pathlib.Path:
    """A tiny token-classification folder saved as PyTorch .bin, with the fixture tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    config = BloomConfig(
        vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4, num_labels=3,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tagger")
    BloomForTokenClassification(config).save_pretrained(folder, safe_serialization=False)
    tokenizer.save_pretrained(folder)
    return folder


def test_convert_checkpoint_keeps_the_head_and_its_outputs(tagger, tmp_path):
    steps = []
    out = tmp_path / "nested" / "st"
    architecture = convert_checkpoint(
        tagger, out, dtype="float16", max_shard_size="20KB", on_step=lambda: steps.append(1)
    )
    assert architecture == "BloomForTokenClassification" and steps == [1, 1]
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        expected = BloomForTokenClassification.from_pretrained(tagger).half()(ids).logits
        converted = BloomForTokenClassification.from_pretrained(out, torch_dtype="auto")
        assert converted.dtype == torch.float16
        torch.testing.assert_close(converted(ids).logits, expected)
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")], "staging left"


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"dtype": "int8"}, ValueError, "use quantize='int8'"),
        ({"quantize": "int4"}, ValueError, "quantize must be one of int8, int8-weight-only"),
        ({"quantize": "int8", "to": "bin"}, ValueError, "safetensors only"),
        ({"dtype": "float64"}, ValueError, "dtype must be one of auto, float32"),
        ({"to": "onnx"}, ValueError, "to must be one of safetensors, bin, flax"),
    ],
)
def test_bad_convert_options_fail_before_writing(tagger, tmp_path, options, error, fragment):
    with pytest.raises(error, match=fragment):
        convert_checkpoint(tagger, tmp_path / "out", **options)
    assert list(tmp_path.iterdir()) == []


def test_convert_checkpoint_never_overwrites(tagger, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="never overwrites"):
        convert_checkpoint(tagger, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_sizes_from_the_config_alone():
    config = BloomConfig(vocab_size=1000, hidden_size=64, n_layer=3, n_head=4)
    n_params = parameter_count(config)
    assert n_params == BloomForCausalLM(config).num_parameters()
    summary = model_summary(config, n_params)
    assert summary["head_dim"] == 16 and summary["bytes_bf16"] == 2 * n_params
    fp16 = memory_estimate(config, n_params, "float16", batch=2, length=10)
    # (k, v) x layers x batch x length x hidden x 2 bytes
    assert fp16["kv_cache"] == 2 * 3 * 2 * 10 * 64 * 2
    assert fp16["total"] == sum(v for k, v in fp16.items() if k != "total")
    int8 = memory_estimate(config, n_params, "int8", batch=2, length=10)
    # int8 weights: one byte each plus a float32 scale per output row; activations stay 2 bytes
    assert int8["weights"] == n_params + (1000 + 9 * 3 * 64) * 4
    assert int8["kv_cache"] == fp16["kv_cache"]

"""Loading tells the truth (bloomlm.load_report), and absurd or hostile inputs are refused with an
error naming the field or the file, at once.

- A weight the model needs that the checkpoint lacks is a CheckpointError naming it (stricter than
  transformers, which warns); a task head's weights may be missing and are initialised, with
  transformers' warning word for word; so are unused and re-initialised (mismatched) weights.
- Sizes from config.json are checked before anything is built (`check_model_size`): a huge n_layer
  or hidden_size is a ValueError naming the field, in from_pretrained (PyTorch and Flax) and in
  `bloomlm info`, under a generous deadline that only guards against a hang.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

from bloomlm import (
    BloomConfig,
    BloomForCausalLM,
    BloomForSequenceClassification,
    BloomModel,
    BloomTokenizerFast,
    FlaxBloomForCausalLM,
    FlaxBloomForSequenceClassification,
    FlaxBloomModel,
)
from bloomlm.config import MAX_LAYERS, check_model_size
from bloomlm.errors import CheckpointError

EMBEDDED = pathlib.Path(__file__).parents[1] / "src" / "bloomlm" / "assets" / "bloomlm-tiny"
HANG_GUARD = (
    120  # seconds; the checks answer in milliseconds, this only turns a hang into a failure
)


@contextlib.contextmanager
def deadline(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def logged(name: str):
    """Records of logger `name` (transformers' loggers do not propagate to pytest's caplog)."""
    handler, logger = _Collect(), logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def _messages(records, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == level]


def _load_both(ours_cls, theirs_cls, folder: pathlib.Path, **kwargs):
    with logged("bloomlm") as ours, logged("transformers") as theirs:
        ours_cls.from_pretrained(str(folder), **kwargs)
        theirs_cls.from_pretrained(str(folder), **kwargs)
    return ours, theirs


# -- transformers' warnings, word for word ---------------------------------------------------------


def test_a_new_head_gets_transformers_warning(make_checkpoint):
    folder = make_checkpoint("pow2", "BloomForCausalLM")
    ours, theirs = _load_both(
        BloomForSequenceClassification, transformers.BloomForSequenceClassification, folder
    )
    expected = _messages(theirs)
    assert len(expected) == 1 and "newly initialized: ['score.weight']" in expected[0]
    assert _messages(ours) == expected


def test_unused_weights_get_transformers_warning(make_checkpoint, tmp_path):
    folder = tmp_path / "extra"
    shutil.copytree(make_checkpoint("pow2", "BloomForCausalLM"), folder)
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    tensors["lm_head.bias"] = torch.zeros(4)
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    ours, theirs = _load_both(BloomForCausalLM, transformers.BloomForCausalLM, folder)
    expected = _messages(theirs)
    assert len(expected) == 1 and "were not used when initializing BloomForCausalLM" in expected[0]
    assert _messages(ours) == expected


def test_unused_head_of_another_class_is_info_as_in_transformers(make_checkpoint, caplog):
    folder = make_checkpoint("pow2", "BloomForSequenceClassification")
    ours, theirs = _load_both(BloomModel, transformers.BloomModel, folder)
    assert _messages(ours) == _messages(theirs) == []
    with caplog.at_level(logging.INFO, logger="bloomlm"):
        BloomModel.from_pretrained(folder)
    assert "were not used when initializing BloomModel: ['score.weight']" in caplog.text


def test_mismatched_shapes_get_transformers_warning(make_checkpoint):
    folder = make_checkpoint("pow2", "BloomForSequenceClassification")
    ours, theirs = _load_both(
        BloomForSequenceClassification, transformers.BloomForSequenceClassification, folder,
        num_labels=5, ignore_mismatched_sizes=True,
    )  # fmt: skip
    expected = _messages(theirs)
    assert len(expected) == 1 and "because the shapes did not match" in expected[0]
    assert _messages(ours) == expected


def test_a_tied_lm_head_is_never_missing(make_checkpoint, caplog):
    folder = make_checkpoint("pow2", "BloomModel")  # no lm_head stored: tied to the embeddings
    with caplog.at_level(logging.INFO, logger="bloomlm"):
        model, info = BloomForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and "newly initialized" not in caplog.text
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_classify_on_a_language_model_warns_naming_the_head(caplog):
    """Issue 12: a head without trained weights must not answer in silence."""
    with caplog.at_level(logging.WARNING, logger="bloomlm"):
        BloomForSequenceClassification.from_pretrained(EMBEDDED)
    assert "newly initialized: ['score.weight']" in caplog.text
    assert "You should probably TRAIN this model" in caplog.text


def test_flax_new_head_and_unused_weights_are_reported(make_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="bloomlm"):
        FlaxBloomForSequenceClassification.from_pretrained(
            make_checkpoint("pow2", "BloomForCausalLM"), from_pt=True
        )
    assert "newly initialized: ['score/kernel']" in caplog.text and "TRAIN" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bloomlm"):
        FlaxBloomModel.from_pretrained(
            make_checkpoint("pow2", "BloomForSequenceClassification"), from_pt=True
        )
    assert "were not used when initializing FlaxBloomModel" in caplog.text  # Flax always warns


# -- missing weights the model needs are an error --------------------------------------------------


def _with_config(source: pathlib.Path, folder: pathlib.Path, **changes) -> pathlib.Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_a_config_with_more_layers_than_the_weights_is_an_error(make_checkpoint, tmp_path):
    folder = _with_config(make_checkpoint("pow2", "BloomForCausalLM"), tmp_path / "m", n_layer=3)
    with pytest.raises(CheckpointError, match=r"lacks 12 weight\(s\) that BloomForCausalLM needs"):
        BloomForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"transformer\.h\.2\.input_layernorm\.weight"):
        BloomForCausalLM.from_pretrained(folder, quantize="int8")
    with pytest.raises(CheckpointError, match="transformer/h/2/"):
        FlaxBloomForCausalLM.from_pretrained(folder, from_pt=True)


def test_a_missing_trunk_tensor_is_named(make_checkpoint, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(make_checkpoint("pow2", "BloomForCausalLM"), folder)
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    del tensors["transformer.ln_f.bias"]
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message = r"lacks 1 weight\(s\) that BloomModel needs: ln_f\.bias"
    with pytest.raises(CheckpointError, match=message):
        BloomModel.from_pretrained(folder)


# -- sizes from config.json, before anything is built ----------------------------------------------


HUGE = [
    ({"n_layer": 10**9}, "n_layer"),
    ({"n_layer": MAX_LAYERS + 1}, "n_layer"),
    ({"hidden_size": 10**12, "n_head": 1}, "hidden_size"),
    ({"vocab_size": 10**13}, "vocab_size"),
]


@pytest.mark.parametrize(("changes", "field"), HUGE)
def test_an_absurd_size_is_refused_at_once(make_checkpoint, tmp_path, changes, field):
    folder = _with_config(make_checkpoint("pow2", "BloomForCausalLM"), tmp_path / "m", **changes)
    pattern = rf"BloomConfig\.{field}=\d+ is absurd"
    with deadline(HANG_GUARD):
        with pytest.raises(ValueError, match=pattern):
            BloomForCausalLM.from_pretrained(folder)
        with pytest.raises(ValueError, match=pattern):
            FlaxBloomForCausalLM.from_pretrained(folder, from_pt=True)
        with pytest.raises(ValueError, match=pattern):
            check_model_size(BloomConfig.from_pretrained(folder))


def test_bloomlm_info_refuses_a_huge_config_without_hanging(tmp_path):
    BloomConfig(n_layer=10**9).save_pretrained(tmp_path / "huge")
    package_root = str(pathlib.Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": package_root}
    result = subprocess.run(
        [sys.executable, "-m", "bloomlm", "info", str(tmp_path / "huge")],
        capture_output=True, text=True, env=env, timeout=HANG_GUARD,
    )  # fmt: skip
    assert result.returncode != 0
    assert "BloomConfig.n_layer=1000000000 is absurd" in result.stderr


def test_sizes_of_real_models_pass():
    bloom_176b = BloomConfig(vocab_size=250880, hidden_size=14336, n_layer=70, n_head=112)
    assert 176e9 < check_model_size(bloom_176b) < 177e9
    config = BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)
    exact = sum(p.numel() for p in BloomForCausalLM(config).parameters())
    # the trunk plus the largest head the config can have (num_labels=2: score or classifier)
    assert check_model_size(config) == exact + 2 * (32 + 1)


# -- hostile files: errors that name the file ------------------------------------------------


def _copy_embedded(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "m"
    shutil.copytree(EMBEDDED, folder)
    return folder


@pytest.mark.parametrize("load", [{}, {"torch_dtype": torch.bfloat16}, {"quantize": "int8"}])
def test_a_header_length_past_the_file_is_a_checkpoint_error(tmp_path, load):
    folder = _copy_embedded(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**63) + weights.read_bytes()[8:])
    with pytest.raises(CheckpointError, match=f"{weights}.*header length"):
        BloomForCausalLM.from_pretrained(folder, **load)


@pytest.mark.parametrize("target", ["/dev/zero", "text", "folder"])
def test_a_weight_file_linked_to_something_else_is_named(tmp_path, target):
    folder = _copy_embedded(tmp_path)
    weights = folder / "model.safetensors"
    weights.unlink()
    if target == "text":
        (tmp_path / "notes.txt").write_text("root:x:0:0:root:/root:/bin/bash\n" * 20)
        target = tmp_path / "notes.txt"
    elif target == "folder":
        target = tmp_path
    weights.symlink_to(target)
    with pytest.raises(CheckpointError, match=str(weights)):
        BloomForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)


def test_a_malformed_tokenizer_json_is_named(tmp_path):
    folder = _copy_embedded(tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(ValueError, match=f"{folder / 'tokenizer.json'} is not a tokenizer file"):
        BloomTokenizerFast.from_pretrained(folder)

"""`--quantize` on the command line: one option on every command that loads or writes a model,
`bloomlm convert --quantize int8` writing the quantized checkpoint that later loads as it is, and
`--dtype int8` kept as a deprecated alias. Runs the real `bloomlm` command in a subprocess where
the process boundary matters (convert, then generate from what it wrote)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import bloomlm
from bloomlm import AutoTokenizer, BloomForCausalLM, BloomForSequenceClassification
from bloomlm.checkpoint_names import QUANTIZE_MODES
from bloomlm.cli import W8A8_MIN_TOKENS, build_parser, main
from bloomlm.tasks import classify
from bloomlm.torch.quantize import fbgemm_available

PACKAGE_ROOT = str(pathlib.Path(bloomlm.__file__).resolve().parent.parent)
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
}
PROMPT = "A list is"

pytestmark = pytest.mark.skipif(not fbgemm_available(), reason="needs fbgemm (x86 torch builds)")


def bloomlm_command(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bloomlm", *args],
        capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300,
    )  # fmt: skip


def greedy(model: BloomForCausalLM, tokenizer, max_new_tokens: int = 8) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@pytest.mark.parametrize("verb", ["generate", "classify", "tag", "answer", "convert"])
def test_every_model_command_takes_quantize(verb):
    parser = build_parser()
    base = {"convert": ["src", "dst"], "answer": ["--question", "q"]}.get(verb, [])
    for mode in QUANTIZE_MODES:
        assert parser.parse_args([verb, *base, "--quantize", mode]).quantize == mode
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([verb, *base, "--quantize", "int4"])
    assert exit_info.value.code == 2


def test_convert_quantize_int8_then_generate_from_it(tmp_path):
    converted = bloomlm_command("convert", "bloomlm-tiny", "tiny-int8", "--quantize", "int8",
                                cwd=tmp_path)  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    folder = tmp_path / "tiny-int8"
    assert (folder / "model.int8.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["quantization"]["format"] == "int8"

    def generate(*extra: str) -> tuple[str, str]:
        generated = bloomlm_command(
            "generate", "--model", "tiny-int8", "--temperature", "0", "--repetition-penalty", "1",
            "--verbose", *extra, PROMPT, cwd=tmp_path,
        )  # fmt: skip
        assert generated.returncode == 0, generated.stderr
        return generated.stdout.strip(), generated.stderr

    tokenizer = AutoTokenizer.from_pretrained("bloomlm-tiny")
    # --quantize int8 (W8A8): what the folder holds is exactly what quantizing at load gives
    text, err = generate("--max-new-tokens", "8", "--quantize", "int8")
    expected = greedy(BloomForCausalLM.from_pretrained("bloomlm-tiny", quantize="int8"), tokenizer)
    assert text == expected.strip() and "int8 weights run" not in err
    assert greedy(BloomForCausalLM.from_pretrained(folder), tokenizer) == expected
    # No --quantize, a short run: the weight-only kernel, which packs nothing at load (issue 12,
    # item 30: the int8 folder is then not slower end to end than float32)
    text, err = generate("--max-new-tokens", "8")
    weight_only = BloomForCausalLM.from_pretrained(folder, quantize="int8-weight-only")
    assert text == greedy(weight_only, tokenizer).strip()
    assert "int8 weights run weight-only (up to 8 new tokens" in err
    # a run long enough to repay fbgemm's packing: W8A8
    _, err = generate("--max-new-tokens", str(W8A8_MIN_TOKENS))
    assert f"int8 weights run W8A8 (up to {W8A8_MIN_TOKENS} new tokens" in err


def test_dtype_int8_is_a_deprecated_alias(call_main):
    status, out, err = call_main(
        "generate", "--dtype", "int8", "--temperature", "0", "--max-new-tokens", "6", PROMPT
    )
    assert status == 0 and "--dtype int8 is deprecated, use --quantize int8" in err
    assert call_main("generate", "--quantize", "int8", "--temperature", "0",
                     "--max-new-tokens", "6", PROMPT)[1] == out  # fmt: skip
    status, _, err = call_main("generate", "--dtype", "int8", "--quantize", "fp16", PROMPT)
    assert status == 1 and "disagree" in err


def test_classify_quantized_prints_what_the_api_returns(call_main):
    status, out, _ = call_main("classify", "--quantize", "fp16", "I love this", "So boring")
    assert status == 0
    model = BloomForSequenceClassification.from_pretrained(
        "bloomlm-tiny-sentiment", quantize="fp16"
    )
    tokenizer = AutoTokenizer.from_pretrained("bloomlm-tiny-sentiment")
    results = classify(model, tokenizer, ["I love this", "So boring"])
    lines = [
        f"{r['label']}\t{r['score']:.4f}\t{t}"
        for r, t in zip(results, ["I love this", "So boring"])
    ]
    assert out.splitlines() == lines


def test_convert_quantize_refuses_other_formats(call_main, tmp_path):
    status, _, err = call_main("convert", "bloomlm-tiny", str(tmp_path / "x"), "--quantize",
                               "int8", "--to", "bin")  # fmt: skip
    assert status == 1 and "safetensors only" in err
    assert not (tmp_path / "x").exists()


@pytest.fixture
def call_main(capsys):
    """`bloomlm.cli.main(args)` in this process: (exit status, stdout, stderr)."""

    def call(*args: str) -> tuple[int, str, str]:
        status = main(list(args))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return call

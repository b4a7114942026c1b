"""`bloomlm generate`'s engine options, through `bloomlm.cli.main` in this process (the embedded
bloomlm-tiny): per-prompt seeds (the same text whatever the batch size), the usable length,
and when `--compile auto` compiles."""

from __future__ import annotations

import argparse
import io
import json
from types import SimpleNamespace

import pytest

from bloomlm import cli
from conftest import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = "The list\na much longer second prompt than the first\nShort\n"


@pytest.fixture
def call(capsys, monkeypatch):
    def call(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        status = cli.main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return call


def test_a_seed_gives_each_prompt_the_same_text_whatever_the_batch_size(call, run):
    """Issue 12, item 28 (batch size 3 in the real `bloomlm` command, batch size 1 in `main`)."""
    args = ("generate", "--seed", "5", "--max-new-tokens", "12", "--jsonl", "--batch-size")
    status, out, err = call(*args, "1", stdin=PROMPTS)
    assert status == 0, err
    outputs = [out, run(*args, "3", stdin=PROMPTS).stdout]
    outputs = [[json.loads(line)["generated"] for line in text.splitlines()] for text in outputs]
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3
    _, out, _ = call("generate", "--seed", "5", "--max-new-tokens", "12", "--only-new", "Short")
    assert out == outputs[0][2] + "\n"  # streamed alone: the same text again
    _, other, _ = call("generate", "--seed", "6", "--max-new-tokens", "12", "--only-new", "Short")
    assert other != out


def test_a_request_over_the_usable_length_fails_at_once(call, run):
    """Issue 12, item 8: one line at once, nothing allocated (the real command first)."""
    result = run("generate", "--max-new-tokens", "10000000", "hello", ok=False)
    assert_one_line_error(result, "max_model_len=2048")
    status, _, err = call("generate", "--max-model-len", "8", "--max-new-tokens", "7", "a b c")
    assert status == 1 and "max_model_len=8" in err
    with pytest.raises(SystemExit) as exited:  # checked with the arguments, before any loading
        call("generate", "--max-model-len", "0", "hello")
    assert exited.value.code == 2


def test_compile_auto_only_for_long_runs():
    def options(prompts, batch_size, max_new_tokens, compile="auto", seq_length=None):
        args = argparse.Namespace(max_model_len=None, batch_size=batch_size, compile=compile,
                                  max_new_tokens=max_new_tokens)  # fmt: skip
        model = SimpleNamespace(config=SimpleNamespace(seq_length=seq_length))
        return cli._engine_options(args, model, prompts)

    assert options(1, 8, 40) == {"max_model_len": 2048, "compile": False}
    long_run = -(-cli.COMPILE_MIN_STEPS // 100)  # steps per batch so that 100 batches reach it
    assert options(8 * 100, 8, long_run)["compile"] is True
    assert options(1, 8, 40, compile="on")["compile"] is True
    assert options(1000, 1, 1000, compile="off")["compile"] is False
    assert options(1, 8, 40, seq_length=4096)["max_model_len"] == 4096

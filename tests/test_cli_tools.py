"""The command line as a tool (issue 12): argument checks before anything loads, help pages,
--debug, `info`, `convert` (dtype, progress, Flax without jax, Flax-only folders), hub names
offline, and `finetune` (data errors by line, every epoch's results, the best epoch, --save-steps
with Ctrl-C and --resume, option changes on --resume).

`run(..., block=("torch",))` makes torch unimportable: a command that passes so never loaded a
model (argument errors) or never needed torch (`info`, help pages).
"""

from __future__ import annotations

import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from bloomlm import (
    BloomConfig,
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
    BloomModel,
)
from bloomlm import finetune as finetune_module
from bloomlm.convert import _watch_bytes, convert_checkpoint, parameter_count
from bloomlm.finetune import FinetuneConfig, FinetuneError, finetune
from conftest import ENV, assert_one_line_error, on_a_terminal

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADS = {
    "lm": BloomForCausalLM,
    "cls": BloomForSequenceClassification,
    "tag": BloomForTokenClassification,
    "qa": BloomForQuestionAnswering,
}
POSITIVE = ["good and nice", "nice, very good", "great good fun", "lovely nice day", "so nice"]
NEGATIVE = ["bad and awful", "awful, very bad", "terrible bad day", "bad bad bad", "so awful"]


def test_no_command_prints_help_and_exits_2(run):
    """Item 17."""
    result = run(ok=False, block=("torch",))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: bloomlm") and "finetune" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "--top-p", "1.5", "hi"), "--top-p must be in (0, 1], got 1.5"),
        (("generate", "--temperature", "-1", "hi"), "--temperature must be >= 0, got -1.0"),
        (("generate", "--threads", "0", "hi"), "--threads must be at least 1, got 0"),
        (("generate", "--device", "tpu", "hi"), "--device must be cpu, cuda, cuda:N, mps or auto"),
        (
            ("generate", "--num-beams", "2", "--num-return-sequences", "3", "hi"),
            "--num-return-sequences (3) must be at most --num-beams (2)",
        ),  # fmt: skip
        (("classify", "--top-k", "0", "hi"), "--top-k must be at least 1, got 0"),
        (
            (
                "answer",
                "--model",
                "m",
                "--question",
                "q",
                "--context",
                "c",
                "--max-length",
                "16",
                "--doc-stride",
                "16",
            ),
            "--doc-stride (16) must be less than --max-length (16)",
        ),  # fmt: skip
        (("convert", "a", "b", "--max-shard-size", "lots"), "--max-shard-size must be a size"),
        (("info", "--batch", "0"), "--batch must be at least 1, got 0"),
        (
            ("finetune", "seq-cls", "--train", "t.csv", "--out", "o", "--weight-decay", "-1"),
            "--weight-decay must be >= 0, got -1.0",
        ),  # fmt: skip
        (
            ("finetune", "seq-cls", "--train", "t.csv", "--out", "o", "--threads", "0"),
            "--threads must be at least 1, got 0",
        ),  # fmt: skip
        (("finetune", "qa", "--out", "o"), "--train (unless --resume)"),
    ],
)
def test_bad_values_exit_2_naming_the_flag_before_anything_loads(run, args, message):
    """Items 10, 15 (--device) and 24: checked when parsed, one message style, the command's own
    --help named (item 16); torch is never imported."""
    result = run(*args, ok=False, block=("torch",))
    assert_one_line_error(result, message, status=2)
    command = " ".join(args[:2]) if args[0] == "finetune" else args[0]
    assert result.stderr.startswith(f"bloomlm {command}: error: ")
    assert result.stderr.endswith(f"(see bloomlm {command} --help)\n")


def test_finetune_config_names_flags_in_its_errors():
    """Item 24, in Python: the same checks, worded with the flags."""
    for field, value, message in [
        ("weight_decay", -0.1, "--weight-decay must be >= 0, got -0.1"),
        ("threads", 0, "--threads must be at least 1, got 0"),
        ("save_steps", 0, "--save-steps must be at least 1, got 0"),
    ]:
        config = FinetuneConfig(task="seq-cls", train_file="t.csv", out_dir="o", **{field: value})
        with pytest.raises(FinetuneError, match=message):
            config.check()


def test_help_pages_show_defaults_and_finetune_tasks_differ(run):
    """Item 15 (and --debug after the command, item 16)."""
    pages = {}
    commands = ["generate", "classify", "tag", "answer", "convert", "info"]
    for command in [*commands, "finetune seq-cls", "finetune token-cls", "finetune qa",
                    "finetune causal-lm"]:  # fmt: skip
        pages[command] = run(*command.split(), "--help", block=("torch",)).stdout
    for command, shown in [
        ("generate", ["default: 40", "default: 50", "default: 0.95", "(default: 8)"]),
        ("classify", ["(default: 32)", "(default: 512)", "(default: 1)", "(default: 0.5)"]),
        ("tag", ["(default: first)", "(default: 512)"]),
        ("answer", ["(default: 384)", "(default: 128)"]),
        ("convert", ["(default: safetensors)", "(default: auto)", "(default: 5GB)"]),
        ("info", ["(default: bloomlm-tiny)", "(default: 2048)"]),
        ("finetune qa", ["(default: 3)", "(default: 0.0005)", "(default: question)"]),
    ]:
        for text in shown:
            assert text in " ".join(pages[command].split()), (command, text)
    assert all("--debug" in page for page in pages.values())
    assert (
        "--label-column" in pages["finetune seq-cls"]
        and "--label-column" not in pages["finetune qa"]
    )
    assert (
        "--question-column" in pages["finetune qa"]
        and "--tags-column" in pages["finetune token-cls"]
    )
    assert len({page.split("options:")[0] for page in pages.values()}) == len(pages)
    assert "cpu, cuda, cuda:N, mps or auto" in " ".join(pages["generate"].split())


def test_debug_works_after_the_command_and_errors_point_to_its_help(run):
    """Item 16."""
    result = run("convert", "nowhere", "dst", "--debug", ok=False, block=("torch",))
    assert result.returncode == 1 and "Traceback" in result.stderr and "nowhere" in result.stderr
    assert_one_line_error(
        run("generate", "--bogus", "hi", ok=False, block=("torch",)),
        "bloomlm generate: error: unrecognized arguments: --bogus (see bloomlm generate --help)",
        status=2,
    )


def test_info_counts_the_head_the_folder_has_and_needs_no_torch(run, tiny, tmp_path):
    """Item 20: the parameters of the class the config names, from config.json alone."""
    for name, model_class in HEADS.items():
        info = json.loads(run("info", str(tiny[name]), "--json", block=("torch",)).stdout)
        assert info["parameters"] == model_class.from_pretrained(tiny[name]).num_parameters()
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("info", "empty", ok=False, block=("torch",)), "has no config.json")


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_from_the_config_matches_the_model(tied):
    config = BloomConfig(vocab_size=500, hidden_size=24, n_layer=3, n_head=3, num_labels=5,
                         tie_word_embeddings=tied)  # fmt: skip
    classes = [BloomModel, *HEADS.values()]
    for model_class in classes:
        expected = model_class(config).num_parameters()
        assert parameter_count(config, model_class.__name__) == expected, model_class


def test_convert_to_flax_writes_the_dtype_it_wrote_and_shows_progress(console_script, tmp_path):
    """Items 19 and 21: config.json's torch_dtype names the weights' dtype; on a terminal a bar
    counts the bytes written."""
    output = on_a_terminal(
        [
            *console_script,
            "convert",
            "bloomlm-tiny",
            "flax32",
            "--to",
            "flax",
            "--dtype",
            "float32",
        ],
        tmp_path,
    )
    assert "writing flax weights" in output
    config = json.loads((tmp_path / "flax32" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    n_params = parameter_count(BloomConfig.from_dict(config))
    assert (tmp_path / "flax32" / "flax_model.msgpack").stat().st_size > 3.9 * n_params


def test_progress_counts_bytes_as_they_are_written(tiny, tmp_path):
    """Item 21: the folder is watched while weights are written; the last report is the total."""
    updates = []
    with _watch_bytes(tmp_path, lambda done, total: updates.append((done, total)), 0.01) as expect:
        expect(300)
        for index in range(3):
            (tmp_path / f"part-{index}").write_bytes(b"x" * 100)
            time.sleep(0.1)
    assert updates[-1] == (300, 300) and len({done for done, _ in updates}) >= 3
    assert [done for done, _ in updates] == sorted(done for done, _ in updates)
    reports = []
    convert_checkpoint(tiny["lm"], tmp_path / "out", on_progress=lambda *r: reports.append(r))
    weights = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert reports and reports[-1][0] == reports[-1][1] and abs(weights - reports[-1][1]) < 4096


def test_flax_without_jax_says_how_to_install_it(run, tiny):
    """Item 11."""
    result = run("convert", str(tiny["lm"]), "out", "--to", "flax", ok=False, block=("jax",))
    assert_one_line_error(result, 'pip install "bloomlm[flax]"')
    code = "import sys; sys.modules['jax'] = None; import bloomlm; bloomlm.FlaxBloomForCausalLM"
    python = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert python.returncode == 1 and 'pip install "bloomlm[flax]"' in python.stderr
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### JAX / Flax", 1)[1]
    assert section.split("```bash", 1)[1].strip().startswith('pip install "bloomlm[flax]"')


def test_flax_weights_load_into_pytorch_and_the_cli_suggests_convert(run, tiny, tmp_path):
    """Item 25: from_pretrained(..., from_flax=True); the CLI names `bloomlm convert`."""
    convert_checkpoint(tiny["lm"], tmp_path / "flax", to="flax")
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        expected = BloomForCausalLM.from_pretrained(tiny["lm"])(ids).logits
        loaded = BloomForCausalLM.from_pretrained(tmp_path / "flax", from_flax=True)
        torch.testing.assert_close(loaded(ids).logits, expected)
    result = run("generate", "--model", "flax", "hi", ok=False)
    assert_one_line_error(result, "holds only Flax weights")
    assert "`bloomlm convert flax flax-pytorch`" in result.stderr


def test_a_hub_name_offline_fails_at_once_in_one_line(run):
    """Item 12: HF_HUB_OFFLINE respected; a hub that does not answer (a machine offline) costs a
    few seconds and one line, not the download's timeouts and retries."""
    offline = run("generate", "--model", "someorg/somemodel", "hi", ok=False, block=("torch",))
    assert_one_line_error(offline, "offline mode (HF_HUB_OFFLINE=1)")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        online = {
            k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        }
        online |= {"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}", "NO_PROXY": "*"}
        started = time.perf_counter()
        result = run("generate", "--model", "someorg/somemodel", "hi", ok=False, env=online)
        elapsed = time.perf_counter() - started
    assert_one_line_error(result, "did not answer within 3 s")
    assert "not in the local hub cache" in result.stderr and elapsed < 10


# -- finetune --------------------------------------------------------------------------------------


def test_csv_rows_with_a_bad_label_or_field_count_name_their_line(run, call, tiny, tmp_path):
    """Item 7: line numbers as an editor counts them (a quoted field may span lines)."""
    header = 'text,label\n"a quoted\nmulti-line text",positive\n'  # lines 1-3
    cases = [
        ("empty.csv", "fine,\n", "empty.csv line 4: the label (column 'label') is empty"),
        ("missing.csv", "fine\n", "missing.csv line 4 has 1 fields but the header has 2"),
        (
            "extra.csv",
            "fine,positive,extra\n",
            "extra.csv line 4 has 3 fields but the header has 2",
        ),
    ]
    for name, row, _ in cases:
        (tmp_path / name).write_text(header + row)
    options = ("--model", str(tiny["cls"]), "--out", "out")
    first = run("finetune", "seq-cls", "--train", cases[0][0], *options, ok=False)
    assert_one_line_error(first, cases[0][2])
    for name, _, message in cases[1:]:
        status, _, err = call("finetune", "seq-cls", "--train", name, *options)
        assert status == 1 and message in err and err.count("\n") == 1
    status, _, err = call("finetune", "seq-cls", "--train", "-", *options, stdin=header + "ok,\n")
    assert status == 1 and "stdin line 4: the label (column 'label') is empty" in err  # '-' (18)
    assert not (tmp_path / "out").exists()


def _scripted(values: list[tuple[float, float]]):
    """An evaluation returning (accuracy, loss) from `values` in turn."""
    pending = list(values)

    def evaluate(run):
        accuracy, loss = pending.pop(0)
        return {"loss": loss, "accuracy": accuracy, "f1": accuracy}

    return evaluate


def test_every_epoch_is_in_eval_results_and_ties_go_to_the_later_lower_loss(
    tiny, tmp_path, monkeypatch
):
    """Items 5 and 22, with scripted metrics (before training, then epochs 1-4)."""
    rows = [{"text": t, "label": "positive"} for t in POSITIVE]
    rows += [{"text": t, "label": "negative"} for t in NEGATIVE]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scripted = [(0.5, 1.0), (0.75, 0.9), (0.5, 0.8), (0.75, 0.7), (0.75, 0.75)]
    monkeypatch.setattr(finetune_module, "_run_evaluation", _scripted(scripted))
    monkeypatch.setattr(finetune_module, "train_epoch", lambda run, epoch: 0.5)
    config = FinetuneConfig(task="seq-cls", model=str(tiny["cls"]), train_file=str(data),
                            eval_file=str(data), out_dir=str(tmp_path / "out"),
                            epochs=4)  # fmt: skip
    result = finetune(config, log=lambda message: None)
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert [entry["epoch"] for entry in saved["history"]] == [0, 1, 2, 3, 4]
    assert result.best_epoch == saved["best_epoch"] == 3  # 0.75 like epoch 1, with a lower loss
    assert saved["best"]["loss"] == 0.7


def _write_sentiment(path, copies: int) -> None:
    rows = [{"text": t, "label": "positive"} for t in POSITIVE]
    rows += [{"text": t, "label": "negative"} for t in NEGATIVE]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows * copies))


SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def test_save_steps_then_ctrl_c_then_resume_equals_one_uninterrupted_run(
    run, console_script, tiny, tmp_path
):
    """Items 23 (--save-steps, Ctrl-C, --resume), 6 (options on --resume) and 22 (the final line
    names the best epoch)."""
    _write_sentiment(tmp_path / "train.jsonl", copies=24)  # 240 rows: 120 steps an epoch
    _write_sentiment(tmp_path / "eval.jsonl", copies=1)
    common = ["finetune", "seq-cls", "--model", str(tiny["cls"]), "--train", "train.jsonl",
              "--eval", "eval.jsonl", "--epochs", "2", "--batch-size", "2",
              "--threads", "1"]  # fmt: skip
    whole = run(*common, "--out", "whole")
    assert whole.stdout.startswith("best model: epoch ")

    # Ctrl-C as a terminal delivers it: SIGINT at its default in the command, even where this
    # suite runs in a background job (whose shell starts every child with SIGINT ignored); reset
    # by an exec wrapper, as a preexec_fn would fork a process that has JAX's threads.
    with subprocess.Popen(
        [sys.executable, "-c", SIGINT_DEFAULT, *console_script, *common, "--out", "cut",
         "--save-steps", "3"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV, cwd=tmp_path,
    ) as process:  # fmt: skip
        for line in process.stderr:
            if line.startswith("saved the state at step"):
                process.send_signal(signal.SIGINT)
                break
        rest = process.stderr.read()
        assert process.wait(timeout=120) == 130, rest
    assert "interrupted; run the same command with --resume" in rest
    state = json.loads((tmp_path / "cut" / "training_state" / "trainer_state.json").read_text())
    assert state["batch"] > 0 and state["step"] % 3 == 0  # saved within an epoch

    other = run(*common[:5], "eval.jsonl", *common[6:], "--out", "cut", "--resume", ok=False)
    assert_one_line_error(other, "which has --train 'train.jsonl'; got 'eval.jsonl'")
    resumed = run(*common, "--out", "cut", "--resume", "--learning-rate", "0.1")
    assert "--learning-rate 0.1 is ignored on --resume: the run keeps 0.0005" in resumed.stderr
    assert resumed.stdout.split(",")[0] == whole.stdout.split(",")[0]  # the same best epoch

    ours = json.loads((tmp_path / "cut" / "eval_results.json").read_text())
    theirs = json.loads((tmp_path / "whole" / "eval_results.json").read_text())
    assert ours["best_epoch"] == theirs["best_epoch"]
    for mine, reference in zip(ours["history"], theirs["history"], strict=True):
        assert mine == pytest.approx(reference, rel=1e-5)
    weights = "training_state/model.safetensors"
    final, expected = load_file(tmp_path / "cut" / weights), load_file(tmp_path / "whole" / weights)
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor)

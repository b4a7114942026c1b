"""`bloomlm generate`, run for real: decoding defaults and the folder's generation config, every
decoding option, JSONL requests, multi-line prompts, the prompt loop, progress bars on a terminal,
and how fast the command starts (issue 12).

Each continuation printed is compared with what `model.generate` returns for the same folder. A
subprocess costs a torch import, so each test batches its checks into one or two runs (JSONL
requests with different settings run in one process).
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from bloomlm import AutoTokenizer, BloomForCausalLM
from conftest import ENV, assert_one_line_error, on_a_terminal

PROMPT = "Hello there"


def continuation(folder: pathlib.Path, prompt: str = PROMPT, **settings) -> list[str]:
    """What `model.generate` continues `prompt` with, one text per returned sequence."""
    model = BloomForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    sequences = model.generate(**inputs, **settings)
    new = sequences[:, inputs["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def jsonl(*requests: dict) -> str:
    return "".join(json.dumps(request) + "\n" for request in requests)


@pytest.fixture(scope="module")
def eos_lm(tiny, tmp_path_factory) -> pathlib.Path:
    """A model that always wants to end: every position's hidden state is the same vector, and
    the end-of-text row of its (untied) LM head points along it. The next best token is fixed too,
    so the options that keep it going (--ignore-eos, --min-new-tokens) are plain to see."""
    source = BloomForCausalLM.from_pretrained(tiny["lm"])
    config = source.config
    config.tie_word_embeddings = False
    model = BloomForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=False)
    with torch.no_grad():
        hidden = torch.linspace(-1, 1, config.hidden_size)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(hidden)
        model.lm_head.weight.copy_(source.transformer.word_embeddings.weight)
        model.lm_head.weight[config.eos_token_id] = 100 * hidden
        model.lm_head.weight[100] = 50 * hidden  # then always token 100 (a plain one) ...
        model.lm_head.weight[101] = 40 * hidden  # ... or 101 when 100 may not come again
    folder = tmp_path_factory.mktemp("eos")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny["lm"]).save_pretrained(folder)
    return folder


def test_temperature_zero_is_plain_greedy_and_the_folder_config_wins(run, tiny, tmp_path):
    """Item 13: no hidden repetition penalty; the folder's generation_config.json over the CLI's
    defaults; a flag (or a request's setting) over both."""
    greedy = continuation(tiny["lm"], max_new_tokens=20, do_sample=False)[0]
    penalised = continuation(tiny["lm"], max_new_tokens=20, do_sample=False, repetition_penalty=1.2)
    assert greedy != penalised[0]  # so the check below can tell the two apart
    out = run("generate", "--model", str(tiny["lm"]), "--temperature", "0",
              "--max-new-tokens", "20", "--only-new", PROMPT).stdout  # fmt: skip
    assert out == greedy + "\n"

    configured = tmp_path / "configured"
    shutil.copytree(tiny["lm"], configured)
    settings = {"do_sample": False, "max_new_tokens": 5, "repetition_penalty": 1.5}
    (configured / "generation_config.json").write_text(json.dumps(settings))
    requests = jsonl({"prompt": PROMPT}, {"prompt": PROMPT, "max_new_tokens": 3})
    out = run("generate", "--model", str(configured), "--jsonl", stdin=requests).stdout
    printed = [json.loads(line)["generated"] for line in out.splitlines()]
    assert printed == [
        continuation(configured)[0],  # the folder's settings alone: greedy, 5 tokens, penalty 1.5
        continuation(configured, max_new_tokens=3)[0],
    ]


def test_decoding_options_end_and_continue_as_asked(run, eos_lm):
    """Also expected: --ignore-eos, --min-new-tokens, --no-repeat-ngram-size (here as JSONL
    request settings, the same names as the flags)."""
    requests = jsonl(
        {"prompt": PROMPT},
        {"prompt": PROMPT, "ignore_eos": True},
        {"prompt": PROMPT, "min_new_tokens": 3},
        {"prompt": PROMPT, "ignore_eos": True, "no_repeat_ngram_size": 2},
    )
    out = run("generate", "--model", str(eos_lm), "--temperature", "0", "--max-new-tokens", "6",
              "--jsonl", stdin=requests).stdout  # fmt: skip
    printed = [json.loads(line)["generated"] for line in out.splitlines()]
    greedy = {"max_new_tokens": 6, "do_sample": False}
    eos = BloomForCausalLM.from_pretrained(eos_lm).config.eos_token_id
    expected = [
        continuation(eos_lm, **greedy)[0],
        continuation(eos_lm, **greedy, suppress_tokens=[eos])[0],
        continuation(eos_lm, **greedy, min_new_tokens=3)[0],
        continuation(eos_lm, **greedy, suppress_tokens=[eos], no_repeat_ngram_size=2)[0],
    ]
    assert printed == expected
    assert printed[0] == "" and len(printed[2]) < len(printed[1])  # ends at once; after 3 tokens
    assert printed[1] != printed[3]


def test_stop_strings_sequences_multiline_prompts_threads_and_verbose(run, tiny):
    """Also expected: --stop (streamed and batched), --num-return-sequences, --threads, the
    --verbose line; item 27: JSONL requests, a multi-line prompt."""
    greedy = continuation(tiny["lm"], max_new_tokens=20, do_sample=False)[0]
    stop = greedy[6:9]
    before = greedy[: greedy.index(stop)]
    result = run("generate", "--model", str(tiny["lm"]), "--temperature", "0", "--max-new-tokens",
                 "20", "--only-new", "--stop", stop, "--threads", "1", "--verbose",
                 PROMPT)  # fmt: skip
    assert result.stdout == before + "\n"
    assert re.fullmatch(
        r"bloomlm generate: \d+ new tokens in [\d.]+ s \([\d.]+ tokens/s\).*\n",
        result.stderr.splitlines(keepends=True)[-1],
    )

    multiline = "First line\nsecond line"
    requests = jsonl(
        {"prompt": PROMPT, "stop": stop},
        {"prompt": PROMPT, "num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6},
        {"prompt": multiline, "max_new_tokens": 6},
    )
    out = run("generate", "--model", str(tiny["lm"]), "--temperature", "0", "--max-new-tokens",
              "20", "--jsonl", stdin=requests).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["prompt"] for row in rows] == [PROMPT, PROMPT, multiline]
    assert rows[0]["generated"] == before
    beams = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6, "do_sample": False}
    assert rows[1]["generated"] == continuation(tiny["lm"], **beams)
    greedy_6 = {"max_new_tokens": 6, "do_sample": False}
    assert rows[2]["generated"] == continuation(tiny["lm"], multiline, **greedy_6)[0]


def test_several_prompts_print_under_headers_and_one_prompt_may_span_lines(run, call, tiny):
    """Item 27: batched text output is unambiguous (a header line before each result, whatever
    the results hold); --one-prompt reads a whole multi-line file as one prompt."""
    greedy = {"max_new_tokens": 8, "do_sample": False}
    prompts = ["Hello there", "a much longer second prompt"]
    options = ("--model", str(tiny["lm"]), "--temperature", "0", "--max-new-tokens", "8")
    status, out, _ = call("generate", *options, stdin="\n".join(prompts) + "\n")
    expected = []
    for number, prompt in enumerate(prompts, 1):
        expected += [
            f"==> prompt {number} <==",
            prompt + continuation(tiny["lm"], prompt, **greedy)[0],
        ]
    assert status == 0 and out == "\n".join(expected) + "\n"

    multiline = "First line\nsecond line\n"
    out = run("generate", *options, "--one-prompt", "--file", "-", stdin=multiline).stdout
    whole = multiline.rstrip("\n")
    assert out == whole + continuation(tiny["lm"], whole, **greedy)[0] + "\n"

    status, _, err = call("generate", *options, "--jsonl", stdin='{"prompt": "a"}\n{"prompt": 1}\n')
    assert status == 1 and 'line 2 of stdin: a request needs a non-empty "prompt"' in err


def test_an_empty_prompt_is_named_before_anything_loads(run):
    """Item 26: the user's words, not a tensor shape; found at parse time (torch never imported)."""
    for args, fragment in [
        (("generate", ""), "the prompt is empty"),
        (("classify", "fine", ""), "the text is empty"),
        (("answer", "--model", "x", "--question", " ", "--context", "c"), "the question is empty"),
    ]:
        assert_one_line_error(run(*args, ok=False, block=("torch",)), fragment, status=2)


def test_interactive_mode_continues_each_line(run, tiny):
    """Also expected: `generate -i`, a prompt loop (fed from a pipe here; blank lines skipped)."""
    lines = ["Hello there", "Good day"]
    out = run("generate", "-i", "--model", str(tiny["lm"]), "--temperature", "0",
              "--max-new-tokens", "6", stdin=f"{lines[0]}\n\n{lines[1]}\n").stdout  # fmt: skip
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert out == "".join(continuation(tiny["lm"], line, **greedy)[0] + "\n" for line in lines)


CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message.role }}>: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>:{% endif %}"
)


def test_interactive_mode_chats_with_the_folders_chat_template(run, tiny, tmp_path):
    """Also expected: `generate -i` with a chat template when the folder has one. Each line is a
    user turn of one conversation, rendered with the template (as transformers renders it); the
    oldest exchanges are dropped when the conversation outgrows --max-model-len."""
    folder = tmp_path / "chat"
    shutil.copytree(tiny["lm"], folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def render(*turns: str) -> str:
        roles = ["user", "assistant"] * len(turns)
        messages = [{"role": r, "content": t} for r, t in zip(roles, turns)]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    greedy = {"max_new_tokens": 6, "do_sample": False}
    first = continuation(folder, render("Hello there"), **greedy)[0]
    second = continuation(folder, render("Hello there", first, "Good day"), **greedy)[0]
    alone = continuation(folder, render("Good day"), **greedy)[0]
    assert second != alone  # the earlier turns make a difference to this model
    command = ["generate", "-i", "--model", str(folder), "--temperature", "0",
               "--max-new-tokens", "6"]  # fmt: skip
    out = run(*command, stdin="Hello there\nGood day\n").stdout
    assert out == f"{first}\n{second}\n"

    # Room for the second turn alone, not for the whole conversation: the first exchange goes.
    length = len(tokenizer(render("Hello there", first, "Good day"))["input_ids"]) + 6 - 1
    assert len(tokenizer(render("Good day"))["input_ids"]) + 6 <= length
    result = run(*command, "--max-model-len", str(length), stdin="Hello there\nGood day\n")
    assert result.stdout == f"{first}\n{alone}\n"
    assert "oldest turns were dropped" in result.stderr


def test_results_never_glue_onto_a_progress_bar(console_script, tiny, tmp_path):
    """Item 4: on a terminal the bar (stderr) is cleared before each result (stdout) is printed,
    so every result starts its own line, whatever the bar drew last."""
    texts = ["I love this", "This is terrible", "fine"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    for command in (
        ["classify", "--model", str(tiny["cls"]), "--batch-size", "1"],
        ["generate", "--model", str(tiny["lm"]), "--max-new-tokens", "2", "--batch-size", "1",
         "--temperature", "0", "--jsonl"],
    ):  # fmt: skip
        output = on_a_terminal([*console_script, *command, "--file", "texts.txt"], tmp_path)
        # What a terminal shows of each line: the text after its last carriage return.
        shown = [line.rsplit("\r", 1)[-1] for line in output.split("\n")]
        results = [line for line in shown if line.endswith(tuple(texts)) or line.startswith("{")]
        assert len(results) == len(texts), output
        assert all(not re.search(r"\d+/\d+", line) for line in results), output


def test_start_up_imports_only_what_the_command_needs(run, tiny):
    """Item 29: `--help`, argument errors, `info` and tokenizer-only work never import torch, and
    `bloomlm --help` imports none of the heavy libraries (how fast that makes it is measured by
    scripts/startup_time.py, not asserted here: a timed test on a shared machine is a coin toss)."""
    heavy = ("torch", "numpy", "safetensors", "tokenizers", "jax", "tqdm")
    run("--help", block=heavy)
    for args in (["generate", "--help"], ["finetune", "qa", "--help"], ["info", str(tiny["lm"])]):
        run(*args, block=("torch",))
    code = (
        "import sys; sys.modules['torch'] = None; import bloomlm; "
        "tokenizer = bloomlm.AutoTokenizer.from_pretrained('bloomlm-tiny'); "
        "print(tokenizer.decode(tokenizer('tokenizer only')['input_ids']))"
    )
    tokenized = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV
    )
    assert tokenized.stdout == "tokenizer only\n", tokenized.stderr

"""`bloomlm classify / tag / answer` and the `bloomlm.tasks` functions behind them (issue 12):
untrained heads refused, one tag per word, long inputs within --max-length, QA windows over long
contexts, answers without surrounding whitespace, top-k and multi-label classification, JSONL
question batches, conflicting inputs, and '-' for stdin.
"""

from __future__ import annotations

import json
import re
import types

import pytest
import torch

from bloomlm import (
    AutoTokenizer,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
)
from bloomlm.tasks import answer_question, classify, tag
from conftest import ENV, FIXTURE_TOKENIZER, assert_one_line_error

LONG_TEXT = "This is a long review that goes on and on about many things. " * 6
QUESTION = "Where does John live?"
CONTEXT = "John lives in Paris, the capital of France."


def load(folder, model_class):
    return model_class.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


class Recording:
    """A model that notes the length of every input it is given (and otherwise is the model)."""

    def __init__(self, model):
        self.model, self.config, self.device, self.lengths = model, model.config, model.device, []

    def __call__(self, input_ids, **kwargs):
        self.lengths.append(input_ids.shape[1])
        return self.model(input_ids=input_ids, **kwargs)


class PointsAt:
    """A question-answering "model" whose answer is the token `token_id` wherever it is."""

    def __init__(self, token_id: int):
        self.token_id, self.device, self.lengths = token_id, torch.device("cpu"), []

    def __call__(self, input_ids, **kwargs):
        self.lengths.append(input_ids.shape[1])
        logits = 10.0 * (input_ids == self.token_id).float()
        return types.SimpleNamespace(start_logits=logits, end_logits=logits)


def test_a_folder_without_a_trained_head_is_refused(run, call, tiny):
    """Item 1: instead of labels from random head weights, one line naming the missing head and
    the command that trains one."""
    result = run("classify", "--model", "bloomlm-tiny", "I love it", ok=False)
    assert_one_line_error(result, "bloomlm-tiny has no trained score head")
    assert "`bloomlm finetune seq-cls --model bloomlm-tiny --train FILE --out DIR`" in result.stderr
    assert result.stdout == ""
    status, out, err = call("tag", "--model", str(tiny["cls"]), "John")  # a classifier's folder
    assert (status, out) == (1, "") and "no trained classifier head" in err
    assert "bloomlm finetune token-cls" in err
    args = ("answer", "--model", str(tiny["lm"]), "--question", "Who?", "--context", "John.")
    status, out, err = call(*args)
    assert (status, out) == (1, "") and "no trained qa_outputs head" in err and "finetune qa" in err


def test_tag_prints_one_row_per_word(run, call, tiny):
    """Item 3: words, not sub-word pieces, each labelled by its first token (tokenized as training
    does: every word on its own, a space before it), with character offsets."""
    text = "John lives in  Paris, France"
    rows = json.loads(run("tag", "--model", str(tiny["tag"]), "--jsonl", text).stdout)["words"]
    words = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    assert [(r["word"], r["start"], r["end"]) for r in rows] == words

    model = BloomForTokenClassification.from_pretrained(tiny["tag"])
    trained_like = AutoTokenizer.from_pretrained(tiny["tag"], add_prefix_space=True)
    encoding = trained_like([w for w, _, _ in words], is_split_into_words=True)
    with torch.no_grad():
        probabilities = model(torch.tensor([encoding["input_ids"]])).logits[0].softmax(-1)
    firsts = [encoding.word_ids().index(w) for w in range(len(words))]
    labels = [model.config.id2label[int(probabilities[t].argmax())] for t in firsts]
    assert [r["label"] for r in rows] == labels
    assert [r["score"] for r in rows] == pytest.approx(
        [float(probabilities[t].max()) for t in firsts]
    )

    table = call("tag", "--model", str(tiny["tag"]), text)[1].splitlines()
    assert table[0].split() == ["word", "label", "score", "start", "end"]
    assert [line.split()[:2] for line in table[1:]] == [
        [w, label] for (w, _, _), label in zip(words, labels)
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny["tag"])
    for aggregation in ("average", "max"):
        args = ("tag", "--model", str(tiny["tag"]), "--aggregation", aggregation, "--jsonl", text)
        printed = json.loads(call(*args)[1])["words"]
        expected = tag(model, tokenizer, text, aggregation)
        assert [(r["word"], r["label"]) for r in printed] == [
            (r["word"], r["label"]) for r in expected
        ]
        assert [r["score"] for r in printed] == pytest.approx([r["score"] for r in expected])


def test_long_inputs_stay_within_max_length(run, tiny):
    """Item 9: classify and tag truncate to --max-length tokens; the model never sees more."""
    model, tokenizer = load(tiny["cls"], BloomForSequenceClassification)
    printed = json.loads(
        run(
            "classify", "--model", str(tiny["cls"]), "--max-length", "8", "--jsonl", LONG_TEXT
        ).stdout
    )
    truncated = classify(model, tokenizer, [LONG_TEXT], max_length=8)[0]
    assert printed["label"] == truncated["label"]
    assert printed["score"] == pytest.approx(truncated["score"], abs=1e-6)
    assert truncated["scores"] != pytest.approx(
        classify(model, tokenizer, [LONG_TEXT])[0]["scores"]
    )

    recording = Recording(model)
    classify(recording, tokenizer, [LONG_TEXT, "short"], max_length=8)
    tagger, tokenizer = load(tiny["tag"], BloomForTokenClassification)
    recording_tagger = Recording(tagger)
    for aggregation in ("none", "first"):
        rows = tag(recording_tagger, tokenizer, LONG_TEXT, aggregation, max_length=8)
        assert 0 < len(rows) <= 8
    assert recording.lengths and max(recording.lengths + recording_tagger.lengths) <= 8


def test_answers_come_from_windows_over_a_long_context_without_whitespace():
    """Items 9 and 14: with --max-length the context is read in overlapping windows (no window is
    longer), so an answer past the first window is found; the span drops the space BLOOM's tokens
    carry before a word, and its offsets follow."""
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    (paris,) = tokenizer(" Paris")["input_ids"]
    filler = "lorem ipsum " * 40
    context = filler + "John lives in Paris."
    assert paris not in tokenizer(filler + "Where?")["input_ids"]  # only the answer points at it
    model = PointsAt(paris)
    result = answer_question(model, tokenizer, "Where?", context, max_length=24, doc_stride=8)
    start = context.index("Paris")
    assert result["answer"] == "Paris" and (result["start"], result["end"]) == (start, start + 5)
    assert len(model.lengths) > 1 and max(model.lengths) <= 24
    whole = answer_question(PointsAt(paris), tokenizer, "Where?", context)  # one window
    assert (whole["answer"], whole["start"]) == ("Paris", start)
    with pytest.raises(ValueError, match="must be more than doc_stride"):
        answer_question(model, tokenizer, "Where?", context, max_length=8, doc_stride=4)


def test_answer_jsonl_batches_with_windows(run, tiny):
    """Also expected: `answer --jsonl` reads {"question", "context"} lines; item 9 on the CLI."""
    requests = [
        {"question": QUESTION, "context": CONTEXT},
        {"question": "What is it about?", "context": LONG_TEXT},
    ]
    stdin = "".join(json.dumps(r) + "\n" for r in requests)
    out = run("answer", "--model", str(tiny["qa"]), "--jsonl", "--max-length", "40",
              "--doc-stride", "8", stdin=stdin).stdout  # fmt: skip
    model, tokenizer = load(tiny["qa"], BloomForQuestionAnswering)
    for line, request in zip(out.splitlines(), requests, strict=True):
        printed = json.loads(line)
        expected = answer_question(model, tokenizer, **request, max_length=40, doc_stride=8)
        assert printed["question"] == request["question"]
        assert {k: printed[k] for k in ("answer", "start", "end")} == {
            k: expected[k] for k in ("answer", "start", "end")
        }
        assert printed["answer"] == printed["answer"].strip()
        assert request["context"][printed["start"] : printed["end"]] == printed["answer"]


def test_classify_top_k_and_multi_label(run, call, tiny, tmp_path):
    """Also expected: --top-k label/probability pairs; a multi-label model prints every label
    whose (sigmoid) probability reaches --threshold."""
    texts = ["I love this", "This is terrible, really bad"]
    lines = run("classify", "--model", str(tiny["cls"]), "--top-k", "2", *texts).stdout.splitlines()
    model, tokenizer = load(tiny["cls"], BloomForSequenceClassification)
    expected = classify(model, tokenizer, texts, top_k=2)
    for line, result, text in zip(lines, expected, texts, strict=True):
        ranked = sorted(result["scores"].items(), key=lambda item: -item[1])[:2]
        assert line == "\t".join([f"{label}\t{score:.4f}" for label, score in ranked] + [text])

    model.config.problem_type = "multi_label_classification"
    model.save_pretrained(tmp_path / "multi")
    tokenizer.save_pretrained(tmp_path / "multi")
    with torch.no_grad():
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        probabilities = model(**inputs).logits.sigmoid()
    threshold = round(float(probabilities.flatten().median()), 4)  # some labels pass, some do not
    status, out, _ = call("classify", "--model", str(tmp_path / "multi"), "--threshold",
                          str(threshold), "--jsonl", *texts)  # fmt: skip
    assert status == 0
    names = [model.config.id2label[i] for i in range(probabilities.shape[1])]
    n_chosen = 0
    for line, row in zip(out.splitlines(), probabilities, strict=True):
        chosen = {name: float(p) for name, p in zip(names, row) if p >= threshold}
        printed = json.loads(line)["labels"]
        assert {item["label"]: item["score"] for item in printed} == pytest.approx(chosen)
        n_chosen += len(chosen)
    assert 0 < n_chosen < probabilities.numel()


def test_conflicting_inputs_are_refused_and_dash_is_stdin(run, call, tiny, tmp_path):
    """Item 18: texts and --file, --context and --context-file: an error, before anything loads;
    '-' reads stdin wherever a file is read."""
    (tmp_path / "texts.txt").write_text("hello\n")
    for args, fragment in [
        (
            ("classify", "I love this", "--file", "texts.txt"),
            "as arguments or with --file, not both",
        ),
        (
            (
                "answer",
                "--model",
                "m",
                "--question",
                "q",
                "--context",
                "c",
                "--context-file",
                "texts.txt",
            ),
            "--context or --context-file, not both",
        ),  # fmt: skip
        (("generate", "hello", "-i"), "-i reads prompts from the terminal"),
    ]:
        assert_one_line_error(run(*args, ok=False, block=("torch",)), fragment, status=2)

    out = run(
        "classify", "--model", str(tiny["cls"]), "--file", "-", "--jsonl", stdin="I love this\n"
    )
    model, tokenizer = load(tiny["cls"], BloomForSequenceClassification)
    expected = classify(model, tokenizer, ["I love this"])[0]
    assert json.loads(out.stdout)["score"] == pytest.approx(expected["score"], abs=1e-6)
    args = ("answer", "--model", str(tiny["qa"]), "--question", QUESTION, "--context-file", "-")
    status, out, _ = call(*args, "--json", stdin=CONTEXT)
    qa, tokenizer = load(tiny["qa"], BloomForQuestionAnswering)
    assert (
        status == 0
        and json.loads(out)["start"]
        == answer_question(qa, tokenizer, QUESTION, CONTEXT, max_length=384)["start"]
    )


def test_every_command_that_runs_a_model_gets_openmps_passive_wait_policy(run, tiny):
    """Issue 12: OpenMP reads OMP_WAIT_POLICY once, when torch loads it, so the CLI must set it
    before any command imports torch (`classify` once imported torch first, to set its thread
    count). libgomp's verbose display, printed as torch loads it, shows the policy it took:
    PASSIVE means a spin count of 0 (its default spins 300000 times before sleeping)."""
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"} | {"OMP_DISPLAY_ENV": "VERBOSE"}
    for args in (
        ("classify", "--model", str(tiny["cls"]), "fine"),
        ("tag", "--model", str(tiny["tag"]), "John lives"),
        ("answer", "--model", str(tiny["qa"]), "--question", "Who?", "--context", CONTEXT),
        ("generate", "--model", str(tiny["lm"]), "--max-new-tokens", "1", "Hi"),
    ):
        spin = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", run(*args, env=env).stderr)
        if not spin:
            pytest.skip("torch's OpenMP runtime here is not libgomp (no GOMP_SPINCOUNT shown)")
        assert spin == ["0"], f"bloomlm {args[0]}: OpenMP spin count {spin}, PASSIVE gives 0"

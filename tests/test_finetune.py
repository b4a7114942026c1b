"""bloomlm.finetune: each task trains on a tiny file, lowers its loss, saves a loadable folder, and resumes.

Models are tiny random BLOOMs (hidden 32, 2 layers) with the fixture tokenizer, built with bloomlm itself,
so these tests need neither transformers nor the embedded models, and run in a few seconds on one thread.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from bloomlm import (
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
)
from bloomlm.finetune import (
    STATE_DIR,
    FinetuneConfig,
    FinetuneError,
    best_span,
    char_span_to_tokens,
    encode_question,
    finetune,
    label_names,
    linear_schedule,
    read_records,
    squad_scores,
    token_f1,
)

FIXTURE_TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"

CAUSAL_TEXTS = [
    f"the {animal} sat on the {thing} and looked at the {thing}."
    for animal in ("cat", "dog", "bird", "fox")
    for thing in ("mat", "box", "rug")
]
POSITIVE = ["good and nice", "nice, very good", "great good fun", "lovely nice day", "good good good", "so nice"]
NEGATIVE = ["bad and awful", "awful, very bad", "terrible bad day", "bad bad bad", "so awful", "horrible and bad"]


def _quiet(message: str) -> None:
    """Log sink: the tests read results, not log lines."""


def make_model(folder: pathlib.Path, model_class: type, **config_overrides) -> pathlib.Path:
    """A tiny random model of `model_class` plus the fixture tokenizer, saved in `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_overrides,
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, one_thread) -> pathlib.Path:
    return make_model(tmp_path_factory.mktemp("base"), BloomForCausalLM)


def test_causal_lm_lowers_loss_saves_a_loadable_folder_and_resumes(tmp_path, base_model):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in CAUSAL_TEXTS])
    out = tmp_path / "out"
    config = FinetuneConfig(
        task="causal-lm", model=str(base_model), train_file=str(data), eval_file=str(data), out_dir=str(out),
        epochs=1, batch_size=4, learning_rate=1e-2, warmup_ratio=0.2,
    )  # fmt: skip
    result = finetune(config, log=_quiet)
    before, after = result.history[0], result.history[-1]
    assert before["epoch"] == 0 and after["epoch"] == 1
    assert after["loss"] < before["loss"] - 0.5, result.history
    assert after["perplexity"] < before["perplexity"]

    model = BloomForCausalLM.from_pretrained(out)  # a normal model folder, tokenizer included
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size
    assert (out / STATE_DIR / "optimizer.pt").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    config.epochs = 2
    resumed = finetune(config, resume=True, log=_quiet)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    state = json.loads((out / STATE_DIR / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 2 * 3  # 12 texts / batch 4 = 3 steps per epoch
    assert resumed.history[2]["loss"] < resumed.history[1]["loss"]


def test_refuses_to_overwrite_and_resume_needs_state(tmp_path, base_model):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in CAUSAL_TEXTS])
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    config = FinetuneConfig(task="causal-lm", model=str(base_model), train_file=str(data), out_dir=str(out))
    with pytest.raises(FinetuneError, match="not empty; pass --resume"):
        finetune(config, log=_quiet)
    with pytest.raises(FinetuneError, match="nothing to resume"):
        finetune(config, resume=True, log=_quiet)


def test_sequence_classification_maps_string_labels_from_csv(tmp_path, base_model):
    lines = ["text,label"] + [f'"{t}",pos' for t in POSITIVE] + [f'"{t}",neg' for t in NEGATIVE]
    data = tmp_path / "train.csv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "cls"
    config = FinetuneConfig(
        task="seq-cls", model=str(base_model), train_file=str(data), eval_file=str(data), out_dir=str(out),
        epochs=3, batch_size=4, learning_rate=1e-2,
        gradient_accumulation_steps=2, bf16=True, gradient_checkpointing=True,
    )  # fmt: skip
    result = finetune(config, log=_quiet)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {"accuracy", "f1"} <= set(result.best_metrics)
    model = BloomForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config.label2id == {"neg": 0, "pos": 1}
    assert model.config.problem_type == "single_label_classification"


def test_token_classification_and_qa_train_and_save(tmp_path, base_model):
    tagged = [
        {"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]},
        {"tokens": "Mary visited London today", "tags": "B-PER O B-LOC O"},  # space-separated strings work too
    ]
    data = write_jsonl(tmp_path / "tags.jsonl", tagged * 3)
    result = finetune(
        FinetuneConfig(task="token-cls", model=str(base_model), train_file=str(data), eval_file=str(data),
                       out_dir=str(tmp_path / "tagger"), epochs=2, batch_size=2, learning_rate=1e-2),
        log=_quiet,
    )  # fmt: skip
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {"f1", "precision", "recall", "accuracy"} <= set(result.best_metrics)
    tagger = BloomForTokenClassification.from_pretrained(tmp_path / "tagger")
    assert sorted(tagger.config.label2id) == ["B-LOC", "B-PER", "O"]

    context = "The capital of France is Paris. It is on the Seine."
    squad = {"question": "What is the capital of France?", "context": context,
             "answers": {"text": ["Paris"], "answer_start": [context.index("Paris")]}}  # fmt: skip
    flat = {"question": "Which river?", "context": context, "answers": "the Seine"}  # start found by search
    data = write_jsonl(tmp_path / "qa.jsonl", [squad, flat] * 3)
    result = finetune(
        FinetuneConfig(task="qa", model=str(base_model), train_file=str(data), eval_file=str(data),
                       out_dir=str(tmp_path / "qa"), epochs=2, batch_size=2, learning_rate=1e-2),
        log=_quiet,
    )  # fmt: skip
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {"exact_match", "f1"} <= set(result.best_metrics)
    BloomForQuestionAnswering.from_pretrained(tmp_path / "qa")


def test_bad_data_fails_before_anything_is_written(tmp_path, base_model):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "meh", "label": "neutral"}])
    out = tmp_path / "out"
    config = FinetuneConfig(
        task="seq-cls", model=str(base_model), train_file=str(data), eval_file=str(evaluation), out_dir=str(out)
    )
    with pytest.raises(FinetuneError, match=r"labels \['neutral'\] not among"):
        finetune(config, log=_quiet)
    config.eval_file, config.text_column = None, "sentence"
    with pytest.raises(FinetuneError, match="no column 'sentence'.*--text-column"):
        finetune(config, log=_quiet)
    assert not out.exists()
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(FinetuneError, match="unknown data format"):
        read_records(tmp_path / "x.parquet")


def test_span_helpers_find_the_answer_characters():
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    context = "The capital of France is Paris."
    encoding = encode_question(tokenizer, "Where?", context)
    start, end = char_span_to_tokens(encoding, context.index("Paris"), context.index("Paris") + 5)
    offsets = encoding["offset_mapping"]
    assert context[offsets[start][0] : offsets[end][1]].strip() == "Paris"
    logits = torch.full((len(encoding["input_ids"]),), -10.0)
    start_logits, end_logits = logits.clone(), logits.clone()
    start_logits[start], end_logits[end] = 10.0, 10.0
    start_logits[0] = 50.0  # a question token: must be ignored
    assert best_span(start_logits, end_logits, encoding)[:2] == (start, end)


def test_metrics_and_schedule():
    assert squad_scores("the Paris", ["Paris"]) == (1.0, 1.0)
    assert squad_scores("Paris France", ["Paris"]) == (0.0, pytest.approx(2 / 3))
    scores = token_f1(["B-PER", "O", "B-LOC", "O"], ["B-PER", "O", "O", "B-LOC"])
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["accuracy"] == 0.5
    assert label_names(["10", "9", "2"]) == ["2", "9", "10"] and label_names(["pos", "neg"]) == ["neg", "pos"]
    factor = linear_schedule(total_steps=10, warmup_steps=2)
    assert [round(factor(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]

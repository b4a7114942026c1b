"""bloomlm.finetune: each task trains on a tiny file, lowers its loss, saves a loadable folder, and
resumes; and each stage of the loop (prepare, restore, train_epoch, end_epoch) on its own.

Models are tiny random BLOOMs (hidden 32, 2 layers) with the fixture tokenizer, built with bloomlm
itself, so these tests need neither transformers nor the embedded models, and run in a few seconds
on one thread.
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
    metrics,
    tasks,
)
from bloomlm import finetune as finetune_module
from bloomlm.finetune import (
    OPTIMIZER_FILE,
    RESULTS_FILE,
    STATE_DIR,
    STATE_FILE,
    FinetuneConfig,
    FinetuneError,
    end_epoch,
    evaluate,
    finetune,
    label_names,
    linear_schedule,
    prepare,
    read_records,
    restore,
    train_epoch,
)
from bloomlm.metrics import squad_scores, token_f1
from bloomlm.tasks import best_span, char_span_to_tokens, encode_question

FIXTURE_TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"

CAUSAL_TEXTS = [
    f"the {animal} sat on the {thing} and looked at the {thing}."
    for animal in ("cat", "dog", "bird", "fox")
    for thing in ("mat", "box", "rug")
]
POSITIVE = [
    "good and nice",
    "nice, very good",
    "great good fun",
    "lovely nice day",
    "good good good",
    "so nice",
]
NEGATIVE = [
    "bad and awful",
    "awful, very bad",
    "terrible bad day",
    "bad bad bad",
    "so awful",
    "horrible and bad",
]


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
        task="causal-lm", model=str(base_model), train_file=str(data), eval_file=str(data),
        out_dir=str(out), epochs=1, batch_size=4, learning_rate=1e-2, warmup_ratio=0.2,
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
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], (
        "temporary folders left behind"
    )

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
    config = FinetuneConfig(
        task="causal-lm", model=str(base_model), train_file=str(data), out_dir=str(out)
    )
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
        task="seq-cls", model=str(base_model), train_file=str(data), eval_file=str(data),
        out_dir=str(out), epochs=3, batch_size=4, learning_rate=1e-2,
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
        {
            "tokens": "Mary visited London today",
            "tags": "B-PER O B-LOC O",
        },  # space-separated strings work too
    ]
    data = write_jsonl(tmp_path / "tags.jsonl", tagged * 3)
    result = finetune(
        FinetuneConfig(task="token-cls", model=str(base_model), train_file=str(data),
                       eval_file=str(data), out_dir=str(tmp_path / "tagger"), epochs=2,
                       batch_size=2, learning_rate=1e-2),
        log=_quiet,
    )  # fmt: skip
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {"f1", "precision", "recall", "accuracy"} <= set(result.best_metrics)
    tagger = BloomForTokenClassification.from_pretrained(tmp_path / "tagger")
    assert sorted(tagger.config.label2id) == ["B-LOC", "B-PER", "O"]

    context = "The capital of France is Paris. It is on the Seine."
    squad = {"question": "What is the capital of France?", "context": context,
             "answers": {"text": ["Paris"], "answer_start": [context.index("Paris")]}}  # fmt: skip
    flat = {
        "question": "Which river?",
        "context": context,
        "answers": "the Seine",
    }  # start found by search
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
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}],
    )
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "meh", "label": "neutral"}])
    out = tmp_path / "out"
    config = FinetuneConfig(
        task="seq-cls",
        model=str(base_model),
        train_file=str(data),
        eval_file=str(evaluation),
        out_dir=str(out),
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
    assert label_names(["10", "9", "2"]) == ["2", "9", "10"] and label_names(["pos", "neg"]) == [
        "neg",
        "pos",
    ]
    factor = linear_schedule(total_steps=10, warmup_steps=2)
    assert [round(factor(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_moved_names_stay_importable_from_finetune():
    moved = {
        tasks: ["classify", "tag", "answer_question", "encode_question", "char_span_to_tokens",
                "best_span", "MAX_ANSWER_TOKENS"],
        metrics: ["accuracy_and_macro_f1", "token_f1", "squad_scores"],
    }  # fmt: skip
    for module, names in moved.items():
        for name in names:
            assert getattr(finetune_module, name) is getattr(module, name), name


# -- the stages of the training loop, one at a time ------------------------------------------------


def causal_config(tmp_path: pathlib.Path, base_model: pathlib.Path, **overrides) -> FinetuneConfig:
    """causal-lm on the 12 CAUSAL_TEXTS, batch 4: 3 optimizer steps per epoch."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in CAUSAL_TEXTS])
    options = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0} | overrides
    return FinetuneConfig(
        task="causal-lm", model=str(base_model), train_file=str(data),
        out_dir=str(tmp_path / "out"), **options,
    )  # fmt: skip


def test_prepare_maps_labels_sizes_the_schedule_and_writes_nothing(tmp_path, base_model):
    rows = [{"text": t, "label": "pos"} for t in POSITIVE]
    rows += [{"text": t, "label": "neg"} for t in NEGATIVE]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    config = FinetuneConfig(
        task="seq-cls", model=str(base_model), train_file=str(data), out_dir=str(tmp_path / "out"),
        epochs=2, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, warmup_ratio=0.5,
    )  # fmt: skip
    run = prepare(config, log=_quiet)
    assert run.model.training and run.model.config.id2label == {0: "neg", 1: "pos"}
    assert sorted(f["labels"] for f in run.train_features) == [0] * 6 + [1] * 6
    # 12 examples / (batch 2 x accumulation 2) = 3 steps per epoch, 6 in all, half of them warmup
    assert (run.steps_per_epoch, run.total_steps, run.warmup_steps) == (3, 6, 3)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)  # warmup's first step
    assert run.eval_features is None and run.progress.step == 0
    assert not (tmp_path / "out").exists()
    config.learning_rate = 0.0
    with pytest.raises(FinetuneError, match="learning-rate must be positive"):
        prepare(config, log=_quiet)


def test_train_epoch_lowers_the_loss_and_counts_optimizer_steps(tmp_path, base_model):
    run = prepare(causal_config(tmp_path, base_model), log=_quiet)
    before = evaluate(run.model, run.train_features, "causal-lm", run.pad_token_id, 4)["loss"]
    train_loss = train_epoch(run, epoch=0)
    after = evaluate(run.model, run.train_features, "causal-lm", run.pad_token_id, 4)["loss"]
    assert after < before - 0.5, (before, after)
    assert 0 < train_loss < before + 0.1  # the mean of the epoch's batches, from `before` down
    assert run.progress.step == 3 and run.scheduler.last_epoch == 3
    assert not (tmp_path / "out").exists(), "train_epoch must not write"

    # 3 micro-batches with accumulation 2: a step after the second, and one for the last alone
    run = prepare(causal_config(tmp_path, base_model, gradient_accumulation_steps=2), log=_quiet)
    train_epoch(run, epoch=0)
    assert run.progress.step == 2
    run = prepare(causal_config(tmp_path, base_model, max_steps=2), log=_quiet)
    train_epoch(run, epoch=0)
    assert run.progress.step == 2


def test_end_epoch_keeps_the_best_epoch_and_saves_the_latest_state(tmp_path, base_model):
    run = prepare(causal_config(tmp_path, base_model, epochs=3), log=_quiet)
    out = tmp_path / "out"
    bias = run.model.transformer.ln_f.bias
    # Without evaluation data the lowest training loss is the best; mark each epoch's weights.
    for epoch, train_loss in enumerate([2.0, 3.0, 1.0, 1.5]):
        with torch.no_grad():
            bias.fill_(float(epoch))
        epoch_metrics = end_epoch(run, epoch, train_loss)
        assert epoch_metrics == {"train_loss": train_loss}
        results = json.loads((out / RESULTS_FILE).read_text())
        state = json.loads((out / STATE_DIR / STATE_FILE).read_text())
        best_epoch = {0: 1, 1: 1, 2: 3, 3: 3}[epoch]
        assert results["best_epoch"] == best_epoch and state["epoch"] == epoch + 1
        assert [h["epoch"] for h in state["history"]] == list(range(1, epoch + 2))
        best = BloomForCausalLM.from_pretrained(out).transformer.ln_f.bias
        latest = BloomForCausalLM.from_pretrained(out / STATE_DIR).transformer.ln_f.bias
        assert torch.all(best == best_epoch - 1) and torch.all(latest == epoch)
    assert state["best"] == pytest.approx(metrics.perplexity(1.0))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left"


def test_restore_puts_back_optimizer_scheduler_and_progress(tmp_path, base_model):
    run = prepare(causal_config(tmp_path, base_model), log=_quiet)
    end_epoch(run, 0, train_epoch(run, 0))
    saved = torch.load(tmp_path / "out" / STATE_DIR / OPTIMIZER_FILE, weights_only=True)
    state = json.loads((tmp_path / "out" / STATE_DIR / STATE_FILE).read_text())

    resumed = prepare(causal_config(tmp_path, base_model, epochs=2), resumed=True, log=_quiet)
    assert resumed.optimizer.state_dict()["state"] == {}  # a fresh optimizer until restored
    restore(resumed, state)
    restored = resumed.optimizer.state_dict()
    assert restored["state"].keys() == saved["optimizer"]["state"].keys()
    for index, moments in saved["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(restored["state"][index][key], moments[key])
    assert resumed.scheduler.last_epoch == 3 and resumed.progress.step == 3
    assert resumed.progress.epoch == 1 and resumed.progress.history == state["history"]
    assert resumed.progress.best == state["best"]
    # The schedule is stretched to this run's 2 epochs (6 steps): at step 3 it is half way down.
    assert resumed.scheduler.lr_lambdas[0](3) == pytest.approx(0.5)
    saved_groups = saved["optimizer"]["param_groups"]
    for group, saved_group in zip(resumed.optimizer.param_groups, saved_groups):
        assert group["lr"] == pytest.approx(saved_group["lr"])

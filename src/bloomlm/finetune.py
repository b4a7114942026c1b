"""Fine-tuning the four BLOOM heads: the options, the data, and the training loop behind
`bloomlm finetune`.

    task       model class                     data (CSV or JSONL rows)                 best metric
    seq-cls    BloomForSequenceClassification  text [, text pair], label                accuracy
    token-cls  BloomForTokenClassification     tokens (list or space-separated), tags   token F1
    qa         BloomForQuestionAnswering       question, context, answers (SQuAD dict,  F1
                                               or answer text [+ answer_start])
    causal-lm  BloomForCausalLM                text                                     perplexity

Training: AdamW (no weight decay on biases and LayerNorms), linear warmup then linear decay,
gradient accumulation, optional bf16 autocast and gradient checkpointing, evaluation before training
and after each epoch. `finetune()` runs four stages, each a function of its own:

    prepare(config)                    options checked; tokenizer, features, model, optimizer
                                       and schedule in a TrainingRun (data errors raised here)
    restore(run, state)                a resumed run: optimizer, scheduler and progress as saved
    train_epoch(run, epoch)            one pass over the shuffled batches -> mean training loss
    end_epoch(run, epoch, train_loss)  evaluate, keep the best model, save `training_state/`

The output folder is a normal model folder (config, weights, tokenizer files) holding the best
epoch's model, plus `training_state/` (the latest epoch's weights, optimizer, scheduler and
counters) that `resume=True` continues from. Each is saved as one commit
(`bloomlm.files.folder_save`), so a crash leaves the previous best model and the previous state,
never half of one.

Inference with the trained heads lives in `bloomlm.tasks`, the metrics in `bloomlm.metrics`; their
names stay importable from here too.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bloomlm import checkpoint, files
from bloomlm.config import CONFIG_NAME, BloomConfig
from bloomlm.files import atomic_write_text
from bloomlm.generation import GENERATION_CONFIG_NAME
from bloomlm.metrics import accuracy_and_macro_f1, perplexity, squad_scores, token_f1
from bloomlm.tasks import MAX_ANSWER_TOKENS as MAX_ANSWER_TOKENS  # re-exported: its old home
from bloomlm.tasks import answer_question as answer_question  # re-exported: its old home
from bloomlm.tasks import best_span, char_span_to_tokens, encode_question
from bloomlm.tasks import classify as classify  # re-exported: its old home
from bloomlm.tasks import tag as tag  # re-exported: its old home
from bloomlm.tokenizer import AutoTokenizer, BloomTokenizerFast
from bloomlm.tokenizer_files import SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from bloomlm.torch.model import (
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
)

TASKS: dict[str, type[nn.Module]] = {
    "seq-cls": BloomForSequenceClassification,
    "token-cls": BloomForTokenClassification,
    "qa": BloomForQuestionAnswering,
    "causal-lm": BloomForCausalLM,
}
BEST_METRIC = {"seq-cls": "accuracy", "token-cls": "f1", "qa": "f1", "causal-lm": "perplexity"}
STATE_DIR = "training_state"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RESULTS_FILE = "eval_results.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)
IGNORE_INDEX = -100
# Options a resumed run may change; the ones that define its data must stay as they were saved.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "save_steps", "device", "threads")
SAME_RUN = (
    "task", "train_file", "eval_file", "model", "text_column", "text_pair_column", "label_column",
    "labels", "tokens_column", "tags_column", "question_column", "context_column",
    "answers_column", "answer_start_column", "max_length",
)  # fmt: skip
# Command-line flags whose name is not the field's.
_FLAGS = {"train_file": "--train", "eval_file": "--eval", "out_dir": "--out"}

LabelMaps = tuple[dict[int, str], dict[str, int]]  # (id2label, label2id)


class FinetuneError(ValueError):
    """A problem with the data, the options or the output folder, worded for whoever runs it."""


def flag(name: str) -> str:
    """The `bloomlm finetune` flag of a FinetuneConfig field: messages name flags, not fields."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass
class FinetuneConfig:
    """Everything a run needs; stored in `training_state/trainer_state.json` for `resume`."""

    task: str
    train_file: str
    out_dir: str
    eval_file: str | None = None
    model: str = "bloomlm-tiny"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None  # names in id order; default: sorted labels of the train file
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    answer_start_column: str = "answer_start"
    max_length: int = 128
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps in all, counted across epochs (for quick runs)
    save_steps: int | None = None  # also save training_state/ every this many optimizer steps
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    group_by_length: bool = True  # batch examples of similar length together (less padding)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def check(self) -> None:
        """FinetuneError naming the first option out of range."""
        if self.task not in TASKS:
            raise FinetuneError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "max_length"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_steps", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FinetuneError(f"{flag(name)} must be at least 1, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise FinetuneError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise FinetuneError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise FinetuneError(f"--weight-decay must be >= 0, got {self.weight_decay}")


# -- data files ------------------------------------------------------------------------------------


class Records(list):
    """The rows of a data file (dicts), and the line each starts on, as a text editor counts."""

    def __init__(self, rows: list[dict[str, Any]], lines: list[int]) -> None:
        super().__init__(rows)
        self.lines = lines


def _shown(path: str | os.PathLike) -> str:
    """A data file's name in messages ("-" is stdin)."""
    return "stdin" if os.fspath(path) == "-" else os.fspath(path)


def _line(rows: list[dict[str, Any]], index: int) -> str:
    """Where row `index` is, for messages: "line 7" (or "row 7" for rows not read from a file)."""
    lines = getattr(rows, "lines", None)
    return f"line {lines[index]}" if lines else f"row {index + 1}"


def read_records(path: str | os.PathLike) -> Records:
    """Rows of a `.csv`/`.tsv` file (header line first) or a `.jsonl`/`.json` file (JSON lines);
    "-" reads stdin (JSON lines when it starts with "{", else TSV when its header has a tab, else
    CSV). A CSV row with more or fewer fields than the header is an error naming its line."""
    if os.fspath(path) == "-":
        text = sys.stdin.read()
        first = text.lstrip()[:1]
        header = text.split("\n", 1)[0]
        suffix = ".jsonl" if first == "{" else ".tsv" if "\t" in header else ".csv"
        return _parse_records(io.StringIO(text, newline=None), "stdin", suffix)
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json"):
        raise FinetuneError(
            f"{path}: unknown data format '{suffix}'; use .csv, .tsv, .jsonl or .json (JSON lines)"
        )
    with path.open(newline="", encoding="utf-8") as handle:
        return _parse_records(handle, str(path), suffix)


def _parse_records(handle: Any, name: str, suffix: str) -> Records:
    if suffix in (".csv", ".tsv"):
        records = _read_csv(handle, name, "\t" if suffix == ".tsv" else ",")
    else:
        records = _read_json_lines(handle, name)
    if not records:
        raise FinetuneError(f"{name} holds no rows")
    return records


def _read_csv(handle: Any, name: str, delimiter: str) -> Records:
    reader = csv.reader(handle, delimiter=delimiter)
    header = next(reader, None)
    rows, lines = [], []
    start = reader.line_num + 1  # a quoted field may span lines: a row starts after the last one
    for values in reader:
        line, start = start, reader.line_num + 1
        if not values:
            continue  # a blank line
        if header is None or len(values) != len(header):
            raise FinetuneError(
                f"{name} line {line} has {len(values)} fields but the header has "
                f"{len(header or [])} ({', '.join(header or [])})"
            )
        rows.append(dict(zip(header, values)))
        lines.append(line)
    return Records(rows, lines)


def _read_json_lines(handle: Any, name: str) -> Records:
    rows, lines = [], []
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FinetuneError(f"{name} line {number} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise FinetuneError(f"{name} line {number} is not a JSON object")
        rows.append(row)
        lines.append(number)
    return Records(rows, lines)


def _column(rows: list[dict[str, Any]], name: str, path: str, option: str) -> list[Any]:
    """The values of column `name`; an error naming the line of a row without it (or with null)."""
    for index, row in enumerate(rows):
        if name not in row:
            columns = ", ".join(map(str, row)) or "none"
            raise FinetuneError(
                f"{path} {_line(rows, index)} has no column '{name}' (it has: {columns}); "
                f"pass {option}"
            )
        if row[name] is None:
            raise FinetuneError(f"{path} {_line(rows, index)}: column '{name}' is null")
    return [row[name] for row in rows]


def _label_column(rows: list[dict[str, Any]], name: str, path: str, option: str) -> list[str]:
    """A label per row; an empty one is an error naming its line (never a class named '')."""
    labels = [str(value) for value in _column(rows, name, path, option)]
    for index, label in enumerate(labels):
        if not label.strip():
            raise FinetuneError(
                f"{path} {_line(rows, index)}: the label (column '{name}') is empty"
            )
    return labels


def _words(value: Any) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith("[") else value.split()
    return [str(item) for item in value]


def label_names(values: Sequence[Any]) -> list[str]:
    """Distinct labels in a stable order: numerically when every label is a number, else sorted."""
    distinct = sorted({str(value) for value in values})
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return distinct


# -- features: tokenised examples, padded into batches ---------------------------------------------


def _seq_cls_features(rows, config: FinetuneConfig, tokenizer, label2id, path) -> list[dict]:
    texts = [str(t) for t in _column(rows, config.text_column, path, "--text-column")]
    pairs = None
    if config.text_pair_column:
        column = _column(rows, config.text_pair_column, path, "--text-pair-column")
        pairs = [str(t) for t in column]
    labels = _label_column(rows, config.label_column, path, "--label-column")
    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        raise FinetuneError(
            f"{path} has labels {unknown} not among the model's labels {list(label2id)}"
        )
    encoded = tokenizer(texts, pairs, truncation=True, max_length=config.max_length)
    return [
        {"input_ids": ids, "labels": label2id[label]}
        for ids, label in zip(encoded["input_ids"], labels)
    ]


def _token_cls_features(rows, config: FinetuneConfig, tokenizer, label2id, path) -> list[dict]:
    features = []
    all_words = [_words(w) for w in _column(rows, config.tokens_column, path, "--tokens-column")]
    all_tags = [_words(t) for t in _column(rows, config.tags_column, path, "--tags-column")]
    for index, (words, tags) in enumerate(zip(all_words, all_tags)):
        where = _line(rows, index)
        if len(words) != len(tags):
            raise FinetuneError(f"{path} {where} has {len(words)} tokens but {len(tags)} tags")
        unknown = sorted(set(tags) - set(label2id))
        if unknown:
            raise FinetuneError(f"{path} {where} has tags {unknown} not among {list(label2id)}")
        encoding = tokenizer(
            words, is_split_into_words=True, truncation=True, max_length=config.max_length
        )
        labels, previous = [], None
        for word in encoding.word_ids():
            # Only a word's first token carries its tag; later pieces and special tokens don't.
            first = word is not None and word != previous
            labels.append(label2id[tags[word]] if first else IGNORE_INDEX)
            previous = word
        features.append(
            {"input_ids": encoding["input_ids"], "labels": labels, "words": words, "tags": tags}
        )
    return features


def _answers(
    row: dict[str, Any], config: FinetuneConfig, context: str, path: str, where: str
) -> list[tuple]:
    """[(answer text, start character)] from a SQuAD `answers` dict, or an answer text (+ start)."""
    if config.answers_column not in row:
        raise FinetuneError(
            f"{path} {where} has no column '{config.answers_column}' "
            f"(it has: {', '.join(row)}); pass --answers-column"
        )
    value = row[config.answers_column]
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = json.loads(value)
    if isinstance(value, dict):
        starts = value.get("answer_start", [])
        return [(str(t), int(s)) for t, s in zip(value.get("text", []), starts)]
    text = str(value)
    start = row.get(config.answer_start_column)
    start = context.find(text) if start in (None, "") else int(start)
    if start < 0 or context[start : start + len(text)] != text:
        raise FinetuneError(
            f"{path} {where}: answer {text!r} is not in the context at character {start}"
        )
    return [(text, start)]


def _qa_features(rows, config: FinetuneConfig, tokenizer, label2id, path) -> list[dict]:
    questions = [str(q) for q in _column(rows, config.question_column, path, "--question-column")]
    contexts = [str(c) for c in _column(rows, config.context_column, path, "--context-column")]
    features = []
    for index, (row, question, context) in enumerate(zip(rows, questions, contexts)):
        answers = _answers(row, config, context, path, _line(rows, index))
        encoding = encode_question(tokenizer, question, context, config.max_length)
        # An answer cut off by truncation (or none at all) points at position 0, as in SQuAD 2.
        start, end = 0, 0
        if answers:
            text, char_start = answers[0]
            span = char_span_to_tokens(encoding, char_start, char_start + len(text))
            if span is not None:
                start, end = span
        features.append(
            {
                "input_ids": encoding["input_ids"],
                "start_positions": start,
                "end_positions": end,
                "encoding": encoding,
                "context": context,
                "answers": [a[0] for a in answers],
            }
        )
    return features


def _causal_lm_features(rows, config: FinetuneConfig, tokenizer, label2id, path) -> list[dict]:
    texts = [str(t) for t in _column(rows, config.text_column, path, "--text-column")]
    features = []
    for ids in tokenizer(texts, truncation=True, max_length=config.max_length - 1)["input_ids"]:
        ids = [*ids, tokenizer.eos_token_id]
        features.append({"input_ids": ids, "labels": list(ids)})
    return features


_FEATURES = {
    "seq-cls": _seq_cls_features,
    "token-cls": _token_cls_features,
    "qa": _qa_features,
    "causal-lm": _causal_lm_features,
}


def _padded(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad on the right (positions come from the mask, so the side does not matter to BLOOM)."""
    ids = [f["input_ids"] for f in features]
    width = max(len(row) for row in ids)
    batch = {
        "input_ids": _padded(ids, width, pad_token_id),
        "attention_mask": _padded([[1] * len(row) for row in ids], width, 0),
    }
    first = features[0]
    if isinstance(first.get("labels"), list):
        batch["labels"] = _padded([f["labels"] for f in features], width, IGNORE_INDEX)
    elif "labels" in first:
        batch["labels"] = torch.tensor([f["labels"] for f in features])
    for key in ("start_positions", "end_positions"):
        if key in first:
            batch[key] = torch.tensor([f[key] for f in features])
    return batch


def _batches(
    features: list[dict], batch_size: int, order: list[int] | None = None
) -> Iterator[list[dict]]:
    order = list(range(len(features))) if order is None else order
    for start in range(0, len(order), batch_size):
        yield [features[i] for i in order[start : start + batch_size]]


def training_batches(
    features: list[dict], batch_size: int, seed: int, group_by_length: bool
) -> list[list[dict]]:
    """One epoch's batches in a random order fixed by `seed` (so a resumed run sees the same order).

    With `group_by_length`, examples of similar length share a batch (sorted within windows of 50
    batches, then the batches shuffled): far less padding to compute on, still a random order.
    """
    rng = random.Random(seed)
    order = list(range(len(features)))
    rng.shuffle(order)
    if group_by_length:
        window = 50 * batch_size
        for start in range(0, len(order), window):
            order[start : start + window] = sorted(
                order[start : start + window],
                key=lambda i: len(features[i]["input_ids"]),
                reverse=True,
            )
    batches = list(_batches(features, batch_size, order))
    if group_by_length:
        rng.shuffle(batches)
    return batches


# -- evaluation ------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """What evaluation collects batch by batch before the task's metric is computed."""

    predictions: list[Any] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)
    qa_scores: list[tuple[float, float]] = field(default_factory=list)  # (exact match, F1)


def _tally_seq_cls(tally: _Tally, model, chunk: list[dict], batch: dict, output) -> None:
    tally.predictions += output.logits.argmax(-1).tolist()
    tally.references += batch["labels"].tolist()


def _tally_token_cls(tally: _Tally, model, chunk: list[dict], batch: dict, output) -> None:
    id2label = model.config.id2label
    for feature, row in zip(chunk, output.logits.argmax(-1).tolist()):
        firsts = [p for p, label in zip(row, feature["labels"]) if label != IGNORE_INDEX]
        tally.predictions += [id2label[p] for p in firsts]
        tally.references += feature["tags"][: len(firsts)]


def _tally_qa(tally: _Tally, model, chunk: list[dict], batch: dict, output) -> None:
    for i, feature in enumerate(chunk):
        n = len(feature["input_ids"])
        start_logits, end_logits = output.start_logits[i, :n].cpu(), output.end_logits[i, :n].cpu()
        start, end, _ = best_span(start_logits, end_logits, feature["encoding"])
        offsets = feature["encoding"]["offset_mapping"]
        prediction = feature["context"][offsets[start][0] : offsets[end][1]]
        tally.qa_scores.append(squad_scores(prediction, feature["answers"]))


def _tally_nothing(tally: _Tally, model, chunk: list[dict], batch: dict, output) -> None:
    """causal-lm: perplexity needs only the loss."""


_TALLY = {
    "seq-cls": _tally_seq_cls,
    "token-cls": _tally_token_cls,
    "qa": _tally_qa,
    "causal-lm": _tally_nothing,
}


def _task_metrics(task: str, tally: _Tally, loss: float, n_labels: int) -> dict[str, float]:
    if task == "seq-cls":
        return accuracy_and_macro_f1(tally.predictions, tally.references, n_labels)
    if task == "token-cls":
        return token_f1(tally.predictions, tally.references)
    if task == "qa":
        n = len(tally.qa_scores)
        return {
            "exact_match": sum(s[0] for s in tally.qa_scores) / n,
            "f1": sum(s[1] for s in tally.qa_scores) / n,
        }
    return {"perplexity": perplexity(loss)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    features: list[dict],
    task: str,
    pad_token_id: int,
    batch_size: int,
    bf16: bool = False,
) -> dict[str, float]:
    """The mean loss and the task's metrics on `features`."""
    model.eval()
    total_loss, n_loss, tally = 0.0, 0, _Tally()
    for chunk in _batches(features, batch_size):
        batch = {k: v.to(model.device) for k, v in collate(chunk, pad_token_id).items()}
        with _autocast(model.device, bf16):
            output = model(**batch)
        # causal-lm: weight by the predicted tokens, so the mean is per token as perplexity needs
        if task == "causal-lm":
            weight = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        else:
            weight = len(chunk)
        total_loss += float(output.loss) * weight
        n_loss += weight
        _TALLY[task](tally, model, chunk, batch, output)
    model.train()
    loss = total_loss / max(1, n_loss)
    return {"loss": loss} | _task_metrics(task, tally, loss, model.config.num_labels)


def _train_loss_score(task: str, train_loss: float) -> dict[str, float]:
    """Without an evaluation file the best epoch is the one with the lowest training loss."""
    if task == "causal-lm":
        return {"perplexity": perplexity(train_loss)}
    return {BEST_METRIC[task]: -train_loss}


def _is_better(
    metrics: dict[str, float], best: float | None, task: str, best_loss: float | None = None
) -> bool:
    """Whether an epoch's `metrics` beat the best so far (`best`, with evaluation loss
    `best_loss`): a better BEST_METRIC, or the same with a lower loss (the later epoch wins a tie
    when it has learnt more)."""
    value = metrics[BEST_METRIC[task]]
    if best is None:
        return True
    if value == best:
        return best_loss is not None and metrics.get("loss", math.inf) < best_loss
    return value < best if task == "causal-lm" else value > best


def _autocast(device: torch.device, bf16: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# -- the training run: prepare -> restore -> train_epoch -> end_epoch ------------------------------


@dataclass
class FinetuneResult:
    out_dir: Path
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None


@dataclass
class Progress:
    """Where a run stands; saved in `training_state/trainer_state.json` after every epoch."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken, across epochs
    best: float | None = None  # the best epoch's BEST_METRIC value
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation
    best_epoch: int | None = None
    # Within the unfinished epoch (a --save-steps save): micro-batches done, their summed loss.
    batch: int = 0
    epoch_loss: float = 0.0


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TrainingRun:
    """What `prepare` builds; `restore`, `train_epoch` and `end_epoch` use it, move `progress`."""

    config: FinetuneConfig
    device: torch.device
    tokenizer: BloomTokenizerFast
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_features: list[dict]
    eval_features: list[dict] | None
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    progress: Progress = field(default_factory=Progress)
    log: Callable[[str], None] = _log_to_stderr

    @property
    def out(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def pad_token_id(self) -> int:
        return self.model.config.pad_token_id


def _label_maps(
    config: FinetuneConfig, rows: list[dict], base_config: BloomConfig, resumed: bool
) -> LabelMaps | None:
    """The labels' ids: the saved model's on resume, else from --labels or the training file."""
    if config.task not in ("seq-cls", "token-cls"):
        return None
    if resumed:
        id2label = {int(k): v for k, v in base_config.id2label.items()}
        return id2label, {v: k for k, v in id2label.items()}
    path = _shown(config.train_file)
    if config.labels:
        names = [str(label) for label in config.labels]
    elif config.task == "seq-cls":
        names = label_names(_label_column(rows, config.label_column, path, "--label-column"))
    else:
        tags = _column(rows, config.tags_column, path, "--tags-column")
        names = label_names([tag for row in tags for tag in _words(row)])
    # Keep a fine-tuned model's own label order when it already knows exactly these labels.
    base_labels = base_config.id2label or {}
    known = [base_labels[i] for i in sorted(base_labels)]
    if sorted(known) == sorted(names) and len(known) == base_config.num_labels:
        names = known
    id2label = dict(enumerate(names))
    return id2label, {name: i for i, name in id2label.items()}


def _make_features(
    config: FinetuneConfig, tokenizer, train_rows: list[dict], label_maps: LabelMaps | None
) -> tuple[list[dict], list[dict] | None]:
    """(training features, evaluation features or None)."""
    make_features = _FEATURES[config.task]
    label2id = label_maps[1] if label_maps else None
    train = make_features(train_rows, config, tokenizer, label2id, _shown(config.train_file))
    if not config.eval_file:
        return train, None
    eval_rows = read_records(config.eval_file)
    return train, make_features(eval_rows, config, tokenizer, label2id, _shown(config.eval_file))


def _load_model(
    config: FinetuneConfig, source: str, label_maps: LabelMaps | None, device: torch.device
) -> nn.Module:
    """The task's model from `source` in float32 on `device`, in training mode."""
    cls = TASKS[config.task]
    kwargs: dict[str, Any] = {}
    if label_maps is not None:
        id2label, label2id = label_maps
        kwargs = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
        if config.task == "seq-cls":
            kwargs["problem_type"] = "single_label_classification"
        kwargs["ignore_mismatched_sizes"] = True  # a head trained for other labels starts afresh
    model = cls.from_pretrained(source, torch_dtype=torch.float32, **kwargs)
    if model.config.pad_token_id is None:
        raise FinetuneError(f"{source} has no pad_token_id in its config; batching needs one")
    model = model.to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]  # biases, LayerNorms
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: 0 -> 1 over the warmup steps, then 1 -> 0 linearly at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _schedule_lengths(config: FinetuneConfig, n_examples: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, steps in all, warmup steps)."""
    examples_per_step = config.batch_size * config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(n_examples / examples_per_step)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = max(1, round(config.warmup_ratio * total_steps)) if config.warmup_ratio else 0
    return steps_per_epoch, total_steps, warmup


# Over 40 lines: every object a run needs, built in the order they depend on each other.
def prepare(
    config: FinetuneConfig, resumed: bool = False, log: Callable[[str], None] | None = None
) -> TrainingRun:
    """Check the options, read the data and build everything a run needs, in training mode.

    With `resumed`, the model and labels come from `out_dir/training_state/` and the tokenizer from
    `out_dir`, not from `config.model`. Every data error is raised here, before anything is written.
    """
    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    out = Path(config.out_dir)
    source = str(out / STATE_DIR) if resumed else config.model
    # Pre-split words (token-cls) need a space before every word, as transformers requires.
    prefix_space = {"add_prefix_space": True} if config.task == "token-cls" else {}
    # A run saved mid-way through its first epoch has no model folder (nor tokenizer) in out yet.
    resumed_tokenizer = resumed and (out / "tokenizer.json").is_file()
    tokenizer_source = out if resumed_tokenizer else config.model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **prefix_space)
    train_rows = read_records(config.train_file)
    label_maps = _label_maps(config, train_rows, BloomConfig.from_pretrained(source), resumed)
    train_features, eval_features = _make_features(config, tokenizer, train_rows, label_maps)
    # On resume the saved model already has its labels; passing them would reset its head.
    model = _load_model(config, source, None if resumed else label_maps, device)
    optimizer = _optimizer(model, config)
    steps_per_epoch, total_steps, warmup = _schedule_lengths(config, len(train_features))
    schedule = linear_schedule(total_steps, warmup)
    return TrainingRun(
        config=config,
        device=device,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        train_features=train_features,
        eval_features=eval_features,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup,
        log=log or _log_to_stderr,
    )


def restore(run: TrainingRun, state: dict[str, Any]) -> None:
    """Continue a saved run: optimizer and scheduler state, step and epoch counts, best, history.

    `state` is the content of `training_state/trainer_state.json`; the optimizer and scheduler come
    from `training_state/optimizer.pt` beside it.
    """
    saved = torch.load(
        run.out / STATE_DIR / OPTIMIZER_FILE, map_location=run.device, weights_only=True
    )
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    # The schedule's length follows the (possibly raised) epoch count of this run.
    schedule = linear_schedule(run.total_steps, run.warmup_steps)
    run.scheduler.lr_lambdas = [schedule] * len(run.optimizer.param_groups)
    run.progress = Progress(
        epoch=state["epoch"],
        step=state["step"],
        best=state["best"],
        best_metrics=state["best_metrics"],
        history=state["history"],
        best_epoch=state.get("best_epoch"),
        batch=state.get("batch", 0),
        epoch_loss=state.get("epoch_loss", 0.0),
    )
    run.log(f"resuming from {run.out / STATE_DIR}: epoch {state['epoch']}, step {state['step']}")


def _progress_bar(total: int, description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=description, unit="step", disable=not sys.stderr.isatty(), leave=False
    )


def _backward(run: TrainingRun, chunk: list[dict]) -> float:
    """Forward and backward on one micro-batch (gradients accumulate); its loss."""
    batch = {k: v.to(run.device) for k, v in collate(chunk, run.pad_token_id).items()}
    with _autocast(run.device, run.config.bf16):
        loss = run.model(**batch).loss
    (loss / run.config.gradient_accumulation_steps).backward()
    return loss.detach().item()


def _optimizer_step(run: TrainingRun) -> None:
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.progress.step += 1


def _report_step(run: TrainingRun, bar: Any, epoch: int, loss: float) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}")
    step, log_every = run.progress.step, max(1, run.steps_per_epoch // 10)
    if bar.disable and step % log_every == 0:  # no bar (piped): a line every ~10% of an epoch
        where = f"epoch {epoch + 1}/{run.config.epochs}, step {step}/{run.total_steps}"
        run.log(f"{where}: loss {loss:.4f}")


def train_epoch(run: TrainingRun, epoch: int) -> float:
    """One pass over the training batches, shuffled by `seed + epoch`; the mean micro-batch loss.

    Stops early once `run.total_steps` optimizer steps have been taken, counted across epochs.
    """
    config, progress = run.config, run.progress
    micro_batches = training_batches(
        run.train_features, config.batch_size, config.seed + epoch, config.group_by_length
    )
    done = progress.batch  # > 0 when resuming a --save-steps save made during this epoch
    steps_done = done // config.gradient_accumulation_steps
    remaining = min(run.steps_per_epoch - steps_done, run.total_steps - progress.step)
    bar = _progress_bar(remaining, f"epoch {epoch + 1}/{config.epochs}")
    total_loss, n_batches = progress.epoch_loss, done
    for index, chunk in enumerate(micro_batches[done:], done):
        total_loss += _backward(run, chunk)
        n_batches += 1
        last_micro = index == len(micro_batches) - 1
        if (index + 1) % config.gradient_accumulation_steps and not last_micro:
            continue  # accumulate more micro-batches before the next optimizer step
        _optimizer_step(run)
        _report_step(run, bar, epoch, total_loss / n_batches)
        if progress.step >= run.total_steps:
            break
        if config.save_steps and progress.step % config.save_steps == 0 and not last_micro:
            progress.batch, progress.epoch_loss = index + 1, total_loss
            run.out.mkdir(parents=True, exist_ok=True)  # the first epoch's save may come first
            _save_state(run.out, run.model, run.optimizer, run.scheduler, _state(run))
            run.log(f"saved the state at step {progress.step} to {run.out / STATE_DIR}")
    progress.batch, progress.epoch_loss = 0, 0.0
    bar.close()
    return total_loss / max(1, n_batches)


def _state(run: TrainingRun) -> dict[str, Any]:
    """What `training_state/trainer_state.json` holds: the options and the progress."""
    return {"config": asdict(run.config), **asdict(run.progress)}


def _run_evaluation(run: TrainingRun) -> dict[str, float]:
    config = run.config
    return evaluate(
        run.model, run.eval_features, config.task, run.pad_token_id, config.batch_size, config.bf16
    )


def end_epoch(run: TrainingRun, epoch: int, train_loss: float) -> dict[str, float]:
    """Evaluate, add the epoch to the history, save the model when it is the best so far, and save
    `training_state/`; the epoch's metrics.

    Without evaluation data the best epoch is the one with the lowest training loss.
    """
    config, progress = run.config, run.progress
    metrics = {"train_loss": train_loss}
    if run.eval_features:
        metrics |= _run_evaluation(run)
    progress.epoch = epoch + 1
    progress.history.append({"epoch": epoch + 1, "step": progress.step, **metrics})
    run.log(f"epoch {epoch + 1}/{config.epochs} (step {progress.step}): {_format_metrics(metrics)}")
    scored = metrics if run.eval_features else _train_loss_score(config.task, train_loss)
    best_loss = progress.best_metrics.get("loss")
    if _is_better(scored, progress.best, config.task, best_loss):
        progress.best, progress.best_metrics = scored[BEST_METRIC[config.task]], metrics
        progress.best_epoch = epoch + 1
        _save_best(run.out, run.model, run.tokenizer, _results(progress))
        run.log(f"saved the best model so far (epoch {epoch + 1}) to {run.out}")
    else:  # eval_results.json holds every epoch, not only the best ones
        atomic_write_text(run.out / RESULTS_FILE, json.dumps(_results(progress), indent=2) + "\n")
    _save_state(run.out, run.model, run.optimizer, run.scheduler, _state(run))
    return metrics


def _results(progress: Progress) -> dict[str, Any]:
    """eval_results.json: the best epoch, its metrics, and every evaluation so far."""
    return {
        "best_epoch": progress.best_epoch,
        "best": progress.best_metrics,
        "history": progress.history,
    }


def _save_state(out: Path, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Write `out/training_state/` (latest weights, optimizer, scheduler, counters), one commit."""
    with files.folder_save(out / STATE_DIR, files.owns_everything) as staging:
        model.save_pretrained(staging)
        optimizer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        with files.new_file(staging / OPTIMIZER_FILE) as file:
            torch.save(optimizer_state, file)
        files.write_text(staging / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _owned_by_best_save(name: str) -> bool:
    """What saving the best model replaces in `out`: the model's, tokenizer's and results' files.
    `training_state/` (its own save) and anything else in the folder are kept."""
    model_files = (CONFIG_NAME, GENERATION_CONFIG_NAME, RESULTS_FILE, *TOKENIZER_FILES)
    return name in model_files or checkpoint.is_weight_file_name(name)


def _save_best(out: Path, model, tokenizer, results: dict[str, Any]) -> None:
    """Write the best model as a normal model folder in `out` (one commit), keeping
    `out/training_state/`."""
    with files.folder_save(out, _owned_by_best_save) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files.write_text(staging / RESULTS_FILE, json.dumps(results, indent=2) + "\n")


def finetune(
    config: FinetuneConfig,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    explicit: Collection[str] | None = None,
) -> FinetuneResult:
    """Fine-tune `config.model` on `config.train_file`; the best epoch's model ends up in `out_dir`.

    With `resume=True`, continue from `out_dir/training_state/` (saved after every epoch, and every
    `save_steps` optimizer steps) with the options saved there. Of `config`'s fields, those named
    in `explicit` (all when None) are compared with them: RESUME_MAY_CHANGE ones are taken, a
    different SAME_RUN one (task, data, columns, model) is a FinetuneError, and any other
    difference is logged as ignored.
    """
    out = Path(config.out_dir)
    saved_state = None
    if resume:
        config, saved_state = _resume_config(out, config, explicit, log or _log_to_stderr)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FinetuneError(
            f"{out} already exists and is not empty; "
            "pass --resume to continue, or choose another --out"
        )
    run = prepare(config, resumed=saved_state is not None, log=log)
    if saved_state is not None:
        restore(run, saved_state)
    elif run.eval_features:
        metrics = _run_evaluation(run)
        run.progress.history.append({"epoch": 0, "step": 0, **metrics})
        run.log(f"before training: {_format_metrics(metrics)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for epoch in range(run.progress.epoch, config.epochs):
        if run.progress.step >= run.total_steps:
            break
        end_epoch(run, epoch, train_epoch(run, epoch))
    progress = run.progress
    return FinetuneResult(out, progress.best_metrics, progress.history, progress.best_epoch)


def _resume_config(
    out: Path,
    config: FinetuneConfig,
    explicit: Collection[str] | None,
    log: Callable[[str], None],
) -> tuple[FinetuneConfig, dict[str, Any]]:
    """The options saved in `out/training_state/`, with the changes `config` may make (see
    `finetune`), and the saved trainer state."""
    state_file = out / STATE_DIR / STATE_FILE
    if not state_file.is_file():
        raise FinetuneError(
            f"nothing to resume: {state_file} does not exist (run without --resume first)"
        )
    state = json.loads(state_file.read_text(encoding="utf-8"))
    known = {f.name for f in fields(FinetuneConfig)}
    saved = FinetuneConfig(**{k: v for k, v in state["config"].items() if k in known})
    for name in [f.name for f in fields(FinetuneConfig) if f.name != "out_dir"]:
        new, old = getattr(config, name), getattr(saved, name)
        if (explicit is not None and name not in explicit) or new == old:
            continue
        if name in RESUME_MAY_CHANGE:
            setattr(saved, name, new)
        elif name in SAME_RUN:
            raise FinetuneError(
                f"--resume continues the run saved in {out}, which has {flag(name)} {old!r}; got "
                f"{new!r}: leave {flag(name)} as it was, or start a new run with another --out"
            )
        else:
            log(f"note: {flag(name)} {new!r} is ignored on --resume: the run keeps {old!r}")
    saved.out_dir = str(out)
    return saved, state


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

"""Fine-tuning and inference helpers for the four BLOOM heads; `bloomlm finetune` is a thin front end.

    task        model class                       data (CSV or JSONL rows)                      metric (best)
    seq-cls     BloomForSequenceClassification    text [, text pair], label                    accuracy (+ macro F1)
    token-cls   BloomForTokenClassification       tokens (list, or space-separated), tags      token F1 (+ accuracy)
    qa          BloomForQuestionAnswering         question, context, answers (SQuAD dict, or   F1 (+ exact match)
                                                  answer text [+ answer_start])
    causal-lm   BloomForCausalLM                  text                                          perplexity (lower)

Training: AdamW (no weight decay on biases and LayerNorms), linear warmup then linear decay, gradient
accumulation, optional bf16 autocast and gradient checkpointing, evaluation before training and after each
epoch. The output folder is a normal model folder (config, weights, tokenizer files) holding the best
epoch's model, plus `training_state/` (the latest epoch's weights, optimizer, scheduler and counters) that
`resume=True` continues from. Both are written to a temporary folder and renamed into place, so a crash
never leaves a half-written model behind.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import string
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bloomlm.config import BloomConfig
from bloomlm.tokenizer import AutoTokenizer, BloomTokenizerFast
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
IGNORE_INDEX = -100
MAX_ANSWER_TOKENS = 30


class FinetuneError(ValueError):
    """A problem with the data, the options or the output folder, worded for the person running the job."""


@dataclass
class FinetuneConfig:
    """Everything a run needs; stored in `training_state/trainer_state.json` so `resume` can reuse it."""

    task: str
    train_file: str
    out_dir: str
    eval_file: str | None = None
    model: str = "bloomlm-tiny"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None  # label names in id order; default: sorted labels of the training file
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    answer_start_column: str = "answer_start"
    max_length: int = 128
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps in all, counted across epochs (for quick runs)
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
        if self.task not in TASKS:
            raise FinetuneError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "max_length"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise FinetuneError(f"max-steps must be at least 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise FinetuneError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise FinetuneError(f"learning-rate must be positive, got {self.learning_rate}")


# -- data files --------------------------------------------------------------------------------------------


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a `.csv`/`.tsv` file (header line first) or a `.jsonl`/`.json` file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise FinetuneError(f"{path} line {number} is not JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise FinetuneError(f"{path} line {number} is not a JSON object")
                rows.append(row)
    else:
        raise FinetuneError(f"{path}: unknown data format '{suffix}'; use .csv, .tsv, .jsonl or .json (JSON lines)")
    if not rows:
        raise FinetuneError(f"{path} holds no rows")
    return rows


def _column(rows: list[dict[str, Any]], name: str, path: str, option: str) -> list[Any]:
    missing = next((i for i, row in enumerate(rows) if name not in row), None)
    if missing is not None:
        columns = ", ".join(map(str, rows[missing])) or "none"
        raise FinetuneError(f"{path} row {missing + 1} has no column '{name}' (it has: {columns}); pass {option}")
    return [row[name] for row in rows]


def _words(value: Any) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith("[") else value.split()
    return [str(item) for item in value]


def label_names(values: Sequence[Any]) -> list[str]:
    """Distinct labels in a stable order: numerically when every label is a number, else alphabetically."""
    distinct = sorted({str(value) for value in values})
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return distinct


# -- features: tokenised examples, padded into batches ------------------------------------------------------


def _seq_cls_features(rows, config: FinetuneConfig, tokenizer, label2id, path) -> list[dict]:
    texts = [str(t) for t in _column(rows, config.text_column, path, "--text-column")]
    pairs = None
    if config.text_pair_column:
        pairs = [str(t) for t in _column(rows, config.text_pair_column, path, "--text-pair-column")]
    labels = [str(v) for v in _column(rows, config.label_column, path, "--label-column")]
    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        raise FinetuneError(f"{path} has labels {unknown} not among the model's labels {list(label2id)}")
    encoded = tokenizer(texts, pairs, truncation=True, max_length=config.max_length)
    return [{"input_ids": ids, "labels": label2id[label]} for ids, label in zip(encoded["input_ids"], labels)]


def _token_cls_features(rows, config: FinetuneConfig, tokenizer, label2id, path) -> list[dict]:
    features = []
    all_words = [_words(w) for w in _column(rows, config.tokens_column, path, "--tokens-column")]
    all_tags = [_words(t) for t in _column(rows, config.tags_column, path, "--tags-column")]
    for number, (words, tags) in enumerate(zip(all_words, all_tags), 1):
        if len(words) != len(tags):
            raise FinetuneError(f"{path} row {number} has {len(words)} tokens but {len(tags)} tags")
        unknown = sorted(set(tags) - set(label2id))
        if unknown:
            raise FinetuneError(f"{path} row {number} has tags {unknown} not among {list(label2id)}")
        encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=config.max_length)
        labels, previous = [], None
        for word in encoding.word_ids():
            # Only a word's first token carries its tag; later pieces and special tokens are ignored.
            labels.append(IGNORE_INDEX if word is None or word == previous else label2id[tags[word]])
            previous = word
        features.append({"input_ids": encoding["input_ids"], "labels": labels, "words": words, "tags": tags})
    return features


def _answers(row: dict[str, Any], config: FinetuneConfig, context: str, path: str, number: int) -> list[tuple]:
    """[(answer text, start character)] from a SQuAD `answers` dict, or an answer text (+ start) column."""
    if config.answers_column not in row:
        raise FinetuneError(
            f"{path} row {number} has no column '{config.answers_column}' (it has: {', '.join(row)}); "
            "pass --answers-column"
        )
    value = row[config.answers_column]
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = json.loads(value)
    if isinstance(value, dict):
        return [(str(t), int(s)) for t, s in zip(value.get("text", []), value.get("answer_start", []))]
    text = str(value)
    start = row.get(config.answer_start_column)
    start = context.find(text) if start in (None, "") else int(start)
    if start < 0 or context[start : start + len(text)] != text:
        raise FinetuneError(f"{path} row {number}: answer {text!r} is not in the context at character {start}")
    return [(text, start)]


def _qa_features(rows, config: FinetuneConfig, tokenizer, label2id, path) -> list[dict]:
    questions = [str(q) for q in _column(rows, config.question_column, path, "--question-column")]
    contexts = [str(c) for c in _column(rows, config.context_column, path, "--context-column")]
    features = []
    for number, (row, question, context) in enumerate(zip(rows, questions, contexts), 1):
        answers = _answers(row, config, context, path, number)
        encoding = encode_question(tokenizer, question, context, config.max_length)
        start, end = 0, 0  # an answer cut off by truncation (or none at all) points at position 0, as in SQuAD 2
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


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad on the right (positions come from the mask, so the side does not matter to BLOOM) into tensors."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.tensor([f["input_ids"] + [pad_token_id] * (width - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
        ),
    }
    first = features[0]
    if isinstance(first.get("labels"), list):
        batch["labels"] = torch.tensor([f["labels"] + [IGNORE_INDEX] * (width - len(f["labels"])) for f in features])
    elif "labels" in first:
        batch["labels"] = torch.tensor([f["labels"] for f in features])
    for key in ("start_positions", "end_positions"):
        if key in first:
            batch[key] = torch.tensor([f[key] for f in features])
    return batch


def _batches(features: list[dict], batch_size: int, order: list[int] | None = None) -> Iterator[list[dict]]:
    order = list(range(len(features))) if order is None else order
    for start in range(0, len(order), batch_size):
        yield [features[i] for i in order[start : start + batch_size]]


def training_batches(features: list[dict], batch_size: int, seed: int, group_by_length: bool) -> list[list[dict]]:
    """One epoch's batches in a random order fixed by `seed` (so a resumed run sees the same order).

    With `group_by_length`, examples of similar length share a batch (sorted within windows of 50 batches,
    then the batches shuffled): far less padding to compute on, still a random order.
    """
    rng = random.Random(seed)
    order = list(range(len(features)))
    rng.shuffle(order)
    if group_by_length:
        window = 50 * batch_size
        for start in range(0, len(order), window):
            order[start : start + window] = sorted(
                order[start : start + window], key=lambda i: len(features[i]["input_ids"]), reverse=True
            )
    batches = list(_batches(features, batch_size, order))
    if group_by_length:
        rng.shuffle(batches)
    return batches


# -- inference helpers shared by evaluation and the CLI ------------------------------------------------------


def encode_question(tokenizer: BloomTokenizerFast, question: str, context: str, max_length: int | None = None):
    """Question + context as one sequence, the context truncated to fit, with character offsets."""
    return tokenizer(
        question,
        context,
        truncation="only_second" if max_length else None,
        max_length=max_length,
        return_offsets_mapping=True,
    )


def char_span_to_tokens(encoding, char_start: int, char_end: int) -> tuple[int, int] | None:
    """First and last context token overlapping [char_start, char_end), or None when truncated away."""
    tokens = [
        i
        for i, (sequence, (start, end)) in enumerate(zip(encoding.sequence_ids(), encoding["offset_mapping"]))
        if sequence == 1 and end > char_start and start < char_end
    ]
    return (tokens[0], tokens[-1]) if tokens else None


def best_span(
    start_logits: torch.Tensor, end_logits: torch.Tensor, encoding, max_answer_tokens: int = MAX_ANSWER_TOKENS
) -> tuple[int, int, float]:
    """(start token, end token, probability) of the likeliest context span, end >= start.

    The probability is softmax(start) * softmax(end), each taken over the context tokens only.
    """
    in_context = torch.tensor([s == 1 for s in encoding.sequence_ids()])
    if not in_context.any():
        raise ValueError("the context is empty after tokenisation; nothing to answer from")
    start_p = start_logits.float().masked_fill(~in_context, -math.inf).softmax(-1)
    end_p = end_logits.float().masked_fill(~in_context, -math.inf).softmax(-1)
    scores = torch.triu(start_p[:, None] * end_p[None, :])  # [start, end], end >= start
    scores = torch.tril(scores, diagonal=max_answer_tokens - 1)
    flat = int(scores.argmax())
    start, end = divmod(flat, scores.shape[1])
    return start, end, float(scores[start, end])


@torch.no_grad()
def answer_question(model, tokenizer, question: str, context: str, max_length: int | None = None) -> dict[str, Any]:
    """{"answer", "score", "start", "end"} (character offsets into `context`) for one question."""
    encoding = encode_question(tokenizer, question, context, max_length)
    input_ids = torch.tensor([encoding["input_ids"]], device=model.device)
    output = model(input_ids=input_ids)
    start, end, score = best_span(output.start_logits[0].cpu(), output.end_logits[0].cpu(), encoding)
    offsets = encoding["offset_mapping"]
    char_start, char_end = offsets[start][0], offsets[end][1]
    return {"answer": context[char_start:char_end], "score": score, "start": char_start, "end": char_end}


@torch.no_grad()
def classify(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """[{"label", "score", "scores": {label: probability}}] for each text, in the order given.

    Texts are batched by length (less padding to compute); left padding leaves each row's result unchanged.
    """
    results: list[dict[str, Any]] = [{} for _ in texts]
    id2label = model.config.id2label
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        inputs = tokenizer([texts[i] for i in indices], padding=True, return_tensors="pt").to(model.device)
        probabilities = model(**inputs).logits.float().softmax(-1).cpu()
        for index, row in zip(indices, probabilities):
            best = int(row.argmax())
            scores = {id2label.get(i, str(i)): float(p) for i, p in enumerate(row)}
            results[index] = {"label": id2label.get(best, str(best)), "score": float(row[best]), "scores": scores}
    return results


@torch.no_grad()
def tag(model, tokenizer, text: str) -> list[dict[str, Any]]:
    """[{"token", "label", "score", "start", "end"}] for every token of `text` (character offsets)."""
    encoding = tokenizer(text, return_offsets_mapping=True)
    input_ids = torch.tensor([encoding["input_ids"]], device=model.device)
    probabilities = model(input_ids=input_ids).logits[0].float().softmax(-1).cpu()
    id2label = model.config.id2label
    rows = []
    for (start, end), row in zip(encoding["offset_mapping"], probabilities):
        best = int(row.argmax())
        label = id2label.get(best, str(best))
        rows.append({"token": text[start:end], "label": label, "score": float(row[best]), "start": start, "end": end})
    return rows


# -- metrics --------------------------------------------------------------------------------------------------


def accuracy_and_macro_f1(predictions: Sequence[int], references: Sequence[int], n_labels: int) -> dict[str, float]:
    correct = sum(p == r for p, r in zip(predictions, references))
    f1s = []
    for label in range(n_labels):
        true_pos = sum(p == r == label for p, r in zip(predictions, references))
        predicted, actual = predictions.count(label), references.count(label)
        if predicted + actual:
            f1s.append(2 * true_pos / (predicted + actual))
    return {"accuracy": correct / len(references), "f1": sum(f1s) / len(f1s) if f1s else 0.0}


def token_f1(predictions: Sequence[str], references: Sequence[str], outside: str = "O") -> dict[str, float]:
    """Word-level micro F1 over the tags that are not `outside` (plus plain accuracy over all words)."""
    true_pos = sum(p == r != outside for p, r in zip(predictions, references))
    predicted = sum(p != outside for p in predictions)
    actual = sum(r != outside for r in references)
    precision = true_pos / predicted if predicted else 0.0
    recall = true_pos / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(p == r for p, r in zip(predictions, references)) / max(1, len(references))
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": accuracy}


def _normalize_answer(text: str) -> list[str]:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces; as words."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def squad_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction against the best-matching reference answer (SQuAD v1 rules)."""
    if not answers:
        return float(prediction == ""), float(prediction == "")
    predicted = _normalize_answer(prediction)
    best_em, best_f1 = 0.0, 0.0
    for answer in answers:
        reference = _normalize_answer(answer)
        best_em = max(best_em, float(predicted == reference))
        common = sum((Counter(predicted) & Counter(reference)).values())
        if common:
            precision, recall = common / len(predicted), common / len(reference)
            best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
    return best_em, best_f1


@torch.no_grad()
def evaluate(model, features: list[dict], task: str, pad_token_id: int, batch_size: int, bf16: bool = False):
    """The task's metrics on `features` (and the mean loss)."""
    model.eval()
    total_loss, n_loss = 0.0, 0
    predictions: list[Any] = []
    references: list[Any] = []
    qa_scores: list[tuple[float, float]] = []
    for chunk in _batches(features, batch_size):
        batch = {k: v.to(model.device) for k, v in collate(chunk, pad_token_id).items()}
        with _autocast(model.device, bf16):
            output = model(**batch)
        weight = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if task == "causal-lm" else len(chunk)
        total_loss += float(output.loss) * weight
        n_loss += weight
        if task == "seq-cls":
            predictions += output.logits.argmax(-1).tolist()
            references += batch["labels"].tolist()
        elif task == "token-cls":
            id2label = model.config.id2label
            for feature, row in zip(chunk, output.logits.argmax(-1).tolist()):
                firsts = [p for p, label in zip(row, feature["labels"]) if label != IGNORE_INDEX]
                predictions += [id2label[p] for p in firsts]
                references += feature["tags"][: len(firsts)]
        elif task == "qa":
            for i, feature in enumerate(chunk):
                n = len(feature["input_ids"])
                start, end, _ = best_span(
                    output.start_logits[i, :n].cpu(), output.end_logits[i, :n].cpu(), feature["encoding"]
                )
                offsets = feature["encoding"]["offset_mapping"]
                qa_scores.append(
                    squad_scores(feature["context"][offsets[start][0] : offsets[end][1]], feature["answers"])
                )
    model.train()
    metrics = {"loss": total_loss / max(1, n_loss)}
    if task == "seq-cls":
        metrics |= accuracy_and_macro_f1(predictions, references, model.config.num_labels)
    elif task == "token-cls":
        metrics |= token_f1(predictions, references)
    elif task == "qa":
        metrics["exact_match"] = sum(s[0] for s in qa_scores) / len(qa_scores)
        metrics["f1"] = sum(s[1] for s in qa_scores) / len(qa_scores)
    else:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return metrics


def _train_loss_score(task: str, train_loss: float) -> dict[str, float]:
    """Without an evaluation file the best epoch is the one with the lowest training loss."""
    if task == "causal-lm":
        return {"perplexity": math.exp(min(train_loss, 50.0))}
    return {BEST_METRIC[task]: -train_loss}


def _is_better(metrics: dict[str, float], best: float | None, task: str) -> bool:
    value = metrics[BEST_METRIC[task]]
    if best is None:
        return True
    return value < best if task == "causal-lm" else value > best


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# -- training -----------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    out_dir: Path
    best_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def _label_maps(config: FinetuneConfig, rows: list[dict], path: str, base_config) -> tuple[dict, dict] | None:
    if config.task not in ("seq-cls", "token-cls"):
        return None
    if config.labels:
        names = [str(label) for label in config.labels]
    elif config.task == "seq-cls":
        names = label_names(_column(rows, config.label_column, path, "--label-column"))
    else:
        tags = _column(rows, config.tags_column, path, "--tags-column")
        names = label_names([tag for row in tags for tag in _words(row)])
    # Keep a fine-tuned model's own label order when it already knows exactly these labels.
    known = [base_config.id2label[i] for i in sorted(base_config.id2label)] if base_config.id2label else []
    if sorted(known) == sorted(names) and len(known) == base_config.num_labels:
        names = known
    id2label = dict(enumerate(names))
    return id2label, {name: i for i, name in id2label.items()}


def _load_model(config: FinetuneConfig, source: str, label_maps, device: torch.device):
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
    return model.to(device)


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, LayerNorms
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: 0 -> 1 over the warmup steps, then 1 -> 0 linearly at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def staging_dir(parent: Path, name: str) -> Path:
    """A new hidden folder `parent/.name.tmp-XXXX` to build `name` in before renaming it into place.

    On the same file system as the target, so the rename is atomic; mode 0755 like a folder made by mkdir
    (mkdtemp's 0700 would make the renamed model folder private).
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    staging.chmod(0o755)
    return staging


def _swap_into_place(new_dir: Path, target: Path) -> None:
    """Replace `target` by the complete folder `new_dir` (two renames; the old one is removed afterwards)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(new_dir, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save_state(out: Path, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Write `out/training_state/` (latest weights, optimizer, scheduler, counters) through a temporary folder."""
    staging = staging_dir(out, STATE_DIR)
    try:
        model.save_pretrained(staging)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, staging / OPTIMIZER_FILE)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(staging, out / STATE_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_best(out: Path, model, tokenizer, results: dict[str, Any]) -> None:
    """Write the best model as a normal model folder in `out`, keeping `out/training_state/`."""
    staging = staging_dir(out.parent, out.name)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        if (out / STATE_DIR).is_dir():
            os.replace(out / STATE_DIR, staging / STATE_DIR)
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", disable=not sys.stderr.isatty(), leave=False)


def finetune(config: FinetuneConfig, resume: bool = False, log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune `config.model` on `config.train_file`; the best epoch's model ends up in `config.out_dir`.

    With `resume=True`, continue from `out_dir/training_state/` (the options saved there are used, except
    `epochs`, `max_steps`, `device` and `threads`, which may be raised or changed).
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    out = Path(config.out_dir)
    saved_state = None
    if resume:
        config, saved_state = _resume_config(out, config)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FinetuneError(
            f"{out} already exists and is not empty; pass --resume to continue, or choose another --out"
        )
    config.check()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)

    source = str(out / STATE_DIR) if saved_state else config.model
    # Pre-split words (token-cls) need a space before every word, as transformers requires.
    prefix_space = {"add_prefix_space": True} if config.task == "token-cls" else {}
    tokenizer = AutoTokenizer.from_pretrained(out if saved_state else config.model, **prefix_space)
    train_rows = read_records(config.train_file)
    base_config = BloomConfig.from_pretrained(source)
    label_maps = _label_maps(config, train_rows, config.train_file, base_config) if not saved_state else None
    if saved_state and config.task in ("seq-cls", "token-cls"):
        id2label = {int(k): v for k, v in base_config.id2label.items()}
        label_maps = (id2label, {v: k for k, v in id2label.items()})
    label2id = label_maps[1] if label_maps else None
    make_features = _FEATURES[config.task]
    train_features = make_features(train_rows, config, tokenizer, label2id, config.train_file)
    eval_features = None
    if config.eval_file:
        eval_rows = read_records(config.eval_file)
        eval_features = make_features(eval_rows, config, tokenizer, label2id, config.eval_file)

    model = _load_model(config, source, label_maps if not saved_state else None, device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_features) / (config.batch_size * config.gradient_accumulation_steps))
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = max(1, round(config.warmup_ratio * total_steps)) if config.warmup_ratio else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup))
    pad_id = model.config.pad_token_id

    history: list[dict[str, Any]] = []
    best: float | None = None
    best_metrics: dict[str, float] = {}
    start_epoch, step = 0, 0
    if saved_state:
        optimizer_state = torch.load(out / STATE_DIR / OPTIMIZER_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
        # The schedule's length follows the (possibly raised) epoch count of this run.
        scheduler.lr_lambdas = [linear_schedule(total_steps, warmup)] * len(optimizer.param_groups)
        history, best, best_metrics = saved_state["history"], saved_state["best"], saved_state["best_metrics"]
        start_epoch, step = saved_state["epoch"], saved_state["step"]
        log(f"resuming from {out / STATE_DIR}: epoch {start_epoch}, step {step}")
    elif eval_features:
        metrics = evaluate(model, eval_features, config.task, pad_id, config.batch_size, config.bf16)
        history.append({"epoch": 0, "step": 0, **metrics})
        log(f"before training: {_format_metrics(metrics)}")

    out.parent.mkdir(parents=True, exist_ok=True)
    log_every = max(1, steps_per_epoch // 10)
    for epoch in range(start_epoch, config.epochs):
        if step >= total_steps:
            break
        micro_batches = training_batches(train_features, config.batch_size, config.seed + epoch, config.group_by_length)
        train_loss, n_batches = 0.0, 0
        progress = _progress(min(steps_per_epoch, total_steps - step), f"epoch {epoch + 1}/{config.epochs}")
        for index, chunk in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            with _autocast(device, config.bf16):
                loss = model(**batch).loss
            (loss / config.gradient_accumulation_steps).backward()
            train_loss += loss.detach().item()
            n_batches += 1
            last_micro = index == len(micro_batches) - 1
            if (index + 1) % config.gradient_accumulation_steps == 0 or last_micro:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{train_loss / n_batches:.4f}")
                if progress.disable and step % log_every == 0:  # no bar (piped): a line every ~10% of an epoch
                    log(
                        f"epoch {epoch + 1}/{config.epochs}, step {step}/{total_steps}: "
                        f"loss {train_loss / n_batches:.4f}"
                    )
                if step >= total_steps:
                    break
        progress.close()
        metrics = {"train_loss": train_loss / max(1, n_batches)}
        if eval_features:
            metrics |= evaluate(model, eval_features, config.task, pad_id, config.batch_size, config.bf16)
        history.append({"epoch": epoch + 1, "step": step, **metrics})
        log(f"epoch {epoch + 1}/{config.epochs} (step {step}): {_format_metrics(metrics)}")
        scored = metrics if eval_features else _train_loss_score(config.task, metrics["train_loss"])
        if _is_better(scored, best, config.task):
            best, best_metrics = scored[BEST_METRIC[config.task]], metrics
            _save_best(out, model, tokenizer, {"best_epoch": epoch + 1, "best": best_metrics, "history": history})
            log(f"saved the best model so far to {out}")
        state = {
            "config": asdict(config),
            "epoch": epoch + 1,
            "step": step,
            "best": best,
            "best_metrics": best_metrics,
            "history": history,
        }
        _save_state(out, model, optimizer, scheduler, state)
    return FinetuneResult(out, best_metrics, history)


def _resume_config(out: Path, config: FinetuneConfig) -> tuple[FinetuneConfig, dict[str, Any]]:
    state_file = out / STATE_DIR / STATE_FILE
    if not state_file.is_file():
        raise FinetuneError(f"nothing to resume: {state_file} does not exist (run without --resume first)")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    known = {f.name for f in fields(FinetuneConfig)}
    saved = FinetuneConfig(**{k: v for k, v in state["config"].items() if k in known})
    for name in ("epochs", "max_steps", "device", "threads"):
        setattr(saved, name, getattr(config, name))
    saved.out_dir = str(out)
    return saved, state


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

"""Inference with the task heads: `classify`, `tag` and `answer_question`, plus the span helpers
(`encode_question`, `char_span_to_tokens`, `best_span`) that question-answering training and
evaluation share with `answer_question`.

Used by the `bloomlm classify/tag/answer` commands and by `bloomlm.finetune`'s evaluation. Each
function takes a loaded model and its tokenizer and returns plain Python values (labels, scores,
character offsets into the input text).

Long inputs: `max_length` truncates what `classify` and `tag` see (attention memory grows with the
square of the length); `answer_question` instead slides windows of `max_length` tokens over the
context, `doc_stride` tokens overlapping, and keeps the best span of any window (transformers'
question-answering pipeline does the same).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from bloomlm.tokenizer import BatchEncoding, BloomTokenizerFast

MAX_ANSWER_TOKENS = 30
AGGREGATIONS = ("none", "first", "average", "max")
MULTI_LABEL = "multi_label_classification"
_WORD = re.compile(r"\S+")


def encode_question(
    tokenizer: BloomTokenizerFast, question: str, context: str, max_length: int | None = None
) -> BatchEncoding:
    """Question + context as one sequence, the context truncated to fit, with character offsets."""
    return tokenizer(
        question,
        context,
        truncation="only_second" if max_length else None,
        max_length=max_length,
        return_offsets_mapping=True,
    )


def char_span_to_tokens(
    encoding: BatchEncoding, char_start: int, char_end: int
) -> tuple[int, int] | None:
    """First and last context token overlapping [char_start, char_end); None if truncated away."""
    pairs = zip(encoding.sequence_ids(), encoding["offset_mapping"])
    tokens = [
        i
        for i, (sequence, (start, end)) in enumerate(pairs)
        if sequence == 1 and end > char_start and start < char_end
    ]
    return (tokens[0], tokens[-1]) if tokens else None


def best_span(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    encoding: BatchEncoding,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
    row: int = 0,
) -> tuple[int, int, float]:
    """(start token, end token, probability) of the likeliest context span, end >= start.

    The probability is softmax(start) * softmax(end), each taken over the context tokens only.
    `row` picks the sequence of a batched encoding (a window of a long context).
    """
    in_context = torch.tensor([s == 1 for s in encoding.sequence_ids(row)])
    if not in_context.any():
        raise ValueError("the context is empty after tokenisation; nothing to answer from")
    start_p = start_logits.float().masked_fill(~in_context, -math.inf).softmax(-1)
    end_p = end_logits.float().masked_fill(~in_context, -math.inf).softmax(-1)
    scores = torch.triu(start_p[:, None] * end_p[None, :])  # [start, end], end >= start
    scores = torch.tril(scores, diagonal=max_answer_tokens - 1)
    flat = int(scores.argmax())
    start, end = divmod(flat, scores.shape[1])
    return start, end, float(scores[start, end])


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) narrowed to drop leading and trailing whitespace (BLOOM's tokens carry the
    space before a word, so a raw span usually starts with one)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


# Over 40 lines: windows over the context, then the best span across windows, one pass.
@torch.no_grad()
def answer_question(
    model: nn.Module,
    tokenizer: BloomTokenizerFast,
    question: str,
    context: str,
    max_length: int | None = None,
    doc_stride: int = 128,
) -> dict[str, Any]:
    """{"answer", "score", "start", "end"} (character offsets into `context`) for one question.

    With `max_length`, the context is read in windows of at most `max_length` tokens (question
    included) overlapping by `doc_stride` tokens, so any length costs one window's memory; the
    answer is the best-scoring span of any window. The span never starts or ends with whitespace.
    """
    if not question.strip():
        raise ValueError("the question is empty")
    if not context.strip():
        raise ValueError("the context is empty")
    if max_length:
        room = max_length - len(tokenizer(question)["input_ids"])
        if room <= doc_stride:  # the backend would panic rather than raise
            raise ValueError(
                f"max_length {max_length} leaves {max(room, 0)} context tokens per window after "
                f"the question; that must be more than doc_stride ({doc_stride}): raise "
                "max_length or lower doc_stride"
            )
    encoding = tokenizer(
        question,
        context,
        truncation="only_second" if max_length else None,
        max_length=max_length,
        stride=doc_stride if max_length else 0,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    best: tuple[float, int, int] | None = None  # (score, char start, char end)
    for row, ids in enumerate(encoding["input_ids"]):
        output = model(input_ids=torch.tensor([ids], device=model.device))
        start_logits, end_logits = output.start_logits[0].cpu(), output.end_logits[0].cpu()
        start, end, score = best_span(start_logits, end_logits, encoding, row=row)
        offsets = encoding["offset_mapping"][row]
        if best is None or score > best[0]:
            best = (score, offsets[start][0], offsets[end][1])
    assert best is not None  # the tokenizer returns at least one window
    score, char_start, char_end = best
    char_start, char_end = strip_span(context, char_start, char_end)
    answer = context[char_start:char_end]
    return {"answer": answer, "score": score, "start": char_start, "end": char_end}


def _check_texts(texts: list[str], what: str) -> None:
    for number, text in enumerate(texts, 1):
        if not text.strip():
            where = f" ({what} {number} of {len(texts)})" if len(texts) > 1 else ""
            raise ValueError(f"the {what} is empty{where}; there is nothing to label")


# Over 40 lines: batching, the head's output per problem type, and the result rows.
@torch.no_grad()
def classify(
    model: nn.Module,
    tokenizer: BloomTokenizerFast,
    texts: list[str],
    batch_size: int = 32,
    max_length: int | None = None,
    top_k: int = 1,
    threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """[{"label", "score", "scores": {label: probability}, "labels": [{"label", "score"}]}] per
    text, in the order given.

    "label"/"score" are the likeliest label. "labels" holds the `top_k` likeliest, best first; for a
    multi-label model (`problem_type="multi_label_classification"`: an independent sigmoid per
    label, as it was trained) it holds every label whose probability is at least `threshold`.
    Texts are batched by length (less padding to compute); left padding leaves each row's result
    unchanged. `max_length` truncates each text to that many tokens.
    """
    _check_texts(texts, "text")
    results: list[dict[str, Any]] = [{} for _ in texts]
    id2label = model.config.id2label
    multi_label = model.config.problem_type == MULTI_LABEL
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        inputs = tokenizer(
            [texts[i] for i in indices],
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        ).to(model.device)
        logits = model(**inputs).logits.float()
        probabilities = (logits.sigmoid() if multi_label else logits.softmax(-1)).cpu()
        for index, row in zip(indices, probabilities):
            names = [id2label.get(i, str(i)) for i in range(len(row))]
            ranked = sorted(range(len(row)), key=lambda i: -float(row[i]))
            chosen = [i for i in ranked if row[i] >= threshold] if multi_label else ranked[:top_k]
            results[index] = {
                "label": names[ranked[0]],
                "score": float(row[ranked[0]]),
                "scores": {name: float(p) for name, p in zip(names, row)},
                "labels": [{"label": names[i], "score": float(row[i])} for i in chosen],
            }
    return results


# Over 40 lines: tokens with offsets, then the chosen aggregation into words.
@torch.no_grad()
def tag(
    model: nn.Module,
    tokenizer: BloomTokenizerFast,
    text: str,
    aggregation: str = "none",
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Labels for `text`, with character offsets.

    aggregation "none": [{"token", "label", "score", "start", "end"}] for every token. Otherwise
    [{"word", "label", "score", "start", "end"}] for every whitespace-separated word, tokenized as
    `bloomlm finetune token-cls` trains (pre-split words, by a tokenizer with `add_prefix_space`;
    pass one loaded so, or this loads it again from `tokenizer.name_or_path` on every call):
    "first" labels a word by its first token (what training labels), "average" by the mean of its
    tokens' probabilities, "max" by its single most confident token (transformers' aggregation
    strategies of the same names). With `max_length`, tokens past it (and words wholly past it)
    are left out.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}"
        )
    _check_texts([text], "text")
    if aggregation == "none":
        return _tag_tokens(model, tokenizer, text, max_length)
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
    if not getattr(tokenizer, "add_prefix_space", False):  # pre-split words need it, as in training
        tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path, add_prefix_space=True)
    encoding = tokenizer(
        [word for word, _, _ in words],
        is_split_into_words=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    word_of_token = encoding.word_ids()
    probabilities = _token_probabilities(model, encoding["input_ids"])
    id2label = model.config.id2label
    rows = []
    for w, (word, start, end) in enumerate(words):
        tokens = [t for t, owner in enumerate(word_of_token) if owner == w]
        if not tokens:
            break  # truncated away, as is every later word
        best, score = _aggregate(probabilities[tokens], aggregation)
        label = id2label.get(best, str(best))
        rows.append({"word": word, "label": label, "score": score, "start": start, "end": end})
    return rows


def _aggregate(probabilities: torch.Tensor, aggregation: str) -> tuple[int, float]:
    """(label id, score) of one word from its tokens' probabilities [tokens, labels]."""
    if aggregation == "first":
        row = probabilities[0]
    elif aggregation == "average":
        row = probabilities.mean(0)
    else:  # max: the token whose best label is the most confident decides
        row = probabilities[int(probabilities.max(-1).values.argmax())]
    best = int(row.argmax())
    return best, float(row[best])


def _token_probabilities(model: nn.Module, input_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([input_ids], device=model.device)
    return model(input_ids=ids).logits[0].float().softmax(-1).cpu()


def _tag_tokens(
    model: nn.Module, tokenizer: BloomTokenizerFast, text: str, max_length: int | None
) -> list[dict[str, Any]]:
    encoding = tokenizer(
        text,
        return_offsets_mapping=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    probabilities = _token_probabilities(model, encoding["input_ids"])
    id2label = model.config.id2label
    rows = []
    for (start, end), row in zip(encoding["offset_mapping"], probabilities):
        best = int(row.argmax())
        label = id2label.get(best, str(best))
        score = float(row[best])
        rows.append(
            {"token": text[start:end], "label": label, "score": score, "start": start, "end": end}
        )
    return rows

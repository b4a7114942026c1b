"""Inference with the task heads: `classify`, `tag` and `answer_question`, plus the span helpers
(`encode_question`, `char_span_to_tokens`, `best_span`) that question-answering training and
evaluation share with `answer_question`.

Used by the `bloomlm classify/tag/answer` commands and by `bloomlm.finetune`'s evaluation. Each
function takes a loaded model and its tokenizer and returns plain Python values (labels, scores,
character offsets into the input text).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from bloomlm.tokenizer import BatchEncoding, BloomTokenizerFast

MAX_ANSWER_TOKENS = 30


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
def answer_question(
    model: nn.Module,
    tokenizer: BloomTokenizerFast,
    question: str,
    context: str,
    max_length: int | None = None,
) -> dict[str, Any]:
    """{"answer", "score", "start", "end"} (character offsets into `context`) for one question."""
    encoding = encode_question(tokenizer, question, context, max_length)
    input_ids = torch.tensor([encoding["input_ids"]], device=model.device)
    output = model(input_ids=input_ids)
    start_logits, end_logits = output.start_logits[0].cpu(), output.end_logits[0].cpu()
    start, end, score = best_span(start_logits, end_logits, encoding)
    offsets = encoding["offset_mapping"]
    char_start, char_end = offsets[start][0], offsets[end][1]
    answer = context[char_start:char_end]
    return {"answer": answer, "score": score, "start": char_start, "end": char_end}


@torch.no_grad()
def classify(
    model: nn.Module, tokenizer: BloomTokenizerFast, texts: list[str], batch_size: int = 32
) -> list[dict[str, Any]]:
    """[{"label", "score", "scores": {label: probability}}] for each text, in the order given.

    Texts are batched by length (less padding to compute); left padding leaves each row's result
    unchanged.
    """
    results: list[dict[str, Any]] = [{} for _ in texts]
    id2label = model.config.id2label
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = [texts[i] for i in indices]
        inputs = tokenizer(batch, padding=True, return_tensors="pt").to(model.device)
        probabilities = model(**inputs).logits.float().softmax(-1).cpu()
        for index, row in zip(indices, probabilities):
            best = int(row.argmax())
            scores = {id2label.get(i, str(i)): float(p) for i, p in enumerate(row)}
            label = id2label.get(best, str(best))
            results[index] = {"label": label, "score": float(row[best]), "scores": scores}
    return results


@torch.no_grad()
def tag(model: nn.Module, tokenizer: BloomTokenizerFast, text: str) -> list[dict[str, Any]]:
    """[{"token", "label", "score", "start", "end"}] for every token of `text` (char offsets)."""
    encoding = tokenizer(text, return_offsets_mapping=True)
    input_ids = torch.tensor([encoding["input_ids"]], device=model.device)
    probabilities = model(input_ids=input_ids).logits[0].float().softmax(-1).cpu()
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

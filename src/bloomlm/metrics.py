"""Evaluation metrics for the fine-tuning tasks, framework-free (plain Python on lists and strings).

seq-cls     accuracy_and_macro_f1    accuracy, and F1 averaged over the labels that occur
token-cls   token_f1                 word-level micro F1 over non-"O" tags (+ precision, recall,
                                     accuracy)
qa          squad_scores             exact match and token F1 after SQuAD v1's normalisation
causal-lm   perplexity               exp(mean token loss)
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

MAX_LOG_PERPLEXITY = 50.0  # exp(50) ~ 5e21: a diverged run reports a huge number, not an overflow


def accuracy_and_macro_f1(
    predictions: Sequence[int], references: Sequence[int], n_labels: int
) -> dict[str, float]:
    """Accuracy and the F1 averaged over labels 0..n_labels-1 that are predicted or present."""
    correct = sum(p == r for p, r in zip(predictions, references))
    f1s = []
    for label in range(n_labels):
        true_pos = sum(p == r == label for p, r in zip(predictions, references))
        predicted, actual = predictions.count(label), references.count(label)
        if predicted + actual:
            f1s.append(2 * true_pos / (predicted + actual))
    return {"accuracy": correct / len(references), "f1": sum(f1s) / len(f1s) if f1s else 0.0}


def token_f1(
    predictions: Sequence[str], references: Sequence[str], outside: str = "O"
) -> dict[str, float]:
    """Word-level micro F1 over the tags that are not `outside` (+ accuracy over all words)."""
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
    """(exact match, F1) of one prediction against the best-matching reference answer (SQuAD v1)."""
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


def perplexity(mean_loss: float) -> float:
    """exp(mean token loss), capped at exp(MAX_LOG_PERPLEXITY)."""
    return math.exp(min(mean_loss, MAX_LOG_PERPLEXITY))

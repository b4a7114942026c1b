"""The heads' losses as pure functions of logits and labels, mirroring `bloomlm/flax/losses.py`.

Labels are checked at the API boundary (`checks.py`) before these run; -100 labels are ignored by
every cross-entropy, as in transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits at t against the label at t + 1; -100 labels are ignored."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1))


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, problem_type: str
) -> torch.Tensor:
    if problem_type == "regression":
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def question_answering_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
) -> torch.Tensor:
    """Mean of the start and end cross-entropies; positions beyond the sequence are ignored."""
    ignored_index = start_logits.shape[1]
    start_positions = start_positions.clamp(0, ignored_index)
    end_positions = end_positions.clamp(0, ignored_index)
    start_loss = F.cross_entropy(start_logits, start_positions, ignore_index=ignored_index)
    end_loss = F.cross_entropy(end_logits, end_positions, ignore_index=ignored_index)
    return (start_loss + end_loss) / 2

"""The losses of the PyTorch heads, as JAX functions for fine-tuning the Flax heads (e.g. with
optax).

Exported as `bloomlm.flax_losses`. Each takes the head's logits and the labels and returns a float32
scalar with PyTorch's semantics:

    causal_lm_loss(logits [B, T, V], labels [B, T])
        cross-entropy of logits[:, :-1] against labels[:, 1:]
    token_classification_loss(logits [B, T, N], labels [B, T])
    sequence_classification_loss(logits [B, N], labels, problem_type=None)
        regression (MSE; the default when N == 1), single_label_classification (cross-entropy; the
        default for integer labels), multi_label_classification (BCE with logits; float labels,
        N > 1)
    question_answering_loss(start_logits [B, T], end_logits [B, T],
                            start_positions [B], end_positions [B])
        positions clamped to [0, T]; T (out of range) is ignored; the mean of the two
        cross-entropies

Labels equal to -100 are ignored by every cross-entropy, and the mean is over the rest (NaN when
nothing is left, as in PyTorch). Shapes and dtypes are checked always, label values when they are
concrete.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bloomlm.config import PROBLEM_TYPES

IGNORE_INDEX = -100


def cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """torch.nn.functional.cross_entropy over logits [N, C] and integer labels [N],
    mean over kept labels."""
    _check_class_labels(labels, logits.shape[-1], ignore_index)
    kept = labels != ignore_index
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(
        log_probs, jnp.where(kept, labels, 0)[:, None].astype(jnp.int32), axis=-1
    )[:, 0]
    return -jnp.sum(jnp.where(kept, picked, 0.0)) / jnp.sum(kept)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Next-token cross-entropy: the logits at t predict labels[t + 1]; -100 labels are ignored."""
    _check_shape(labels, logits.shape[:2], "labels", "[batch, seq] like input_ids")
    vocab = logits.shape[-1]
    return cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))


def token_classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy over every token, (batch * seq, num_labels); -100 labels are ignored."""
    _check_shape(labels, logits.shape[:2], "labels", "[batch, seq] like input_ids")
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def sequence_classification_loss(
    logits: jax.Array, labels: jax.Array, problem_type: str | None = None
) -> jax.Array:
    """The PyTorch sequence classifier's loss for pooled logits [B, num_labels];
    see the module docstring."""
    num_labels = logits.shape[-1]
    labels = jnp.asarray(labels)
    integer_labels = jnp.issubdtype(labels.dtype, jnp.integer)
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif integer_labels:
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(
            f"problem_type must be one of {PROBLEM_TYPES} or None, got {problem_type!r}"
        )
    logits = logits.astype(jnp.float32)
    if problem_type == "regression":
        if num_labels == 1:  # PyTorch squeezes both sides
            logits, labels = jnp.squeeze(logits), jnp.squeeze(labels)
        _check_shape(labels, logits.shape, "labels", "one float per logit for regression")
        return jnp.mean((logits - labels.astype(jnp.float32)) ** 2)
    if problem_type == "single_label_classification":
        if not integer_labels:
            raise ValueError(
                f"single_label_classification needs integer class labels, got dtype {labels.dtype}"
            )
        _check_shape(labels, logits.shape[:1], "labels", "one class id per row")
        return cross_entropy(logits, labels)
    _check_shape(
        labels, logits.shape, "labels", "[batch, num_labels] of 0/1 targets for multi-label"
    )
    targets = labels.astype(jnp.float32)
    # BCE with logits, written the stable way torch does: max(x, 0) - x * y + log(1 + exp(-|x|)).
    return jnp.mean(
        jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    )


def question_answering_loss(
    start_logits: jax.Array,
    end_logits: jax.Array,
    start_positions: jax.Array,
    end_positions: jax.Array,
) -> jax.Array:
    """Mean of the start and end cross-entropies;
    positions outside [0, seq) are clamped to seq and ignored."""
    batch, length = start_logits.shape
    _check_shape(end_logits, (batch, length), "end_logits", "the shape of start_logits")
    losses = []
    sides = (
        ("start_positions", start_logits, start_positions),
        ("end_positions", end_logits, end_positions),
    )
    for name, logits, positions in sides:
        positions = jnp.asarray(positions)
        if positions.ndim > 1:  # [B, 1] as PyTorch accepts it
            positions = positions.squeeze(-1)
        _check_shape(positions, (batch,), name, "one position per row")
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(
                f"{name} must hold integer token positions, got dtype {positions.dtype}"
            )
        losses.append(cross_entropy(logits, jnp.clip(positions, 0, length), ignore_index=length))
    return (losses[0] + losses[1]) / 2


def _check_shape(array, shape: tuple, name: str, allowed: str) -> None:
    if tuple(jnp.shape(array)) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(jnp.shape(array))}, expected {tuple(shape)}: {allowed}"
        )


def _check_class_labels(labels, num_classes: int, ignore_index: int) -> None:
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise ValueError(f"class labels must be integers, got dtype {jnp.asarray(labels).dtype}")
    if isinstance(labels, jax.core.Tracer):
        # under jit an out-of-range label makes the loss NaN (take_along_axis fills with NaN)
        return
    values = np.asarray(labels)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        raise ValueError(
            f"labels {sorted(set(bad.tolist()))[:10]} are outside [0, {num_classes}) "
            f"and are not the ignored value {ignore_index}"
        )

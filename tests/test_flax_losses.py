"""`bloomlm.flax_losses` against the PyTorch heads' loss functions, gradients against PyTorch's, and
a few optax steps on each Flax head that must lower its loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax.traverse_util import flatten_dict

import bloomlm
from bloomlm.flax import weights
from bloomlm.torch import model as torch_model
from conftest import assert_close, make_inputs

losses = bloomlm.flax_losses
LOSS_TOL = 1e-5  # the same float32 formulas


def both(fn_name: str, *arrays, **kwargs):
    ours = getattr(losses, fn_name)(*(jnp.asarray(a) for a in arrays), **kwargs)
    ref = getattr(torch_model, fn_name)(
        *(torch.from_numpy(np.asarray(a)) for a in arrays), **kwargs
    )
    return float(ours), float(ref)


def test_losses_equal_pytorch_losses():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, (2, 5))
    labels[0, 2] = labels[1, 4] = -100
    for name in ("causal_lm_loss", "token_classification_loss"):
        ours, ref = both(name, logits, labels)
        assert abs(ours - ref) < LOSS_TOL * max(1, abs(ref)), name
    assert (
        both("causal_lm_loss", logits, labels)[0]
        != both("causal_lm_loss", logits, np.where(labels == -100, 0, labels))[0]
    )

    pooled = rng.normal(size=(4, 3)).astype(np.float32)
    cases = [
        (pooled[:, :1], rng.normal(size=(4,)).astype(np.float32), "regression"),
        (pooled, rng.normal(size=(4, 3)).astype(np.float32), "regression"),
        (pooled, np.array([0, 2, -100, 1]), "single_label_classification"),
        (pooled, (rng.random((4, 3)) > 0.5).astype(np.float32), "multi_label_classification"),
    ]
    for logits_, labels_, problem_type in cases:
        ours, ref = both(
            "sequence_classification_loss", logits_, labels_, problem_type=problem_type
        )
        assert abs(ours - ref) < LOSS_TOL * max(1, abs(ref)), problem_type
        # problem_type=None infers it from num_labels and the labels' dtype (float labels with 3
        # labels: multi-label, as in PyTorch, so the second case infers differently)
        inferred = float(
            losses.sequence_classification_loss(jnp.asarray(logits_), jnp.asarray(labels_))
        )
        assert (inferred == pytest.approx(ours, rel=1e-6)) == (
            labels_.shape != (4, 3) or problem_type != "regression"
        )

    start, end = (rng.normal(size=(3, 6)).astype(np.float32) for _ in range(2))
    start_positions, end_positions = (
        np.array([1, 40, -3]),
        np.array([5, 0, 6]),
    )  # 40 and 6 are ignored, -3 -> 0
    ours, ref = both("question_answering_loss", start, end, start_positions, end_positions)
    assert abs(ours - ref) < LOSS_TOL * max(1, abs(ref))
    # All labels ignored: NaN, as PyTorch gives.
    assert np.isnan(
        float(losses.token_classification_loss(jnp.asarray(logits), jnp.full((2, 5), -100)))
    )


def test_loss_input_errors():
    logits = jnp.zeros((2, 5, 7))
    with pytest.raises(ValueError, match=r"labels has shape \(2, 4\), expected \(2, 5\)"):
        losses.causal_lm_loss(logits, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        losses.token_classification_loss(logits, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"labels \[7\] are outside \[0, 7\)"):
        losses.token_classification_loss(logits, jnp.full((2, 5), 7))
    with pytest.raises(ValueError, match="problem_type must be one of"):
        losses.sequence_classification_loss(
            jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), problem_type="ranking"
        )
    with pytest.raises(ValueError, match="integer class labels"):
        losses.sequence_classification_loss(
            jnp.zeros((2, 3)), jnp.zeros(2), "single_label_classification"
        )
    with pytest.raises(ValueError, match="start_positions has shape"):
        losses.question_answering_loss(
            jnp.zeros((2, 5)), jnp.zeros((2, 5)), jnp.zeros(3, jnp.int32), jnp.zeros(2)
        )


# ---------------------------------------------------------------------------------------------
# Fine-tuning: a jitted value_and_grad through model + loss, a few Adam steps on one batch.

HEADS = {
    "BloomForCausalLM": lambda out, b: losses.causal_lm_loss(out.logits, b["labels"]),
    "BloomForSequenceClassification": lambda out, b: losses.sequence_classification_loss(
        out.logits, b["classes"]
    ),
    "BloomForTokenClassification": lambda out, b: losses.token_classification_loss(
        out.logits, b["tags"]
    ),
    "BloomForQuestionAnswering": lambda out, b: losses.question_answering_loss(
        out.start_logits, out.end_logits, b["starts"], b["ends"]
    ),
}


def batch_for(vocab_size: int, padding: str = "left") -> dict:
    input_ids, mask = make_inputs(vocab_size, padding, seq=6)
    labels = np.where(mask.numpy() == 1, input_ids.numpy(), -100)
    return {
        "input_ids": input_ids.numpy(),
        "attention_mask": mask.numpy(),
        "labels": labels,
        "classes": np.array([0, 1, 1]),
        "tags": np.where(mask.numpy() == 1, input_ids.numpy() % 2, -100),
        "starts": np.array([5, 4, 5]),
        "ends": np.array([5, 5, 5]),
    }


@pytest.mark.parametrize("arch", HEADS)
def test_fine_tuning_lowers_the_loss(make_checkpoint, arch):
    # One layer keeps the gradient's compile short; the causal LM keeps two for the gradient check.
    folder = (
        make_checkpoint("pow2", arch)
        if arch == "BloomForCausalLM"
        else make_checkpoint("pow2", arch, n_layer=1)
    )
    model = getattr(bloomlm, "Flax" + arch).from_pretrained(folder)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def train_step(params, opt_state, batch):
        def loss_fn(params):
            out = model(batch["input_ids"], batch["attention_mask"], params=params)
            return HEADS[arch](out, batch)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    params, opt_state = model.params, optimizer.init(model.params)
    batch = batch_for(model.config.vocab_size)
    history = []
    for step in range(4):
        params, opt_state, loss, grads = train_step(params, opt_state, batch)
        history.append(float(loss))
        if step == 0 and arch == "BloomForCausalLM":
            assert_grads_equal_torch(folder, batch, grads, model.config)
    assert all(np.isfinite(history))
    assert history[-1] < history[0] - 0.05 * abs(history[0]), history


def assert_grads_equal_torch(folder, batch, grads, config) -> None:
    """SPEC: gradients within 1e-4 of PyTorch's on the same weights and batch."""
    model = bloomlm.BloomForCausalLM.from_pretrained(folder)
    loss = model(
        torch.from_numpy(batch["input_ids"]),
        attention_mask=torch.from_numpy(batch["attention_mask"]),
        labels=torch.from_numpy(batch["labels"]),
    ).loss
    loss.backward()
    converted = weights.flax_to_torch(flatten_dict(grads), config)
    checked = 0
    for name, param in model.named_parameters():
        if name == "lm_head.weight":
            continue  # tied: the same tensor as the embeddings
        assert_close(
            torch.tensor(np.asarray(converted[name])), param.grad, 1e-4, name=f"grad {name}"
        )
        checked += 1
    assert checked == len(converted)

"""transformers 4.37's `Trainer` fine-tuning bloomlm models, with its default `TrainingArguments`
(safetensors checkpoints): the tied causal LM and the sequence classifier train as transformers'
classes do, save checkpoints, and resume from the first one to the same result.

`Trainer` treats a model that is not its own `PreTrainedModel` as a plain module: it saves
`model.state_dict()` with `safetensors.torch.save_file` (so a tied head must be listed once, see
`bloomlm.torch.hf_compat`) and resumes with `model.load_state_dict(..., strict=False)`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import FP32_TOL, ours_cls, ref_cls

STEPS, SAVE_EVERY = 6, 2


def _dataset(arch: str) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 128, (16, 8), generator=generator)
    if arch == "BloomForCausalLM":
        return [{"input_ids": row, "labels": row} for row in ids]
    return [{"input_ids": row, "labels": torch.tensor(i % 3)} for i, row in enumerate(ids)]


def _trainer(model: torch.nn.Module, arch: str, output_dir) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE_EVERY, logging_steps=1,
        per_device_train_batch_size=4, learning_rate=1e-2, seed=0, report_to=[], use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    assert args.save_safetensors  # the default, as the issue asks
    data = _dataset(arch)
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])


def _resume(trainer: Trainer, checkpoint) -> None:
    # transformers 4.37 reads its own rng_state.pth with torch.load's weights_only default, which
    # torch >= 2.6 applies and which refuses NumPy's random state: allow exactly those globals.
    numpy_state = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    with torch.serialization.safe_globals(numpy_state):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def _logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("arch", ["BloomForCausalLM", "BloomForSequenceClassification"])
def test_trainer_fine_tunes_saves_and_resumes(make_checkpoint, tmp_path, arch):
    overrides = {} if arch == "BloomForCausalLM" else {"num_labels": 3}
    folder = make_checkpoint("pow2", arch, **overrides)
    ours = _trainer(ours_cls(arch).from_pretrained(folder), arch, tmp_path / "ours")
    ours.train()
    losses = _logged_losses(ours)
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    checkpoints = sorted((tmp_path / "ours").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all((p / "model.safetensors").is_file() for p in checkpoints)
    final_eval = ours.evaluate()["eval_loss"]

    theirs = _trainer(ref_cls(arch).from_pretrained(folder), arch, tmp_path / "theirs")
    theirs.train()
    assert _logged_losses(theirs) == losses  # Trainer rounds logged losses to 4 digits
    assert abs(theirs.evaluate()["eval_loss"] - final_eval) <= FP32_TOL * max(1, final_eval)

    resumed = _trainer(ours_cls(arch).from_pretrained(folder), arch, tmp_path / "resumed")
    _resume(resumed, checkpoints[0])
    assert _logged_losses(resumed) == losses  # two steps from the checkpoint, four run again
    assert abs(resumed.evaluate()["eval_loss"] - final_eval) <= 1e-5
    if arch == "BloomForCausalLM":  # the tied head stayed tied through save and resume
        model = resumed.model
        assert model.lm_head.weight is model.transformer.word_embeddings.weight
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["global_step"] == SAVE_EVERY

"""PEFT (0.13.2, the test extra) driving bloomlm models as it drives transformers' BLOOM classes.

LoRA on the causal LM and the sequence classifier: the adapter trains (the loss falls, and step by
step equals the same run on transformers' class), `merge_and_unload()` gives the adapted logits,
the adapter saves and reloads. Prompt tuning: the virtual tokens reach the model (the loss equals
transformers'). Tiny random checkpoints written by transformers, offline.
"""

from __future__ import annotations

import peft
import pytest
import torch

from conftest import FP32_TOL, assert_close, make_inputs, ours_cls, ref_cls

STEPS = 8


def _lora(task_type: str) -> peft.LoraConfig:
    return peft.LoraConfig(task_type=task_type, r=4, lora_alpha=8, lora_dropout=0.0)


def _batch(arch: str) -> dict[str, torch.Tensor]:
    input_ids, mask = make_inputs(128, "left", batch=4, seq=8)
    labels = input_ids if arch == "BloomForCausalLM" else torch.tensor([0, 1, 2, 1])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _train(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _adapted(cls: type, folder, arch: str) -> peft.PeftModel:
    model = cls.from_pretrained(folder)
    torch.manual_seed(0)  # LoRA's A matrices are drawn here, the same for both libraries
    task = "CAUSAL_LM" if arch == "BloomForCausalLM" else "SEQ_CLS"
    return peft.get_peft_model(model, _lora(task))


@pytest.mark.parametrize("arch", ["BloomForCausalLM", "BloomForSequenceClassification"])
def test_lora_trains_merges_and_reloads(make_checkpoint, tmp_path, arch):
    overrides = {} if arch == "BloomForCausalLM" else {"num_labels": 3}
    folder = make_checkpoint("pow2", arch, **overrides)
    batch = _batch(arch)
    ours, theirs = _adapted(ours_cls(arch), folder, arch), _adapted(ref_cls(arch), folder, arch)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    losses = _train(ours, batch)
    assert losses[-1] < losses[0] - 0.1, losses  # the adapter learns
    torch.testing.assert_close(losses, _train(theirs, batch), rtol=FP32_TOL, atol=FP32_TOL)

    ours.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapted = ours(**inputs).logits
    ours.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = ours_cls(arch).from_pretrained(folder)
    with torch.no_grad():
        assert (base(**inputs).logits - adapted).abs().max() > 1e-3  # the adapter changed something
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = ours.merge_and_unload()
    assert type(merged) is ours_cls(arch)
    with torch.no_grad():
        assert_close(reloaded(**inputs).logits, adapted, FP32_TOL, name="reloaded adapter")
        assert_close(merged(**inputs).logits, adapted, FP32_TOL, name="merged")


def test_prompt_tuning_feeds_virtual_tokens_as_transformers(make_checkpoint):
    folder = make_checkpoint("pow2")
    batch = _batch("BloomForCausalLM")
    losses = []
    for cls in (ours_cls("BloomForCausalLM"), ref_cls("BloomForCausalLM")):
        model = cls.from_pretrained(folder)
        torch.manual_seed(0)
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        tuned = peft.get_peft_model(model, config)
        losses.append(_train(tuned, batch))
    torch.testing.assert_close(losses[0], losses[1], rtol=FP32_TOL, atol=FP32_TOL)
    assert losses[0][-1] < losses[0][0]

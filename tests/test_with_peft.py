"""PEFT (0.13.2, the test extra) driving bloomlm models as it drives transformers' BLOOM classes.

LoRA on the causal LM and the sequence classifier: the adapter trains (the loss falls, and step by
step equals the same run on transformers' class), `merge_and_unload()` gives the adapted logits,
the adapter saves and reloads. Prompt tuning: the virtual tokens reach the model (the loss equals
transformers'), and `generate` sees them (the same text as transformers' model generates). Tiny
random checkpoints written by transformers, offline.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from conftest import FP32_TOL, PAD_ID, assert_close, make_inputs, ours_cls, ref_cls

STEPS = 8
TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"


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


def _prompt_tuned(cls: type, folder) -> peft.PeftModel:
    model = cls.from_pretrained(folder)
    torch.manual_seed(0)  # the virtual tokens' embeddings are drawn here, the same for both
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return peft.get_peft_model(model, config).eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=20),
        dict(penalty_alpha=0.5, top_k=3),
        dict(use_cache=False),
    ],
    ids=["greedy", "beams", "sampled", "contrastive", "no-cache"],
)
def test_prompt_tuning_generates_the_text_transformers_generates(make_checkpoint, kwargs):
    """PEFT hands generate the virtual tokens through the model's prepare_inputs_for_generation
    (inputs_embeds for the first pass, a wider mask): the same text as transformers' model under
    the same adapter, and not the base model's text."""
    from bloomlm import BloomTokenizerFast

    tokenizer = BloomTokenizerFast.from_pretrained(TOKENIZER_DIR)
    folder = make_checkpoint("pow2")
    input_ids, mask = make_inputs(128, "left", batch=3, seq=6)
    common = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD_ID)
    texts = []
    for cls in (ours_cls("BloomForCausalLM"), ref_cls("BloomForCausalLM")):
        tuned = _prompt_tuned(cls, folder)
        torch.manual_seed(1)
        texts.append(tokenizer.batch_decode(tuned.generate(**common, **kwargs)))
    assert texts[0] == texts[1]
    base = ours_cls("BloomForCausalLM").from_pretrained(folder)
    torch.manual_seed(1)
    assert tokenizer.batch_decode(base.generate(**common, **kwargs)) != texts[0]


def test_prefix_tuning_is_refused_with_the_reason(make_checkpoint):
    model = ours_cls("BloomForCausalLM").from_pretrained(make_checkpoint("pow2"))
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    tuned = peft.get_peft_model(model, config)
    input_ids, mask = make_inputs(128, batch=1, seq=5)
    with pytest.raises(ValueError, match="prefix tuning"):
        tuned.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=3)

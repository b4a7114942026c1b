"""accelerate's big-model recipe on a bloomlm model: build it under `init_empty_weights()`, re-tie
(as accelerate's docs do for every model: its empty-weight context re-wraps each parameter), then
`load_checkpoint_and_dispatch(..., device_map="auto")` with the model's `_no_split_modules`."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import find_tied_parameters

import bloomlm
from conftest import FP32_TOL, assert_close, make_inputs, ref_cls


def _empty_then_dispatched(cls: type, folder, **kwargs) -> torch.nn.Module:
    with init_empty_weights():
        model = cls(cls.config_class.from_pretrained(folder))
    assert all(p.is_meta for p in model.parameters())
    model.tie_weights()
    return load_checkpoint_and_dispatch(
        model, str(folder), device_map="auto", no_split_module_classes=model._no_split_modules,
        **kwargs,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("arch", ["BloomForCausalLM", "BloomForSequenceClassification"])
def test_init_empty_weights_and_dispatch_on_cpu(make_checkpoint, arch):
    overrides = {} if arch == "BloomForCausalLM" else {"num_labels": 3}
    folder = make_checkpoint("pow2", arch, **overrides)
    ours = _empty_then_dispatched(getattr(bloomlm, arch), folder)
    assert not any(p.is_meta for p in ours.parameters())
    assert ours.hf_device_map == {"": "cpu"}
    theirs = ref_cls(arch).from_pretrained(folder).eval()
    input_ids, mask = make_inputs(128, "left")
    with torch.no_grad():
        expected = theirs(input_ids, attention_mask=mask).logits
        assert_close(ours(input_ids, attention_mask=mask).logits, expected, FP32_TOL, name=arch)
    if arch == "BloomForCausalLM":
        assert find_tied_parameters(ours) == [
            ["lm_head.weight", "transformer.word_embeddings.weight"]
        ]
        with torch.no_grad():
            kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
            assert torch.equal(
                ours.generate(input_ids, **kwargs), theirs.generate(input_ids, **kwargs)
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_init_empty_weights_and_dispatch_on_cuda(make_checkpoint):
    folder = make_checkpoint("pow2")
    ours = _empty_then_dispatched(bloomlm.BloomForCausalLM, folder)
    assert ours.device.type == "cuda" and set(ours.hf_device_map.values()) == {0}
    theirs = ref_cls("BloomForCausalLM").from_pretrained(folder).eval()
    input_ids, mask = make_inputs(128, "left")
    with torch.no_grad():
        logits = ours(input_ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
        assert_close(logits, theirs(input_ids, attention_mask=mask).logits, 1e-4, name="cuda")

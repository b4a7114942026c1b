"""The PyTorch classes' generic surface (transformers' PreTrainedModel) against transformers 4.37.2:
the same attributes, the same answers from the generic methods on the same weights."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import transformers

import bloomlm
from conftest import ARCHS, FP32_TOL, TINY_CONFIGS, assert_close, make_inputs, ours_cls, ref_cls

CLASS_ATTRIBUTES = ("main_input_name", "base_model_prefix", "supports_gradient_checkpointing",
                    "_no_split_modules", "_skip_keys_device_placement", "_keys_to_ignore_on_save",
                    "is_parallelizable")  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_class_attributes_equal_transformers(arch):
    ours, theirs = ours_cls(arch), ref_cls(arch)
    for name in CLASS_ATTRIBUTES:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.can_generate() == theirs.can_generate() == (arch == "BloomForCausalLM")
    assert ours.config_class is bloomlm.BloomConfig
    assert ours._tied_weights_keys == (theirs._tied_weights_keys or [])


@pytest.mark.parametrize("arch", ARCHS)
def test_instance_surface_equals_transformers(arch, load_pair):
    ours, theirs = load_pair("pow2", arch)
    assert ours.base_model is ours.transformer if arch != "BloomModel" else ours
    assert (ours.device, ours.dtype, ours.framework) == (theirs.device, theirs.dtype, "pt")
    assert ours.name_or_path == theirs.name_or_path != ""
    assert ours.warnings_issued == {} and isinstance(theirs.warnings_issued, dict)
    for only_trainable in (False, True):
        for exclude in (False, True):
            kwargs = dict(only_trainable=only_trainable, exclude_embeddings=exclude)
            assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), kwargs
    assert ours.get_memory_footprint() == theirs.get_memory_footprint()
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long)}
    assert ours.floating_point_ops(batch) == theirs.floating_point_ops(batch)
    if ours.can_generate():
        assert ours.generation_config == bloomlm.GenerationConfig.from_model_config(ours.config)
    else:
        assert ours.generation_config is None is theirs.generation_config
    output = ours.get_output_embeddings()
    assert (output is None) == (theirs.get_output_embeddings() is None)
    assert ours.get_input_embeddings().weight.shape == theirs.get_input_embeddings().weight.shape


def test_gradient_checkpointing_switches():
    model = bloomlm.BloomForCausalLM(bloomlm.BloomConfig(**TINY_CONFIGS["pow2"]))
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing and model.transformer.gradient_checkpointing
    model.train()
    input_ids = make_inputs(128)[0]
    model(input_ids, labels=input_ids).loss.backward()
    assert model.transformer.h[0].mlp.dense_h_to_4h.weight.grad is not None
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(TypeError, match="gradient_checkpointing_kwargs"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=["use_reentrant"])


def test_input_require_grads_reach_a_frozen_trunk():
    model = bloomlm.BloomForCausalLM(bloomlm.BloomConfig(**TINY_CONFIGS["pow2"]))
    model.requires_grad_(False)
    input_ids = make_inputs(128)[0]
    assert not model(input_ids).logits.requires_grad
    model.enable_input_require_grads()
    assert model(input_ids).logits.requires_grad
    model.disable_input_require_grads()
    assert not model(input_ids).logits.requires_grad
    with pytest.raises(ValueError, match="enable_input_require_grads"):
        model.disable_input_require_grads()


@pytest.mark.parametrize("config_name", ["pow2", "untied"])
@pytest.mark.parametrize(("new_num_tokens", "multiple"), [(150, None), (100, None), (130, 64)])
def test_resize_token_embeddings_equals_transformers(
    load_pair, config_name, new_num_tokens, multiple
):
    ours, theirs = load_pair(config_name, "BloomForCausalLM")
    ours = bloomlm.BloomForCausalLM.from_pretrained(ours.name_or_path)  # the pair is shared
    theirs = transformers.BloomForCausalLM.from_pretrained(theirs.name_or_path)
    ours_emb = ours.resize_token_embeddings(new_num_tokens, pad_to_multiple_of=multiple)
    theirs_emb = theirs.resize_token_embeddings(new_num_tokens, pad_to_multiple_of=multiple)
    assert ours_emb.weight.shape == theirs_emb.weight.shape
    assert ours.config.vocab_size == theirs.config.vocab_size == ours_emb.num_embeddings
    kept = min(new_num_tokens, 128)
    torch.testing.assert_close(ours_emb.weight[:kept], theirs_emb.weight[:kept], rtol=0, atol=0)
    head = ours.get_output_embeddings()
    assert head.weight.shape == theirs.get_output_embeddings().weight.shape
    assert (head.weight is ours_emb.weight) == TINY_CONFIGS[config_name].get(
        "tie_word_embeddings", True
    )


def test_prepare_inputs_for_generation_equals_transformers(load_pair):
    ours, theirs = load_pair("pow2", "BloomForCausalLM")
    input_ids, mask = make_inputs(128, "left", batch=2, seq=6)
    with torch.no_grad():
        past = theirs(input_ids[:, :5], attention_mask=mask[:, :5]).past_key_values
    embeds = torch.randn(2, 6, 32)
    standard = theirs._convert_to_standard_cache(past, batch_size=2)
    cases = [
        dict(),
        dict(past_key_values=past, use_cache=True),
        dict(inputs_embeds=embeds),
        dict(inputs_embeds=embeds, past_key_values=past),
        dict(past_key_values=standard),
    ]
    for kwargs in cases:
        mine = ours.prepare_inputs_for_generation(input_ids, attention_mask=mask, **kwargs)
        ref = theirs.prepare_inputs_for_generation(input_ids, attention_mask=mask, **kwargs)
        assert mine.keys() == ref.keys(), kwargs.keys()
        for key, value in ref.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(mine[key], value), key
            elif key == "past_key_values" and value is not None:
                for (k1, v1), (k2, v2) in zip(mine[key], value, strict=True):
                    assert torch.equal(k1, k2) and torch.equal(v1, v2)
            else:
                assert mine[key] == value, key
    assert ours._convert_to_standard_cache(past, batch_size=2)[0][0].shape == standard[0][0].shape


@pytest.mark.parametrize("arch", ["BloomForCausalLM", "BloomForSequenceClassification"])
def test_from_pretrained_none_with_config_and_state_dict(load_pair, arch):
    _, theirs = load_pair("pow2", arch)
    config = bloomlm.BloomConfig.from_pretrained(theirs.name_or_path)
    ours = ours_cls(arch).from_pretrained(None, config=config, state_dict=theirs.state_dict())
    input_ids, mask = make_inputs(128, "left")
    with torch.no_grad():
        expected = theirs(input_ids, attention_mask=mask).logits
        assert_close(ours(input_ids, attention_mask=mask).logits, expected, FP32_TOL, name=arch)
    with pytest.raises(ValueError, match="needs config= and state_dict="):
        ours_cls(arch).from_pretrained(None, config=config)


@pytest.mark.parametrize("safe", [True, False])
def test_save_pretrained_keywords_are_read_by_transformers(load_pair, tmp_path, safe):
    ours, theirs = load_pair("untied", "BloomForCausalLM")
    state = {k: v * 2 for k, v in ours.state_dict().items()}
    ours.save_pretrained(tmp_path, state_dict=state, safe_serialization=safe, max_shard_size="50KB")
    assert len(list(tmp_path.glob("*.safetensors" if safe else "*.bin"))) > 1  # sharded
    again = transformers.BloomForCausalLM.from_pretrained(tmp_path)
    for name, tensor in again.state_dict().items():
        torch.testing.assert_close(tensor, theirs.state_dict()[name] * 2, msg=name)


def test_a_tied_head_is_listed_once_and_loads_either_way(load_pair, tmp_path):
    """safetensors refuses one tensor under two names (Trainer saves `state_dict()` this way)."""
    ours, theirs = load_pair("pow2", "BloomForCausalLM")
    state = ours.state_dict()
    assert "lm_head.weight" not in state and "lm_head.weight" in theirs.state_dict()
    assert set(theirs.state_dict()) - set(state) == {"lm_head.weight"}
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    model = bloomlm.BloomForCausalLM(ours.config).eval()  # eval: the same attention path as `ours`
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"))  # strict
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    input_ids = make_inputs(128)[0]
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, ours(input_ids).logits)
    model = bloomlm.BloomForCausalLM(ours.config)
    model.load_state_dict(theirs.state_dict())  # transformers' form, head included
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    untied = load_pair("untied", "BloomForCausalLM")[0]
    assert "lm_head.weight" in untied.state_dict()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_negative_eos_id_never_stops_as_in_transformers(load_pair, num_beams):
    ours, theirs = load_pair("pow2", "BloomForCausalLM")
    input_ids, mask = make_inputs(128, "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=5, num_beams=num_beams, pad_token_id=0)
    for eos in (-1, [-1, 2]):
        with torch.no_grad():
            mine = ours.generate(input_ids, eos_token_id=eos, **kwargs)
            assert torch.equal(mine, theirs.generate(input_ids, eos_token_id=eos, **kwargs))
        assert mine.shape == (3, 12)
    flax_model = bloomlm.FlaxBloomForCausalLM.from_pretrained(ours.name_or_path)
    flax_out = flax_model.generate(
        input_ids.numpy(), mask.numpy(), max_new_tokens=5, eos_token_id=-1, pad_token_id=0
    )
    if num_beams == 1:
        assert (flax_out.sequences == mine.numpy()).all()

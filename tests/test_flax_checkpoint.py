"""Flax model folders: msgpack written by transformers' Flax BLOOM read by ours and ours read by it,
sharded or not; PyTorch head checkpoints into Flax heads and back; caches exchanged with
transformers' Flax; base <-> head prefixes; the loading report; damaged files.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import serialization
from flax.traverse_util import flatten_dict
from transformers.modeling_flax_pytorch_utils import (
    convert_pytorch_state_dict_to_flax,
    load_flax_weights_in_pytorch_model,
)

import bloomlm
from bloomlm.errors import CheckpointError, CheckpointNotFoundError
from bloomlm.flax import weights
from conftest import assert_close, build_reference, make_inputs

FLAX_TOL = 1e-4


def flat(params) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def assert_params_equal(ours, theirs) -> None:
    ours, theirs = flat(ours), flat(theirs)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


@pytest.fixture(scope="session")
def transformers_msgpack(make_checkpoint, tmp_path_factory):
    """A folder written by transformers 4.37's FlaxBloomForCausalLM.save_pretrained (pow2: its ALiBi
    works)."""
    from types import SimpleNamespace

    folder = tmp_path_factory.mktemp("transformers-flax")
    reference = build_reference("pow2")
    theirs = transformers.FlaxBloomForCausalLM(reference.config, _do_init=False)
    # transformers' own PyTorch -> Flax converter; it reads only the shapes of the model's tree, so
    # a stub saves running its (eager, slow) init.
    shapes = SimpleNamespace(base_model_prefix="transformer", params=theirs.params_shape_tree)
    state_dict = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied
    params = convert_pytorch_state_dict_to_flax(state_dict, shapes)
    theirs.save_pretrained(folder, params=params)
    assert (folder / "flax_model.msgpack").is_file() and not list(folder.glob("*.safetensors"))
    return folder


@pytest.fixture(scope="session")
def theirs_flax(transformers_msgpack):
    model, params = transformers.FlaxBloomForCausalLM.from_pretrained(
        transformers_msgpack, _do_init=False
    )
    return model, params


def test_param_tree_is_transformers_tree(theirs_flax):
    theirs, _ = theirs_flax
    for name, ours in [
        ("BloomForCausalLM", bloomlm.FlaxBloomForCausalLM),
        ("BloomModel", bloomlm.FlaxBloomModel),
    ]:
        ref_cls = getattr(transformers, "Flax" + name)
        for config_kwargs in (dict(tie_word_embeddings=True), dict(tie_word_embeddings=False)):
            kwargs = dict(vocab_size=96, hidden_size=16, n_layer=3, n_head=4, **config_kwargs)
            ref_tree = ref_cls(transformers.BloomConfig(**kwargs), _do_init=False).params_shape_tree
            ours_tree = ours(bloomlm.BloomConfig(**kwargs), _do_init=False).params_shape_tree
            assert {k: v.shape for k, v in flatten_dict(ours_tree).items()} == {
                k: v.shape for k, v in flatten_dict(ref_tree).items()
            }


def test_cache_tree_is_transformers_tree(theirs_flax):
    theirs, _ = theirs_flax
    ours = bloomlm.FlaxBloomForCausalLM(
        bloomlm.BloomConfig(**theirs.config.to_dict()), _do_init=False
    )
    their_cache = jax.eval_shape(
        lambda: theirs.init_cache(2, 7)
    )  # shapes only: theirs runs a forward pass
    assert {k: (v.shape, v.dtype) for k, v in flatten_dict(ours.init_cache(2, 7)).items()} == {
        k: (v.shape, v.dtype) for k, v in flatten_dict(their_cache).items()
    }


def test_transformers_msgpack_loads_into_ours(transformers_msgpack, theirs_flax, make_checkpoint):
    theirs, their_params = theirs_flax
    ours = bloomlm.FlaxBloomForCausalLM.from_pretrained(transformers_msgpack)
    assert_params_equal(ours.params, their_params)
    # ... and equals what ours converts from the PyTorch folder it came from
    assert_params_equal(
        ours.params, bloomlm.FlaxBloomForCausalLM.from_pretrained(make_checkpoint("pow2")).params
    )
    input_ids, mask = (t.numpy() for t in make_inputs(ours.config.vocab_size, "left"))
    theirs_logits = jax.jit(lambda p, i, m: theirs(i, m, params=p).logits)(
        their_params, input_ids, mask
    )
    ours_logits = ours(input_ids, mask).logits
    assert_close(
        torch.tensor(np.asarray(ours_logits)),
        torch.tensor(np.asarray(theirs_logits)),
        FLAX_TOL,
        mask,
    )
    torch_model = bloomlm.BloomForCausalLM.from_pretrained(make_checkpoint("pow2")).eval()
    with torch.no_grad():
        torch_logits = torch_model(
            torch.tensor(input_ids), attention_mask=torch.tensor(mask)
        ).logits
    assert_close(torch.tensor(np.asarray(ours_logits)), torch_logits, FLAX_TOL, mask)


@pytest.mark.parametrize("max_shard_size", ["10GB", "20KB"])
def test_ours_msgpack_loads_into_transformers(transformers_msgpack, tmp_path, max_shard_size):
    ours = bloomlm.FlaxBloomForCausalLM.from_pretrained(transformers_msgpack)
    ours.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    sharded = max_shard_size == "20KB"
    assert (tmp_path / "flax_model.msgpack.index.json").is_file() == sharded
    assert (tmp_path / "flax_model.msgpack").is_file() != sharded
    if sharded:
        shards = sorted(p.name for p in tmp_path.glob("flax_model-*.msgpack"))
        assert len(shards) > 2 and all(
            p.stat().st_size < 40_000 for p in tmp_path.glob("flax_model-*")
        )
        assert set(
            json.loads((tmp_path / "flax_model.msgpack.index.json").read_text())[
                "weight_map"
            ].values()
        ) == set(shards)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "BloomForCausalLM"
    ]
    _, their_params = transformers.FlaxBloomForCausalLM.from_pretrained(tmp_path, _do_init=False)
    assert_params_equal(their_params, ours.params)
    assert_params_equal(bloomlm.FlaxBloomForCausalLM.from_pretrained(tmp_path).params, ours.params)
    # Saving again unsharded over a sharded folder removes the stale shards.
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("flax_model*")) == ["flax_model.msgpack"]


def test_caches_exchange_with_transformers_flax(theirs_flax, transformers_msgpack):
    """A cache filled by transformers' Flax continues in ours and the other way round."""
    model, params = theirs_flax

    @jax.jit
    def theirs(input_ids, attention_mask, params, past_key_values):
        out = model(input_ids, attention_mask, params=params, past_key_values=past_key_values)
        return (
            out.logits,
            out.past_key_values,
        )  # its outputs lose past_key_values when flattened by jit

    ours = bloomlm.FlaxBloomForCausalLM.from_pretrained(transformers_msgpack)
    input_ids, mask = (t.numpy() for t in make_inputs(ours.config.vocab_size, "left", seq=6))
    max_length = 6  # transformers' Flax cache needs the mask at the full cache length
    # (Our init_cache for theirs too: the same tree, and theirs runs an eager forward pass to build
    # one.)
    their_prefill = theirs(input_ids[:, :5], mask, params, ours.init_cache(3, max_length))
    our_prefill = ours(
        input_ids[:, :5], mask[:, :5], past_key_values=ours.init_cache(3, max_length)
    )
    their_step = theirs(input_ids[:, 5:], mask, params, their_prefill[1])[0]
    step_ours_on_theirs = ours(input_ids[:, 5:], mask, past_key_values=their_prefill[1]).logits
    step_theirs_on_ours = theirs(input_ids[:, 5:], mask, params, our_prefill.past_key_values)[0]
    kept = torch.tensor(mask)
    assert_close(
        as_torch(our_prefill.logits), as_torch(their_prefill[0]), FLAX_TOL, kept[:, :5], "prefill"
    )
    assert_close(
        as_torch(step_ours_on_theirs), as_torch(their_step), FLAX_TOL, name="ours on their cache"
    )
    assert_close(
        as_torch(step_theirs_on_ours), as_torch(their_step), FLAX_TOL, name="theirs on our cache"
    )


def as_torch(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


HEADS = (
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
)


@pytest.mark.parametrize("arch", HEADS + ("BloomForCausalLM", "BloomModel"))
def test_pytorch_head_checkpoint_to_flax_and_back(make_checkpoint, tmp_path, arch):
    """PyTorch folder -> our Flax class -> msgpack -> transformers' PyTorch (from_flax) and our
    weight table: every tensor comes back bit for bit."""
    folder = make_checkpoint("odd_heads", arch, num_labels=3)
    flax_model = getattr(bloomlm, "Flax" + arch).from_pretrained(folder)
    flax_model.save_pretrained(tmp_path)
    original = build_reference("odd_heads", arch, num_labels=3).state_dict()
    # transformers' Flax -> PyTorch converter on our msgpack (it has no Flax class for these heads
    # to go through)
    their_model = getattr(transformers, arch)(transformers.BloomConfig.from_pretrained(tmp_path))
    msgpack = jax.tree_util.tree_map(
        np.array, serialization.msgpack_restore((tmp_path / "flax_model.msgpack").read_bytes())
    )
    back = load_flax_weights_in_pytorch_model(their_model, msgpack).state_dict()
    converted = weights.flax_to_torch(flatten_dict(flax_model.params), flax_model.config)
    if arch == "BloomForCausalLM":
        converted = weights.tied_lm_head(converted)
    assert sorted(back) == sorted(original) == sorted(converted)
    for name, tensor in original.items():
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(torch.tensor(converted[name]), tensor, rtol=0, atol=0, msg=name)


def test_base_and_head_prefixes(make_checkpoint, tmp_path):
    base_folder = make_checkpoint("pow2", "BloomModel")
    head, info = bloomlm.FlaxBloomForSequenceClassification.from_pretrained(
        base_folder, output_loading_info=True
    )
    assert info["missing_keys"] == ["score/kernel"] and info["unexpected_keys"] == []
    base = bloomlm.FlaxBloomModel.from_pretrained(base_folder)
    assert_params_equal(head.params["transformer"], base.params)
    std = np.asarray(head.params["score"]["kernel"]).std()
    assert 0.01 < std < 0.03  # initializer_range 0.02
    head.save_pretrained(
        tmp_path
    )  # a head msgpack into a base model: the head weights are reported unused
    base_again, info = bloomlm.FlaxBloomModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == ["score/kernel"] and info["missing_keys"] == []
    assert_params_equal(base_again.params, base.params)
    # A PyTorch head checkpoint into the Flax base model, and a base msgpack into a Flax head.
    qa_folder = make_checkpoint("pow2", "BloomForQuestionAnswering")
    _, info = bloomlm.FlaxBloomModel.from_pretrained(qa_folder, output_loading_info=True)
    assert info["unexpected_keys"] == ["<pytorch>/qa_outputs.bias", "<pytorch>/qa_outputs.weight"]
    base.save_pretrained(tmp_path / "base")
    lm = bloomlm.FlaxBloomForCausalLM.from_pretrained(tmp_path / "base")
    assert_params_equal(lm.params["transformer"], base.params)


def test_pytorch_only_folder_converts_and_says_so_once(make_checkpoint, caplog):
    folder = make_checkpoint("pow2", "BloomForTokenClassification")
    with caplog.at_level(logging.WARNING, logger="bloomlm"):
        bloomlm.FlaxBloomForTokenClassification.from_pretrained(folder)
    said = [r for r in caplog.records if "converting them to Flax" in r.getMessage()]
    assert len(said) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bloomlm"):
        bloomlm.FlaxBloomForTokenClassification.from_pretrained(folder, from_pt=True)
    assert not [r for r in caplog.records if "converting" in r.getMessage()]


def test_dtypes_on_load(make_checkpoint):
    folder = make_checkpoint("bf16")
    model = bloomlm.FlaxBloomForCausalLM.from_pretrained(folder)
    assert (
        model.params["transformer"]["ln_f"]["scale"].dtype == jnp.bfloat16
    )  # kept, as transformers does
    model = bloomlm.FlaxBloomForCausalLM.from_pretrained(
        folder, param_dtype=jnp.float32, dtype=jnp.bfloat16
    )
    assert model.params["transformer"]["ln_f"]["scale"].dtype == jnp.float32
    assert model.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        bloomlm.FlaxBloomForCausalLM.from_pretrained(folder, dtype=jnp.int32)


def test_do_init_false_and_params_setter(make_checkpoint):
    model, params = bloomlm.FlaxBloomModel.from_pretrained(
        make_checkpoint("pow2", "BloomModel"), _do_init=False
    )
    with pytest.raises(ValueError, match="_do_init=False"):
        _ = model.params
    model.params = params
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["ln_f"]["scale"] = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"ln_f/scale has shape \(3,\)"):
        model.params = bad


def test_damaged_or_mismatched_files(make_checkpoint, transformers_msgpack, tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        bloomlm.FlaxBloomModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text((transformers_msgpack / "config.json").read_text())
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        bloomlm.FlaxBloomModel.from_pretrained(tmp_path)
    data = (transformers_msgpack / "flax_model.msgpack").read_bytes()
    (tmp_path / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        bloomlm.FlaxBloomModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"word_embeddings/embedding has shape \(128, 32\)"):
        bloomlm.FlaxBloomForCausalLM.from_pretrained(transformers_msgpack, vocab_size=100)
    with pytest.raises(TypeError, match="unexpected keyword"):
        bloomlm.FlaxBloomForCausalLM.from_pretrained(transformers_msgpack, not_a_field=1)

"""The Flax classes' generic surface (transformers' FlaxPreTrainedModel) and Flax `generate`'s
logits processors, against transformers 4.37.2: its Flax `generate` where it has the setting
(greedy ids equal), its PyTorch `generate` for n-gram blocking and beam search (which bloomlm's
Flax loop follows)."""

from __future__ import annotations

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict

import bloomlm
from bloomlm.flax import processors
from conftest import PAD_ID, build_reference, make_inputs

ARCHS = ("FlaxBloomModel", "FlaxBloomForCausalLM", "FlaxBloomForSequenceClassification",
         "FlaxBloomForTokenClassification", "FlaxBloomForQuestionAnswering")  # fmt: skip


@pytest.fixture(scope="module")
def models(make_checkpoint):
    """(ours, transformers' Flax, transformers' PyTorch) causal LMs on one folder."""
    folder = make_checkpoint("pow2")
    with warnings.catch_warnings(), _quiet():  # transformers' own notes on the conversion
        warnings.simplefilter("ignore")
        theirs = transformers.FlaxBloomForCausalLM.from_pretrained(folder, from_pt=True)
    return bloomlm.FlaxBloomForCausalLM.from_pretrained(folder), theirs, build_reference("pow2")


class _quiet:
    def __enter__(self):
        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("arch", ARCHS)
def test_surface_equals_transformers(arch):
    # transformers 4.37 has only the first two Flax BLOOM classes; its base class answers alike.
    ours, theirs = getattr(bloomlm, arch), getattr(transformers, arch, transformers.FlaxBloomModel)
    assert ours.main_input_name == theirs.main_input_name == "input_ids"
    assert ours.can_generate() == (arch == "FlaxBloomForCausalLM")
    assert ours.can_generate() == theirs.can_generate()
    model = ours(bloomlm.BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2))
    assert model.framework == "flax" and ours.config_class is bloomlm.BloomConfig
    assert (model.generation_config is None) == (not ours.can_generate())


@pytest.mark.parametrize("scan_layers", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(make_checkpoint, scan_layers):
    model = bloomlm.FlaxBloomForCausalLM.from_pretrained(
        make_checkpoint("pow2"), scan_layers=scan_layers
    )
    input_ids, mask = (t.numpy() for t in make_inputs(128, "left"))

    def loss(params):
        return model(input_ids, mask, params=params).logits.astype(jnp.float32).std()

    plain = jax.grad(loss)(model.params)
    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = jax.grad(loss)(model.params)
    leaves = list(zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(checkpointed)))
    assert len(leaves) > 10
    for a, b in leaves:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _theirs_flax(theirs, input_ids, mask, **kwargs) -> np.ndarray:
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")  # its default-max_length notice
        out = theirs.generate(input_ids, attention_mask=mask, pad_token_id=PAD_ID, **kwargs)
    return np.asarray(out.sequences)


def test_processors_equal_transformers_flax_generate(models):
    ours, theirs, _ = models
    input_ids, mask = (t.numpy() for t in make_inputs(128, seq=5))
    plain = np.asarray(ours.generate(input_ids, mask, max_new_tokens=8).sequences)
    first, repeated = int(plain[0, 5]), int(plain[1, 6])  # the first new token; one row 1 repeats
    cases = [  # several settings per call: each call compiles a loop in both libraries
        dict(min_length=6, eos_token_id=repeated),  # transformers' Flax bans eos at cur_len 6 too
        dict(forced_eos_token_id=[7, 9], eos_token_id=9, suppress_tokens=[first, repeated]),
        dict(begin_suppress_tokens=[first, 5], forced_decoder_ids=[[2, 9], [3, 11]]),
    ]
    for kwargs in cases:
        mine = np.asarray(ours.generate(input_ids, mask, max_new_tokens=8, **kwargs).sequences)
        np.testing.assert_array_equal(
            mine,
            _theirs_flax(theirs, input_ids, mask, max_new_tokens=8, **kwargs),
            err_msg=str(kwargs),
        )
        assert (mine != plain).any(), kwargs  # the setting changed the output
    one_token = input_ids[:, :1]
    kwargs = dict(max_new_tokens=4, forced_bos_token_id=5, begin_suppress_tokens=[6])
    mine = np.asarray(ours.generate(one_token, **kwargs).sequences)
    np.testing.assert_array_equal(mine, _theirs_flax(theirs, one_token, None, **kwargs))
    assert (mine[:, 1] == 5).all()


def test_min_length_counts_as_transformers_flax_one_more_than_pytorch(models):
    ours, _, reference = models
    input_ids, mask = make_inputs(128, seq=5)
    plain = np.asarray(ours.generate(input_ids.numpy(), mask.numpy(), max_new_tokens=8).sequences)
    eos = int(plain[1, 5])  # row 1's first new token
    kwargs = dict(max_new_tokens=8, eos_token_id=eos, min_length=5)
    with torch.no_grad():
        pytorch = reference.generate(input_ids, attention_mask=mask, **kwargs).numpy()
    assert pytorch[1, 5] == eos  # PyTorch: eos allowed once cur_len reaches min_length
    mine = np.asarray(ours.generate(input_ids.numpy(), mask.numpy(), **kwargs).sequences)
    assert mine[1, 5] != eos  # transformers' Flax rule: banned while cur_len <= min_length


@pytest.mark.parametrize("num_beams", [1, 3])
def test_ngram_blocking_and_beams_equal_pytorch_generate(models, num_beams):
    ours, _, reference = models
    input_ids, mask = make_inputs(128, "left", seq=5)
    plain = np.asarray(ours.generate(input_ids.numpy(), mask.numpy(), max_new_tokens=8).sequences)
    cases = [
        dict(no_repeat_ngram_size=2, num_return_sequences=2 if num_beams > 1 else 1),
        dict(no_repeat_ngram_size=1, suppress_tokens=[int(plain[0, 5])], forced_eos_token_id=7),
    ]
    for kwargs in cases:
        kwargs = dict(max_new_tokens=8, num_beams=num_beams, **kwargs)
        with torch.no_grad():
            theirs = reference.generate(input_ids, attention_mask=mask, **kwargs).numpy()
        mine = np.asarray(ours.generate(input_ids.numpy(), mask.numpy(), **kwargs).sequences)
        np.testing.assert_array_equal(mine[:, : theirs.shape[1]], theirs, err_msg=str(kwargs))
        assert mine.shape[0] == 3 * kwargs.get("num_return_sequences", 1)


def test_ngram_ban_function_on_a_drawn_case():
    """Sequence 5 6 7 5 6 so far (cur_len 5): with n = 3 the prefix (5, 6) was followed by 7."""
    sequences = jnp.array([[5, 6, 7, 5, 6, 0, 0]])
    scores = jnp.zeros((1, 10))
    banned = processors.ban_repeated_ngrams(sequences, scores, jnp.int32(5), 3)
    assert np.isinf(np.asarray(banned)).nonzero()[1].tolist() == [7]
    two = processors.ban_repeated_ngrams(sequences, scores, jnp.int32(5), 2)  # after 6: 7
    assert np.isinf(np.asarray(two)).nonzero()[1].tolist() == [7]
    early = processors.ban_repeated_ngrams(sequences, scores, jnp.int32(2), 3)
    assert not np.isinf(np.asarray(early)).any()


def test_flax_generate_refusals(models):
    ours, _, _ = models
    input_ids, mask = (t.numpy() for t in make_inputs(128, seq=5))
    with pytest.raises(ValueError, match="only from beam search"):
        ours.generate(input_ids, mask, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="min_length"):
        ours.generate(input_ids, mask, max_new_tokens=2, min_length=20)


def _dtypes(params) -> dict:
    return {path: leaf.dtype for path, leaf in flatten_dict(params).items()}


def test_casts_follow_a_mask_as_transformers_casts(models):
    """to_bf16/to_fp16/to_fp32 with a mask (transformers' example: keep the LayerNorms in
    float32) cast exactly the leaves transformers' own casts do, on the same tree."""
    ours, theirs, _ = models
    params = ours.params
    paths = flatten_dict(params)
    keep_norms = unflatten_dict(
        {path: not any("layernorm" in key or key == "ln_f" for key in path) for path in paths}
    )
    norm = ("transformer", "ln_f", "scale")
    block_norm = ("transformer", "h", "0", "input_layernorm", "bias")
    kernel = ("transformer", "h", "0", "mlp", "dense_h_to_4h", "kernel")
    for name, dtype in (("to_bf16", jnp.bfloat16), ("to_fp16", jnp.float16)):
        mine = _dtypes(getattr(ours, name)(params, keep_norms))
        assert mine == _dtypes(getattr(theirs, name)(params, keep_norms)), name
        assert mine[norm] == mine[block_norm] == jnp.float32 and mine[kernel] == dtype
        assert set(_dtypes(getattr(ours, name)(params)).values()) == {jnp.dtype(dtype)}
    half = ours.to_bf16(params)
    back = _dtypes(ours.to_fp32(half, keep_norms))
    assert back == _dtypes(theirs.to_fp32(half, keep_norms))
    assert back[norm] == back[block_norm] == jnp.bfloat16 and back[kernel] == jnp.float32
    assert ours.params["transformer"]["ln_f"]["scale"].dtype == jnp.float32  # copies only


def test_init_weights_makes_only_the_leaves_missing_from_params(models):
    """init_weights(rng, input_shape, params): the given leaves kept as they are, the missing
    ones new as transformers initialises them (zero biases, unit LayerNorm scales, normal
    kernels with the config's initializer_range)."""
    ours, _, _ = models
    given = flatten_dict(ours.params)
    bias, scale = ("transformer", "ln_f", "bias"), ("transformer", "ln_f", "scale")
    kernel = ("transformer", "h", "1", "mlp", "dense_4h_to_h", "kernel")
    partial = {path: leaf for path, leaf in given.items() if path not in (bias, scale, kernel)}
    filled = flatten_dict(ours.init_weights(jax.random.PRNGKey(0), (1, 1), unflatten_dict(partial)))
    assert filled.keys() == given.keys()
    assert all(np.array_equal(filled[path], leaf) for path, leaf in partial.items())
    assert not np.asarray(filled[bias]).any() and (np.asarray(filled[scale]) == 1).all()
    new = np.asarray(filled[kernel])
    assert new.shape == given[kernel].shape and not np.array_equal(new, given[kernel])
    assert abs(new.std() - ours.config.initializer_range) < 0.2 * ours.config.initializer_range
    fresh = flatten_dict(ours.init_weights(jax.random.PRNGKey(0), (1, 1)))
    assert np.array_equal(fresh[kernel], new)  # the same rng gives the same fresh leaves

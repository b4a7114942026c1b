"""Flax generation: the loop on a fake model (no weights), the sampling filters against
transformers' warpers, and greedy / beam ids against transformers' PyTorch `generate` on a tiny
checkpoint."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import bloomlm
from bloomlm.flax import generate as flax_generate
from bloomlm.generation import GENERATION_CONFIG_NAME, GenerationConfig
from conftest import PAD_ID, build_reference, make_inputs


def test_sample_loop_with_a_fake_model():
    """The fake model's next token is always last + 1:
    the loop must write 5, 6, 7, ... and stop at eos."""
    vocab = 16

    def tokens_to_logits(tokens, cache):
        return jax.nn.one_hot(tokens[:, -1] + 1, vocab) * 10.0, cache + 1

    def greedy(scores, key):
        return jnp.argmax(scores, axis=-1)

    prompt = jnp.array([[3, 4], [9, 10]])
    eos, pad, key = jnp.array([12]), jnp.int32(0), jax.random.PRNGKey(0)
    run = jax.jit(
        lambda: flax_generate.sample_loop(
            tokens_to_logits, prompt, jnp.int32(0), 7, eos, pad, greedy, key
        )
    )
    sequences = np.asarray(run())
    # Row 1 reaches eos (12) and is padded with 0 from then on.
    np.testing.assert_array_equal(sequences, [[3, 4, 5, 6, 7, 8, 9], [9, 10, 11, 12, 0, 0, 0]])


def test_filters_equal_transformers_warpers():
    scores = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    for top_k in (1, 5, 50):
        ours = flax_generate.top_k_filter(jnp.asarray(scores), top_k)
        ref = TopKLogitsWarper(top_k)(None, torch.from_numpy(scores))
        np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    np.testing.assert_array_equal(
        np.asarray(flax_generate.top_k_filter(jnp.asarray(scores), 0)), scores
    )
    for top_p in (0.05, 0.5, 0.9, 1.0):
        ours = flax_generate.top_p_filter(jnp.asarray(scores), top_p)
        ref = TopPLogitsWarper(top_p)(None, torch.from_numpy(scores))
        np.testing.assert_array_equal(
            np.isinf(np.asarray(ours)), np.isinf(ref.numpy()), err_msg=str(top_p)
        )
        assert np.isinf(np.asarray(ours)).any() == (top_p < 1.0)  # something was filtered


@pytest.fixture(scope="module")
def pair(make_checkpoint):
    folder = make_checkpoint("pow2")
    return bloomlm.FlaxBloomForCausalLM.from_pretrained(folder), build_reference("pow2")


def assert_same_ids(ours, theirs: torch.Tensor, pad: int = PAD_ID) -> None:
    """transformers stops when every row is done; ours always fills max_length with padding."""
    ours, theirs = np.asarray(ours), theirs.numpy()
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1] :] == pad).all()


def test_greedy_equals_pytorch_generate(pair):
    ours, ref = pair
    input_ids, mask = make_inputs(ref.config.vocab_size, "left", seq=5)
    plain = ours.generate(input_ids.numpy(), mask.numpy(), max_new_tokens=8).sequences
    eos = int(
        np.bincount(np.asarray(plain)[1, 5:]).argmax()
    )  # a token row 1 repeats: it stops early
    for eos_token_id in (None, eos):
        with torch.no_grad():
            theirs = ref.generate(
                input_ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos_token_id
            )
        out = ours.generate(
            input_ids.numpy(), mask.numpy(), max_new_tokens=8, eos_token_id=eos_token_id
        )
        assert isinstance(out, flax_generate.FlaxGreedySearchOutput) and out.sequences.shape == (
            3,
            13,
        )
        assert_same_ids(out.sequences, theirs)
    assert (np.asarray(out.sequences)[1, 5:] == eos).sum() == 1  # padded after its eos


def test_beam_search_equals_pytorch_generate(pair):
    """Two rows whose eos tokens come early: hypotheses finish, rows finish,
    the loop stops early."""
    ours, ref = pair
    input_ids, mask = make_inputs(ref.config.vocab_size, "left", seq=5, batch=4)
    greedy = np.asarray(ours.generate(input_ids.numpy(), mask.numpy(), max_new_tokens=8).sequences)
    rows = slice(1, 3)
    eos = [int(np.bincount(greedy[row, 5:]).argmax()) for row in (1, 2)]
    for early_stopping in (True, False):
        kwargs = dict(
            max_new_tokens=8, num_beams=2, eos_token_id=eos, early_stopping=early_stopping
        )
        with torch.no_grad():
            theirs = ref.generate(input_ids[rows], attention_mask=mask[rows], **kwargs)
        out = ours.generate(input_ids[rows].numpy(), mask[rows].numpy(), **kwargs)
        assert isinstance(out, flax_generate.FlaxBeamSearchOutput)
        assert_same_ids(out.sequences, theirs)
        if early_stopping:
            assert theirs.shape[1] < 13  # the case really stopped before max_length


def test_sampling(pair):
    ours, _ = pair
    input_ids, mask = (t.numpy() for t in make_inputs(ours.config.vocab_size, "left", seq=5))
    greedy = ours.generate(input_ids, mask, max_new_tokens=6).sequences

    def sample(seed, **kwargs):
        key = jax.random.PRNGKey(seed)
        out = ours.generate(
            input_ids, mask, max_new_tokens=6, do_sample=True, prng_key=key, **kwargs
        )
        assert isinstance(out, flax_generate.FlaxSampleOutput)
        return np.asarray(out.sequences)

    np.testing.assert_array_equal(sample(0, top_k=1), greedy)  # one candidate left: greedy
    np.testing.assert_array_equal(
        sample(1, top_p=1e-6, top_k=0), greedy
    )  # the nucleus is the argmax
    free = dict(top_k=0, temperature=2.0)
    np.testing.assert_array_equal(sample(3, **free), sample(3, **free))  # the key decides
    assert (sample(3, **free) != sample(4, **free)).any()
    assert (sample(3, **free)[:, 5:] != np.asarray(greedy)[:, 5:]).any()
    np.testing.assert_array_equal(sample(3, **free)[:, :5], input_ids)


def test_generate_bad_arguments(pair):
    ours, _ = pair
    input_ids, mask = (t.numpy() for t in make_inputs(ours.config.vocab_size, seq=5))
    with pytest.raises(ValueError, match="leaves no room after the prompt"):
        ours.generate(input_ids, mask, max_length=5)
    with pytest.raises(ValueError, match=r"does not implement \['repetition_penalty'\]"):
        ours.generate(input_ids, mask, max_new_tokens=2, repetition_penalty=1.3)
    with pytest.raises(ValueError, match="beam sampling"):
        ours.generate(input_ids, mask, max_new_tokens=2, num_beams=2, do_sample=True)
    with pytest.raises(TypeError, match="not_an_option"):
        ours.generate(input_ids, mask, max_new_tokens=2, not_an_option=1)
    bad = input_ids.copy()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.generate(bad, mask, max_new_tokens=2)


def test_from_pretrained_gives_generating_models_the_folder_generation_config(
    make_checkpoint, tmp_path
):
    shutil.copytree(make_checkpoint("pow2"), tmp_path / "with")
    GenerationConfig(eos_token_id=[2, 7], max_new_tokens=5).save_pretrained(tmp_path / "with")
    loaded = bloomlm.FlaxBloomForCausalLM.from_pretrained(tmp_path / "with").generation_config
    assert (loaded.eos_token_id, loaded.max_new_tokens) == ([2, 7], 5)
    other = bloomlm.FlaxBloomForTokenClassification.from_pretrained(tmp_path / "with")
    assert other.generation_config is None  # as transformers: only generating models have one

    shutil.copytree(make_checkpoint("pow2"), tmp_path / "without")
    (tmp_path / "without" / GENERATION_CONFIG_NAME).unlink(missing_ok=True)
    model = bloomlm.FlaxBloomForCausalLM.from_pretrained(tmp_path / "without")
    assert model.generation_config == GenerationConfig.from_model_config(model.config)
    assert model.generation_config.max_new_tokens is None

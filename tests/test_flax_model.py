"""bloomlm's Flax classes against bloomlm's PyTorch classes on the same transformers-written
folders.

Every Flax class x tiny config, jitted as users jit it: left-padded and unpadded batches with hidden
states and attentions, tuple outputs, cached decoding (past + new masks and full-length masks) equal
to the full forward, scanned layers equal to unscanned ones, bf16 within a measured bound, and bad
input. Compiles are the expensive part here: each test reuses one jitted function per model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bloomlm
from conftest import assert_close, make_inputs

FLAX_TOL = 1e-4  # SPEC: Flax fp32 against our PyTorch fp32
# Flax in bfloat16 against our PyTorch in fp32, max|diff| / max(1, max|ref|) over the logits.
# Measured on pow2 / odd_heads / post_ln: 1.9e-2 / 1.3e-2 / 1.8e-2 computing in bf16 with fp32
# parameters, 1.6e-2 / 1.7e-2 / 1.5e-2 with bf16 parameters; our PyTorch bf16 gives
# 1.9e-2 / 1.6e-2 / 1.3e-2. A wrong mask or ALiBi gives O(1) differences.
FLAX_BF16_TOL = 4e-2
FLAX_FP16_TOL = (
    5e-3  # float16 computation and parameters; measured 2.1e-3 (pow2), 1.5e-3 (odd_heads)
)

ARCHS = (
    "BloomModel",
    "BloomForCausalLM",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
)
MAIN_FIELDS = {
    "BloomModel": ("last_hidden_state",),
    "BloomForCausalLM": ("logits",),
    "BloomForSequenceClassification": ("logits",),
    "BloomForTokenClassification": ("logits",),
    "BloomForQuestionAnswering": ("start_logits", "end_logits"),
}
CASES = [("pow2", arch) for arch in ARCHS] + [
    ("odd_heads", "BloomModel"),
    ("odd_heads", "BloomForCausalLM"),
    ("post_ln", "BloomForCausalLM"),
    ("untied", "BloomForCausalLM"),
]


def as_torch(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


def jitted(model):
    """What a user writes: one jit over the call, parameters as an argument."""

    def forward(params, input_ids, attention_mask):
        return model(
            input_ids,
            attention_mask,
            params=params,
            output_hidden_states=True,
            output_attentions=True,
        )

    return jax.jit(forward)


@pytest.fixture(scope="session")
def flax_pair(make_checkpoint):
    """`(config_name, arch, **flax_kwargs) -> (flax model, its jitted forward, PyTorch model)`,
    cached."""
    cache = {}

    def load(config_name: str, arch: str, **flax_kwargs):
        key = (config_name, arch, repr(sorted(flax_kwargs.items())))
        if key not in cache:
            folder = make_checkpoint(config_name, arch)
            ours_torch = getattr(bloomlm, arch).from_pretrained(folder).eval()
            ours_flax = getattr(bloomlm, "Flax" + arch).from_pretrained(folder, **flax_kwargs)
            cache[key] = (ours_flax, jitted(ours_flax), ours_torch)
        return cache[key]

    return load


def torch_forward(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(
            input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            output_attentions=True,
        )


def compare(
    flax_out, torch_out, arch: str, mask: torch.Tensor, tol: float = FLAX_TOL, check_dtype=True
) -> int:
    """Main fields, every hidden state and every attention map; padding positions excluded."""
    checked = 0
    for field in MAIN_FIELDS[arch]:
        per_token = arch != "BloomForSequenceClassification"
        ours = as_torch(getattr(flax_out, field))
        assert_close(
            ours, getattr(torch_out, field).float(), tol, mask if per_token else None, name=field
        )
        checked += 1
    assert len(flax_out.hidden_states) == len(torch_out.hidden_states)
    for i, (ours, ref) in enumerate(zip(flax_out.hidden_states, torch_out.hidden_states)):
        assert_close(as_torch(ours), ref.float(), tol, mask, name=f"hidden_states[{i}]")
        checked += 1
    assert len(flax_out.attentions) == len(torch_out.attentions)
    for i, (ours, ref) in enumerate(zip(flax_out.attentions, torch_out.attentions)):
        assert_close(
            as_torch(ours), ref.float(), tol, mask.bool()[:, None, :, None], name=f"attentions[{i}]"
        )
        checked += 1
    return checked


@pytest.mark.parametrize("config_name, arch", CASES)
def test_flax_equals_torch(flax_pair, config_name, arch):
    flax_model, forward, torch_model = flax_pair(config_name, arch)
    vocab = flax_model.config.vocab_size
    for padding in ("left", "none"):
        input_ids, mask = make_inputs(vocab, padding)
        flax_out = forward(flax_model.params, input_ids.numpy(), mask.numpy())
        torch_out = torch_forward(torch_model, input_ids, mask)
        assert (
            compare(flax_out, torch_out, arch, mask)
            == len(MAIN_FIELDS[arch]) + 2 * flax_model.config.n_layer + 1
        )


def test_sequence_classification_pools_last_real_token(flax_pair):
    flax_model, forward, torch_model = flax_pair("pow2", "BloomForSequenceClassification")
    input_ids, mask = make_inputs(flax_model.config.vocab_size, "right")
    flax_logits = forward(flax_model.params, input_ids.numpy(), mask.numpy()).logits
    assert_close(
        as_torch(flax_logits), torch_forward(torch_model, input_ids, mask).logits, FLAX_TOL
    )
    # Row 1 keeps 5 tokens: its logits are those of the token at index 4 and of no other.
    per_token = forward(flax_model.params, input_ids.numpy(), mask.numpy()).hidden_states[-1]
    score = np.asarray(flax_model.params["score"]["kernel"])
    np.testing.assert_allclose(
        np.asarray(flax_logits)[1], np.asarray(per_token)[1, 4] @ score, rtol=1e-5, atol=1e-5
    )


def test_tuple_outputs_keep_hidden_states(flax_pair):
    flax_model, _, _ = flax_pair("pow2", "BloomForCausalLM")
    input_ids, mask = make_inputs(flax_model.config.vocab_size, "left")
    as_dict = flax_model(
        input_ids.numpy(), mask.numpy(), output_hidden_states=True, output_attentions=True
    )
    as_tuple = flax_model(
        input_ids.numpy(),
        mask.numpy(),
        output_hidden_states=True,
        output_attentions=True,
        return_dict=False,
    )
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3  # logits, hidden_states, attentions
    np.testing.assert_array_equal(as_tuple[0], as_dict.logits)
    assert len(as_tuple[1]) == flax_model.config.n_layer + 1
    np.testing.assert_array_equal(as_tuple[1][-1], as_dict["hidden_states"][-1])
    assert as_dict.keys() == ["logits", "hidden_states", "attentions"]
    logits_only = flax_model(input_ids.numpy(), mask.numpy(), return_dict=False)
    assert len(logits_only) == 1


@pytest.mark.parametrize("config_name", ["pow2", "odd_heads"])
def test_cached_decoding_equals_full_forward(flax_pair, config_name):
    """Prefill 4 tokens, then decode one at a time, with both mask forms;
    left-padded rows included."""
    flax_model, forward, _ = flax_pair(config_name, "BloomForCausalLM")
    input_ids, mask = (t.numpy() for t in make_inputs(flax_model.config.vocab_size, "left", seq=7))
    full = np.asarray(forward(flax_model.params, input_ids, mask).logits)
    max_length = 9
    cache = flax_model.init_cache(input_ids.shape[0], max_length)
    out = flax_model(input_ids[:, :4], mask[:, :4], past_key_values=cache)  # past + new mask
    logits = [np.asarray(out.logits)]
    out = flax_model(input_ids[:, 4:5], mask[:, :5], past_key_values=out.past_key_values)
    logits.append(np.asarray(out.logits))
    full_mask = np.ones(
        (mask.shape[0], max_length), mask.dtype
    )  # transformers' generate builds this one
    full_mask[:, :7] = mask
    for t in (5, 6):
        out = flax_model(input_ids[:, t : t + 1], full_mask, past_key_values=out.past_key_values)
        logits.append(np.asarray(out.logits))
    assert int(out.past_key_values["transformer"]["h"]["0"]["self_attention"]["cache_index"]) == 7
    assert_close(
        as_torch(np.concatenate(logits, axis=1)), as_torch(full), FLAX_TOL, torch.from_numpy(mask)
    )


def test_base_model_cache_matches_torch_cache(flax_pair):
    """The keys and values written to the cache are those of our PyTorch cache (layout aside)."""
    flax_model, _, torch_model = flax_pair("odd_heads", "BloomModel")
    input_ids, mask = make_inputs(flax_model.config.vocab_size, "left", seq=5)
    out = flax_model(input_ids.numpy(), mask.numpy(), past_key_values=flax_model.init_cache(3, 6))
    with torch.no_grad():
        ref = torch_model(input_ids, attention_mask=mask, use_cache=True).past_key_values
    batch, heads, dim = 3, flax_model.config.n_head, flax_model.config.head_dim
    kept = mask.bool().repeat_interleave(
        heads, dim=0
    )  # [B*H, S]: padded slots hold garbage in both
    for layer, (ref_key, ref_value) in enumerate(ref):
        cache = out.past_key_values["h"][str(layer)]["self_attention"]
        key = np.asarray(cache["cached_key"])[:, :5]  # [B, S, H, D]; slot 5 is still empty
        key = key.transpose(0, 2, 3, 1).reshape(batch * heads, dim, 5)
        assert_close(as_torch(key), ref_key, FLAX_TOL, kept[:, None, :], name=f"key {layer}")
        value = (
            np.asarray(cache["cached_value"])[:, :5]
            .transpose(0, 2, 1, 3)
            .reshape(batch * heads, 5, dim)
        )
        assert_close(as_torch(value), ref_value, FLAX_TOL, kept, name=f"value {layer}")
        assert not np.asarray(cache["cached_key"])[:, 5].any()


def test_bf16_within_measured_bound(flax_pair):
    flax_model, forward, torch_model = flax_pair("pow2", "BloomForCausalLM", dtype=jnp.bfloat16)
    input_ids, mask = make_inputs(flax_model.config.vocab_size, "left")
    out = forward(flax_model.params, input_ids.numpy(), mask.numpy())
    assert out.logits.dtype == jnp.bfloat16
    assert out.attentions[0].dtype == jnp.bfloat16
    ref = torch_forward(torch_model, input_ids, mask).logits
    assert_close(as_torch(out.logits), ref, FLAX_BF16_TOL, mask, name="bf16 logits")
    # bf16 parameters too (to_bf16), still within the bound; and the cast is a copy, float leaves
    # only.
    params = flax_model.to_bf16()
    assert params["transformer"]["ln_f"]["scale"].dtype == jnp.bfloat16
    assert flax_model.params["transformer"]["ln_f"]["scale"].dtype == jnp.float32
    out = forward(params, input_ids.numpy(), mask.numpy())
    assert_close(as_torch(out.logits), ref, FLAX_BF16_TOL, mask, name="bf16 params logits")
    assert flax_model.to_fp32(params)["transformer"]["ln_f"]["scale"].dtype == jnp.float32


def test_fp16_within_measured_bound(flax_pair):
    flax_model, forward, torch_model = flax_pair("pow2", "BloomForCausalLM", dtype=jnp.float16)
    input_ids, mask = make_inputs(flax_model.config.vocab_size, "left")
    out = forward(flax_model.to_fp16(), input_ids.numpy(), mask.numpy())
    assert out.logits.dtype == jnp.float16
    ref = torch_forward(torch_model, input_ids, mask).logits
    assert_close(as_torch(out.logits), ref, FLAX_FP16_TOL, mask, name="fp16 logits")


def test_scan_layers_equals_unscanned(flax_pair, tmp_path):
    plain, plain_forward, _ = flax_pair("odd_heads", "BloomForCausalLM")
    scanned, scanned_forward, _ = flax_pair("odd_heads", "BloomForCausalLM", scan_layers=True)
    n_layer = plain.config.n_layer
    assert (
        scanned.params["transformer"]["h"]["self_attention"]["dense"]["kernel"].shape[0] == n_layer
    )
    input_ids, mask = (t.numpy() for t in make_inputs(plain.config.vocab_size, "left"))
    ours, ref = (
        scanned_forward(scanned.params, input_ids, mask),
        plain_forward(plain.params, input_ids, mask),
    )
    assert len(ours.hidden_states) == n_layer + 1 and len(ours.attentions) == n_layer
    pairs = [
        (ours.logits, ref.logits),
        *zip(ours.hidden_states, ref.hidden_states),
        *zip(ours.attentions, ref.attentions),
    ]
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Cached decoding with the stacked cache; a transformers-layout cache is accepted and given back
    # as such.
    cache = scanned.init_cache(3, 8)
    assert cache["transformer"]["h"]["self_attention"]["cached_key"].shape[0] == n_layer
    step = scanned(input_ids[:, :6], mask[:, :6], past_key_values=cache)
    step = scanned(input_ids[:, 6:], mask, past_key_values=step.past_key_values)
    np.testing.assert_allclose(step.logits[:, 0], ref.logits[:, 6], rtol=1e-5, atol=1e-5)
    unstacked = plain(
        input_ids[:, :6], mask[:, :6], past_key_values=plain.init_cache(3, 8)
    ).past_key_values
    step = scanned(input_ids[:, 6:], mask, past_key_values=unstacked)
    assert "0" in step.past_key_values["transformer"]["h"]
    np.testing.assert_allclose(step.logits[:, 0], ref.logits[:, 6], rtol=1e-5, atol=1e-5)
    # save_pretrained writes transformers' tree; an unscanned model reads it back bit for bit.
    scanned.save_pretrained(tmp_path)
    reread = bloomlm.FlaxBloomForCausalLM.from_pretrained(tmp_path)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(np.array_equal, reread.params, plain.params)
    )


def test_dropout_needs_rng_and_changes_outputs(make_checkpoint):
    folder = make_checkpoint("pow2", "BloomForTokenClassification")
    model = bloomlm.FlaxBloomForTokenClassification.from_pretrained(
        folder, hidden_dropout=0.5, attention_dropout=0.3
    )
    input_ids, mask = (t.numpy() for t in make_inputs(model.config.vocab_size))
    with pytest.raises(ValueError, match="dropout_rng"):
        model(input_ids, mask, train=True)
    eval_logits = model(input_ids, mask).logits
    np.testing.assert_array_equal(eval_logits, model(input_ids, mask).logits)
    first = model(input_ids, mask, train=True, dropout_rng=jax.random.PRNGKey(0)).logits
    again = model(input_ids, mask, train=True, dropout_rng=jax.random.PRNGKey(0)).logits
    other = model(input_ids, mask, train=True, dropout_rng=jax.random.PRNGKey(1)).logits
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first) - np.asarray(eval_logits)).max() > 0.1
    assert np.abs(np.asarray(first) - np.asarray(other)).max() > 0.1


# ---------------------------------------------------------------------------------------------
# Bad input: concrete arrays are checked at the boundary; under a user's jit, NaN marks the damage.


def test_bad_input_raises_value_error(flax_pair):
    model, _, _ = flax_pair("pow2", "BloomForCausalLM")
    vocab = model.config.vocab_size
    input_ids, mask = (t.numpy() for t in make_inputs(vocab, "left"))
    bad_ids = input_ids.copy()
    bad_ids[1, 3] = vocab
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 128\): \[128\]"):
        model(bad_ids, mask)
    bad_ids[1, 3] = -1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(bad_ids, mask)
    with pytest.raises(ValueError, match="integer token ids"):
        model(input_ids.astype(np.float32), mask)
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        model(input_ids[0], mask)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 6\); allowed: \[3, 7\]"):
        model(input_ids, mask[:, :6])
    with pytest.raises(ValueError, match="only 0"):
        model(input_ids, mask * 2)
    cache = model.init_cache(3, 8)
    with pytest.raises(
        ValueError, match="cache is too short: it holds 0 positions of 8 and 9 new tokens"
    ):
        model(np.concatenate([input_ids, input_ids[:, :2]], axis=1), None, past_key_values=cache)
    with pytest.raises(
        ValueError,
        match=r"attention_mask has shape \(3, 5\); allowed: \[3, past \+ new\] = \[3, 7\]",
    ):
        model(input_ids, mask[:, :5], past_key_values=cache)
    with pytest.raises(ValueError, match=r"\[batch=2, max_length"):
        model(input_ids[:2], mask[:2], past_key_values=cache)
    with pytest.raises(ValueError, match="cache for 2 layers"):
        model(
            input_ids,
            mask,
            past_key_values={"transformer": {"h": {"0": cache["transformer"]["h"]["0"]}}},
        )
    with pytest.raises(ValueError, match="init_cache"):
        model(input_ids, mask, past_key_values=cache["transformer"])


def test_under_jit_out_of_vocab_ids_give_nan_rows(flax_pair):
    model, forward, _ = flax_pair("pow2", "BloomForCausalLM")
    input_ids, mask = (t.numpy() for t in make_inputs(model.config.vocab_size, "left"))
    input_ids[2, 6] = model.config.vocab_size + 5
    logits = np.asarray(forward(model.params, input_ids, mask).logits)
    assert np.isnan(logits[2, 6]).all()
    assert np.isfinite(logits[:2]).all()  # other rows untouched


def test_under_jit_overfull_cache_gives_nan(flax_pair):
    model, _, _ = flax_pair("pow2", "BloomForCausalLM")
    input_ids, _ = (t.numpy() for t in make_inputs(model.config.vocab_size, seq=3))

    @jax.jit
    def two_steps(params, cache):
        cache = model(input_ids, params=params, past_key_values=cache).past_key_values
        return model(input_ids, params=params, past_key_values=cache).logits

    assert np.isfinite(two_steps(model.params, model.init_cache(3, 6))).all()
    assert np.isnan(two_steps(model.params, model.init_cache(3, 5))).all()


def test_import_bloomlm_does_not_import_jax():
    import subprocess
    import sys

    code = (
        "import sys, bloomlm; bloomlm.BloomConfig; "
        "assert 'jax' not in sys.modules and 'flax' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

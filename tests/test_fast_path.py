"""The fused inference path (SDPA + one additive bias, preallocated in-place cache, last-position logits)
gives the eager path's numbers."""

import pytest
import torch

from bloomlm import BloomConfig, BloomForCausalLM
from bloomlm.torch.model import StaticCache

TOL = 1e-5


def close(ours, ref, mask=None):
    diff = (ours - ref).abs()
    if mask is not None:
        diff = diff[mask]
    assert diff.max().item() <= TOL * max(1.0, ref.abs().max().item()), diff.max().item()


@pytest.fixture(scope="module", params=[3, 4], ids=["3-heads", "4-heads"])
def model(request):
    torch.manual_seed(request.param)
    config = BloomConfig(vocab_size=90, hidden_size=12 * request.param, n_layer=3, n_head=request.param,
                         pad_token_id=3)  # fmt: skip
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    ids = torch.randint(4, 90, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


def test_fused_equals_eager(model, batch):
    ids, mask = batch
    with torch.no_grad():  # the fused path is the one for inference
        fused = model(ids, attention_mask=mask)
    eager = model(
        ids, attention_mask=mask
    )  # autograd recording: the eager path, transformers' gradients
    keep = mask.bool()
    close(fused.logits, eager.logits, keep)
    for (kf, vf), (ke, ve) in zip(fused.past_key_values, eager.past_key_values):
        close(kf, ke)
        close(vf, ve)


@pytest.mark.parametrize("grad", [False, True], ids=["fused", "eager"])
def test_static_cache_decoding_equals_full_forward(model, batch, grad):
    torch.set_grad_enabled(grad)
    try:
        _check_static_cache_decoding(model, batch)
    finally:
        torch.set_grad_enabled(True)


def _check_static_cache_decoding(model, batch):
    ids, mask = batch
    full = model(ids, attention_mask=mask).logits
    cache = model._new_static_cache(3, 16)
    assert cache.keys.data_ptr() == cache.keys.data_ptr()
    storage = cache.keys.data_ptr()
    prefix = model(
        ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache, num_logits_to_keep=1
    )
    assert (
        prefix.logits.shape == (3, 1, 90) and prefix.past_key_values is cache and cache.length == 5
    )
    close(prefix.logits[:, -1], full[:, 4])
    for t in range(5, 9):
        step = model(
            ids[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
            past_key_values=cache,
            num_logits_to_keep=1,
        )
        close(step.logits[:, -1], full[:, t])
    assert (
        cache.length == 9 and cache.keys.data_ptr() == storage
    )  # written in place, never reallocated
    # Padding positions are excluded: their (unused) states depend on how many keys a fully masked query
    # saw, which differs between one pass and token-by-token, in transformers as here.
    legacy = model(ids, attention_mask=mask).past_key_values
    kept = mask.bool().repeat_interleave(model.config.n_head, dim=0)  # (B*H, S)
    for (ks, vs), (kl, vl) in zip(cache.to_legacy(), legacy):
        close(ks.transpose(1, 2), kl.transpose(1, 2), kept)
        close(vs, vl, kept)


def test_tuple_cache_converts_to_static_and_back(model, batch):
    ids, mask = batch
    past = model(ids[:, :6], attention_mask=mask[:, :6]).past_key_values
    cache = StaticCache.from_legacy(model.config, past, max_length=12)
    a = model(ids[:, 6:], attention_mask=mask, past_key_values=cache).logits
    b = model(ids[:, 6:], attention_mask=mask, past_key_values=past).logits
    close(a, b)


def test_static_cache_reorder_and_bounds(model, batch):
    ids, mask = batch
    cache = model._new_static_cache(3, 9)
    model(ids, attention_mask=mask, past_key_values=cache)
    before = cache.keys.clone()
    cache.reorder_(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.keys[:, 0], before[:, 2]) and torch.equal(
        cache.keys[:, 2], before[:, 0]
    )
    with pytest.raises(ValueError, match="do not fit"):
        model(ids[:, :1], attention_mask=torch.ones(3, 10), past_key_values=cache)
    with pytest.raises(ValueError, match="batch size 3"):
        model(ids[:2, :1], past_key_values=model._new_static_cache(3, 4))


def test_logits_to_keep_refuses_labels(model, batch):
    ids, _ = batch
    with pytest.raises(ValueError, match="num_logits_to_keep"):
        model(ids, labels=ids, num_logits_to_keep=1)

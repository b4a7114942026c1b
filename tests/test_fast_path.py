"""The fused inference path (SDPA + one additive bias, preallocated in-place KV cache, last-position
logits) gives the eager path's numbers; the attention path is chosen by one named function."""

import pytest
import torch

from bloomlm import BloomConfig, BloomForCausalLM
from bloomlm.torch.cache import KVCache
from bloomlm.torch.model import attention_implementation

TOL = 1e-5


def close(ours, ref, mask=None):
    diff = (ours - ref).abs()
    if mask is not None:
        diff = diff[mask]
    assert diff.max().item() <= TOL * max(1.0, ref.abs().max().item()), diff.max().item()


@pytest.fixture(scope="module", params=[3, 4], ids=["3-heads", "4-heads"])
def model(request):
    torch.manual_seed(request.param)
    config = BloomConfig(vocab_size=90, hidden_size=12 * request.param, n_layer=3,
                         n_head=request.param, pad_token_id=3)  # fmt: skip
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.fixture
def path(model):
    """Set the attention path of `model` for one test: path("eager") / path("sdpa")."""

    def set_path(name):
        model.config._attn_implementation = name

    yield set_path
    model.config._attn_implementation = None


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    ids = torch.randint(4, 90, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


def test_attention_implementation_is_one_function():
    assert attention_implementation(None, False, None, training=False) == "sdpa"
    assert attention_implementation(None, False, None, training=True) == "eager"
    assert attention_implementation("sdpa", False, None, training=True) == "sdpa"
    assert attention_implementation("eager", False, None, training=False) == "eager"
    assert attention_implementation("sdpa", True, None, training=False) == "eager"  # probabilities
    assert attention_implementation(None, False, torch.ones(2), training=False) == "eager"


def test_attn_implementation_is_read_per_call_not_from_grad_mode(model, batch, path, monkeypatch):
    ids, mask = batch
    used = []
    original = type(model.transformer.h[0].self_attention)._attend_eager
    monkeypatch.setattr(type(model.transformer.h[0].self_attention), "_attend_eager",
                        lambda *a: used.append("eager") or original(*a))  # fmt: skip
    model(ids, attention_mask=mask)  # autograd recording, eval mode: the fused path
    assert used == []
    path("eager")
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert len(used) == model.config.n_layer


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_fused_equals_eager(model, batch, path, grad):
    ids, mask = batch
    with torch.set_grad_enabled(grad):
        path("sdpa")
        fused = model(ids, attention_mask=mask)
        path("eager")
        eager = model(ids, attention_mask=mask)
    keep = mask.bool()
    close(fused.logits, eager.logits, keep)
    for (kf, vf), (ke, ve) in zip(fused.past_key_values, eager.past_key_values):
        close(kf, ke)
        close(vf, ve)


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_kv_cache_decoding_equals_full_forward(model, batch, path, name):
    path(name)
    with torch.no_grad():
        _check_kv_cache_decoding(model, batch)


def _check_kv_cache_decoding(model, batch):
    ids, mask = batch
    full = model(ids, attention_mask=mask).logits
    cache = KVCache.for_config(model.config, 3, 16, model.dtype)
    storage = cache.keys.data_ptr()
    prefix = model(
        ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache, num_logits_to_keep=1
    )
    assert prefix.logits.shape == (3, 1, 90) and prefix.past_key_values is cache
    assert cache.lengths == [5, 5, 5]
    close(prefix.logits[:, -1], full[:, 4])
    for t in range(5, 9):
        step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                     num_logits_to_keep=1)  # fmt: skip
        close(step.logits[:, -1], full[:, t])
    assert cache.lengths == [9] * 3 and cache.keys.data_ptr() == storage  # written in place
    # Padding positions are excluded: their (unused) states depend on how many keys a fully masked
    # query saw, which differs between one pass and token-by-token, in transformers as here.
    legacy = model(ids, attention_mask=mask).past_key_values
    kept = mask.bool().repeat_interleave(model.config.n_head, dim=0)  # (B*H, S)
    for (ks, vs), (kl, vl) in zip(cache.to_legacy(), legacy):
        close(ks.transpose(1, 2), kl.transpose(1, 2), kept)
        close(vs, vl, kept)


def test_tuple_cache_converts_to_kv_cache_and_back(model, batch):
    ids, mask = batch
    with torch.no_grad():
        past = model(ids[:, :6], attention_mask=mask[:, :6]).past_key_values
        cache = KVCache.from_legacy(past, mask[:, :6], model.config.n_head, capacity=12)
        for (k, v), (k2, v2) in zip(past, cache.to_legacy()):
            assert torch.equal(k, k2) and torch.equal(v, v2)
        a = model(ids[:, 6:], attention_mask=mask, past_key_values=cache).logits
        b = model(ids[:, 6:], attention_mask=mask, past_key_values=past).logits
    close(a, b)


def test_kv_cache_reorder_and_bounds(model, batch):
    ids, mask = batch
    cache = KVCache.for_config(model.config, 3, 9, model.dtype)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    before, valid = cache.keys.clone(), cache.valid.clone()
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.keys[:, 0], before[:, 2]) and torch.equal(
        cache.keys[:, 2], before[:, 0]
    )
    assert torch.equal(cache.valid[0], valid[2]) and torch.equal(cache.valid[2], valid[0])
    with pytest.raises(ValueError, match="do not fit"):
        model(ids[:, :1], attention_mask=torch.ones(3, 10), past_key_values=cache)
    with pytest.raises(ValueError, match="batch size 2"):
        model(ids[:2, :1], past_key_values=KVCache.for_config(model.config, 3, 4, model.dtype))


def test_logits_to_keep_refuses_labels(model, batch):
    ids, _ = batch
    with pytest.raises(ValueError, match="num_logits_to_keep"):
        model(ids, labels=ids, num_logits_to_keep=1)

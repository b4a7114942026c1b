"""The decoding engine (torch/engine.py, torch/cache.py): the step protocol against full forward
passes, and what `generate` does through it (last-position logits, no per-step growth, KV buckets,
usable length, per-row generators), and the training path's gradients against transformers."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode

from bloomlm import BloomConfig, BloomForCausalLM
from bloomlm.torch import checks
from bloomlm.torch.cache import KVCache, bucket

VOCAB, PAD = 97, 3
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    limit = TOL * max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max().item() <= limit, (ours - ref).abs().max().item()


@pytest.fixture(scope="module")
def model() -> BloomForCausalLM:
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=24, n_layer=2, n_head=3, pad_token_id=PAD,
                         eos_token_id=2)  # fmt: skip
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model


def ids_of(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=generator) for n in lengths]


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def last_logits(model, row: torch.Tensor) -> torch.Tensor:
    """The reference: one uncached forward of the whole row, logits of its last position."""
    with torch.no_grad():
        return model(row[None], use_cache=False).logits[0, -1]


# --------------------------------------------------------------------------------------------------
# generate through the protocol
# --------------------------------------------------------------------------------------------------


def test_generate_applies_the_lm_head_to_the_last_position_only(model):
    ids, mask = left_padded(ids_of(7, 4, 6))
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False)
    finally:
        hook.remove()
    assert len(seen) == 4 + 3
    assert all(shape[:2] == (rows, 1) for shape, rows in zip(seen, [3] * 4 + [6] * 3)), seen


class _CountCalls(TorchFunctionMode):
    def __init__(self, *functions):
        super().__init__()
        self.functions, self.count = functions, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.functions
        return func(*args, **(kwargs or {}))


def test_generate_grows_nothing_per_step_and_checks_ids_once(model, monkeypatch):
    ids, mask = left_padded(ids_of(7, 4, 6))
    checked = []
    monkeypatch.setattr(checks, "check_inputs", lambda *a: checked.append(1))
    for kwargs in ({}, {"num_beams": 2}, {"do_sample": True, "top_k": 5}):
        with _CountCalls(torch.cat, torch.concat, torch.hstack) as counter:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=6, **kwargs)
        assert counter.count == 0, kwargs  # ids, mask and cache: preallocated, written in place
        assert out.shape[1] == 13
    assert checked == []  # the public forward's per-call checks never run inside generate
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(torch.tensor([[5, VOCAB]]), max_new_tokens=2)  # checked at the boundary


def test_a_request_longer_than_the_usable_length_fails_at_once(model):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="max_model_len=2048"):
        model.generate(ids, max_new_tokens=10_000_000, max_model_len=2048)
    with pytest.raises(ValueError, match="max_model_len"):
        model.generate(ids, max_new_tokens=2, max_model_len=0)
    out = model.generate(ids, max_new_tokens=5, max_model_len=8, do_sample=False)
    assert out.shape == (1, 8)


def test_a_huge_max_new_tokens_allocates_nothing_up_front(model):
    """Issue 13: max_new_tokens=10**9 once failed in the allocator. The cache starts at a small
    bucket and grows with the sequence, so a request that stops early (here after 0.3 s) never
    asks for 10**9 positions."""
    ids = torch.tensor([[5, 6, 7]])
    out = model.generate(ids, max_new_tokens=10**9, max_time=0.3, eos_token_id=-1, do_sample=False)
    assert 3 < out.shape[1] < 100_000


def test_per_row_generators_give_a_prompt_the_same_tokens_whatever_the_batch(model):
    prompts = ids_of(6, 3, 8, seed=4)
    ids, mask = left_padded(prompts)
    kwargs = dict(do_sample=True, top_k=0, max_new_tokens=10, eos_token_id=None)
    batch = model.generate(ids, attention_mask=mask, generator=[torch.Generator().manual_seed(9)
                           for _ in range(3)], **kwargs)[:, ids.shape[1]:]  # fmt: skip
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], generator=[torch.Generator().manual_seed(9)], **kwargs)
        assert torch.equal(alone[0, len(prompt) :], batch[i]), i
    other_seed = model.generate(prompts[0][None], generator=torch.Generator().manual_seed(10),
                                **kwargs)[0, len(prompts[0]) :]  # fmt: skip
    assert not torch.equal(other_seed, batch[0])  # the draws really come from the generator
    with pytest.raises(ValueError, match="one per prompt"):
        model.generate(ids, attention_mask=mask, generator=[torch.Generator()], **kwargs)


# --------------------------------------------------------------------------------------------------
# the Decoder against full forward passes
# --------------------------------------------------------------------------------------------------


def test_rows_at_different_lengths_give_each_row_alone(model):
    rows = ids_of(5, 2, 7, seed=1)
    decoder = model.make_decoder(3, 32)
    for i, row in enumerate(rows):  # each request fills its own slot
        out = decoder.fill(i, row)
        close(out.logits[0, -1], last_logits(model, row))
    assert decoder.cache.lengths == [5, 2, 7]
    for new in ids_of(3, 3, 3, seed=2):
        logits = decoder.step_rows(new)
        rows = [torch.cat([row, token[None]]) for row, token in zip(rows, new)]
        for i, row in enumerate(rows):
            close(logits[i], last_logits(model, row))
    # a sub-slice of rows advances alone; then a finished row is reset and reused at once
    logits = decoder.step_rows(torch.tensor([11, 12]), rows=slice(1, 3))
    close(logits[1], last_logits(model, torch.cat([rows[2], torch.tensor([12])])))
    decoder.reset(0)
    out = decoder.fill(0, torch.tensor([40, 41]))
    close(out.logits[0, -1], last_logits(model, torch.tensor([40, 41])))
    with pytest.raises(ValueError, match="contiguous slice"):
        decoder.step_rows(torch.tensor([1, 2]), rows=slice(2, 4))


def test_crop_reorder_and_hidden_states_match_a_fresh_prefill(model):
    ids, mask = left_padded(ids_of(6, 4, 5, seed=3))
    decoder = model.make_decoder(3, 20)
    decoder.prefill(ids, mask)
    drafts = torch.tensor([[7, 8, 9], [10, 11, 12], [13, 14, 15]])
    verified = decoder.step(drafts, num_logits=3)  # assisted decoding: verify three drafts
    fresh = model.make_decoder(3, 20)
    expected = fresh.prefill(torch.cat([ids, drafts], 1),
                             torch.cat([mask, torch.ones_like(drafts)], 1),
                             num_logits=3, hidden=True)  # fmt: skip
    close(verified.logits, expected.logits)
    assert expected.hidden.shape == (3, 3, model.config.hidden_size)
    decoder.crop(ids.shape[1] + 1)  # reject the last two drafts
    out = decoder.step(torch.tensor([[20], [21], [22]]), hidden=True)
    kept = torch.cat([ids, drafts[:, :1], torch.tensor([[20], [21], [22]])], 1)
    reference = model.make_decoder(3, 20).prefill(kept, torch.cat([mask, torch.ones(3, 2)], 1),
                                                  hidden=True)  # fmt: skip
    close(out.logits, reference.logits)
    close(out.hidden, reference.hidden)
    order = torch.tensor([2, 0, 0])
    decoder.reorder(order)
    out = decoder.step(torch.tensor([[30], [31], [32]]))
    shuffled = torch.cat([kept[order], torch.tensor([[30], [31], [32]])], 1)
    shuffled_mask = torch.cat([mask[order], torch.ones(3, 3)], 1)
    close(out.logits, model.make_decoder(3, 20).prefill(shuffled, shuffled_mask).logits)
    legacy = decoder.legacy_cache()
    assert legacy[0][0].shape == (3 * model.config.n_head, model.config.head_dim, 9)


def test_a_prefill_from_embeddings_equals_one_from_their_ids(model):
    """prefill(inputs_embeds=) (soft prompts: PEFT prompt tuning, generate(inputs_embeds=)) reads
    the embeddings in place of the ids, through both decoders."""
    from bloomlm.torch.engine import ForwardDecoder

    ids, mask = left_padded(ids_of(5, 3, seed=7))
    embeds = model.transformer.word_embeddings(ids).detach()
    soft = torch.randn(2, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for source in (model, ForwardDecoder.wrap(model)):
        by_ids = source.make_decoder(2, 12).prefill(ids, mask, num_logits=2, hidden=True)
        decoder = source.make_decoder(2, 12)
        by_embeds = decoder.prefill(None, mask, inputs_embeds=embeds, num_logits=2, hidden=True)
        close(by_embeds.logits, by_ids.logits)
        close(by_embeds.hidden, by_ids.hidden)
        step = decoder.step(torch.tensor([[11], [12]]))  # steps read ids again
        expected = source.make_decoder(2, 12).prefill(
            torch.cat([ids, torch.tensor([[11], [12]])], 1), torch.cat([mask, torch.ones(2, 1)], 1)
        )
        close(step.logits, expected.logits)
        with_soft = source.make_decoder(2, 14).prefill(
            None, torch.cat([torch.ones(2, 2), mask], 1), inputs_embeds=torch.cat([soft, embeds], 1)
        )
        moved = (with_soft.logits - by_ids.logits[:, -1:]).abs().max()
        assert moved > 1e-3  # the soft prompt counts


def test_the_cache_grows_in_power_of_two_buckets_up_to_its_limit(model):
    row = ids_of(45, seed=5)[0]
    decoder = model.make_decoder(1, 40)
    assert decoder.cache.capacity == 16
    decoder.prefill(row[None, :5])
    capacities = {decoder.cache.capacity}
    for t in range(5, 40):
        logits = decoder.step(row[None, t : t + 1]).logits[0, -1]
        capacities.add(decoder.cache.capacity)
        if t in (15, 16, 31, 32, 39):  # at and after each growth
            close(logits, last_logits(model, row[: t + 1]))
    assert capacities == {16, 32, 40}  # the last bucket is the limit itself
    with pytest.raises(ValueError, match="limit is 40"):
        decoder.step(row[None, 40:41])
    assert [bucket(n, 2048) for n in (1, 16, 17, 100, 2000)] == [16, 16, 32, 128, 2048]


def test_a_cache_given_to_forward_has_one_length_per_call(model):
    cache = KVCache.for_config(model.config, 2, 8, model.dtype)
    decoder_like = cache.open(slice(0, 1), torch.ones(1, 3))
    assert decoder_like.read == 3 and cache.lengths == [3, 0]
    with pytest.raises(ValueError, match="same length"):
        model(torch.tensor([[5], [6]]), past_key_values=cache)


def test_quantized_linear_modules_work_inside_attention_and_mlp(model):
    """Any module mapping [.., C] -> [.., out] may replace a Linear (quantized modes do)."""

    class Halved(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x.half().float())

    ids, mask = left_padded(ids_of(5, 3, seed=6))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    block = model.transformer.h[0]
    originals = block.self_attention.dense, block.mlp.dense_4h_to_h
    block.self_attention.dense, block.mlp.dense_4h_to_h = Halved(originals[0]), Halved(originals[1])
    block.self_attention.tp_slices = block.mlp.tp_slices = 2  # slow_but_exact slices: skipped
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    finally:
        block.self_attention.dense, block.mlp.dense_4h_to_h = originals
        block.self_attention.tp_slices = block.mlp.tp_slices = 1
    assert out.shape == expected.shape


# --------------------------------------------------------------------------------------------------
# gradients of both attention paths against transformers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=24, n_layer=2, n_head=3,
                                      pad_token_id=PAD)  # fmt: skip
    reference = transformers.BloomForCausalLM(config)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.4)
    folder = tmp_path_factory.mktemp("grad-pair")
    reference.save_pretrained(folder)
    return BloomForCausalLM.from_pretrained(folder), reference


@pytest.mark.parametrize("mode", ["train", "eval", "eval-sdpa", "eval-eager"])
def test_gradients_equal_transformers_with_padding(pair, mode):
    """Padding rows must not change the gradients: the loss here also reads the position before
    each row's first real token (whose query sees no key), and every position's logits."""
    ours, reference = pair
    for m in pair:
        m.train(mode == "train")
    ours.config._attn_implementation = {"eval-sdpa": "sdpa", "eval-eager": "eager"}.get(mode)
    ids, mask = left_padded(ids_of(7, 3, 5, seed=7))
    weights = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(0))
    grads = []
    for m in pair:
        m.zero_grad()
        out = m(ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100))
        (out.loss + (out.logits * weights).sum() * 1e-2).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    ours.config._attn_implementation = None
    ours.eval(), reference.eval()
    for name, ref_grad in grads[1].items():
        diff = (grads[0][name] - ref_grad).abs().max().item()
        assert diff <= 1e-4 * max(1.0, ref_grad.abs().max().item()), (name, diff)


def test_from_pretrained_stores_the_engine_options(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = BloomForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", compile=True)
    assert loaded.config._attn_implementation == "eager" and loaded.compile_decoding is True
    assert BloomForCausalLM.from_pretrained(tmp_path).compile_decoding is False
    assert "_attn_implementation" not in (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="attn_implementation must be 'eager' or 'sdpa'"):
        BloomForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="compile must be"):
        BloomForCausalLM.from_pretrained(tmp_path, compile=1)

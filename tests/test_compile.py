"""The compiled decode step (torch/engine.py): it really runs, gives eager's ids, and falls back to
eager decoding with one warning where compilation fails. One tiny shape (rows bucket 4, 11 cache
columns) compiled once with inductor's default mode, so the module stays fast."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch._dynamo.utils import counters

from bloomlm import BloomConfig, BloomForCausalLM
from bloomlm.torch import engine
from bloomlm.torch.engine import ForwardDecoder
from bloomlm.torch.quantize import quantize_int8_

MODE = "default"  # inductor without autotuning: the quickest compile that is still inductor
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> BloomForCausalLM:
    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4, pad_token_id=3)
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def model() -> BloomForCausalLM:
    return _model()


def _prompts(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 64, (rows, 5), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask


def test_the_compiled_step_runs_and_gives_eager_ids(model, monkeypatch):
    greedy, beams = _prompts(3), _prompts(2)  # rows 3 -> bucket 4 (one padding row); 2 x 2 beams
    kwargs = dict(max_new_tokens=6, do_sample=False)
    expected = [model.generate(ids, attention_mask=mask, **kwargs) for ids, mask in (greedy, beams)]
    expected[1] = model.generate(*beams[:1], attention_mask=beams[1], num_beams=2, **kwargs)
    eager_steps = []
    decode = BloomForCausalLM.decode
    monkeypatch.setattr(BloomForCausalLM, "decode",
                        lambda *a, **k: eager_steps.append(1) or decode(*a, **k))  # fmt: skip
    graphs = counters["stats"]["unique_graphs"]
    got = model.generate(greedy[0], attention_mask=greedy[1], compile=MODE, **kwargs)
    got_beams = model.generate(beams[0], attention_mask=beams[1], num_beams=2, compile=MODE,
                               **kwargs)  # fmt: skip
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one shape, compiled once
    assert len(eager_steps) == 2  # the two prefills; every step ran the compiled code
    assert torch.equal(got, expected[0]) and torch.equal(got_beams, expected[1])
    # the Decoder itself: logits close to eager's, the cache written in place, the time reported
    decoder, reference = model.make_decoder(3, 11, compile=MODE), model.make_decoder(3, 11)
    assert decoder.cache.rows == 4 and reference.cache.rows == 3
    for d in (decoder, reference):
        d.prefill(*greedy)
    storage = decoder.cache.keys.data_ptr()
    for token in (7, 8, 9):
        ids = torch.full((3, 1), token)
        ours, theirs = decoder.step(ids).logits, reference.step(ids).logits
        assert ours.shape == (3, 1, 64) and (ours - theirs).abs().max() < 1e-4
    assert decoder.cache.keys.data_ptr() == storage and decoder.cache.lengths[:3] == [8] * 3
    assert decoder.compiled is not None and decoder.compile_seconds == 0.0  # compiled above


def test_a_failing_compilation_falls_back_with_one_warning(monkeypatch):
    model = _model(1)
    ids, mask = _prompts(3)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)

    def broken(*args):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setitem(engine._COMPILED_FUNCTIONS, (BloomForCausalLM, MODE), broken)
    with pytest.warns(
        RuntimeWarning, match=r"unavailable \(RuntimeError: no C\+\+ compiler found\)"
    ):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, compile=MODE)
    assert torch.equal(got, expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = model.generate(ids, attention_mask=mask, max_new_tokens=4, compile=MODE)
    assert caught == []  # the model is known not to compile: no second warning
    assert torch.equal(again, expected)


def test_replaced_linear_modules_compile_or_fall_back_with_a_warning(model):
    int8 = quantize_int8_(copy.deepcopy(model))
    ids, mask = _prompts(3)
    expected = int8.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = int8.generate(ids, attention_mask=mask, max_new_tokens=4, compile=MODE)
    assert torch.equal(got, expected)
    messages = [str(w.message) for w in caught]
    assert all("compiled decode step is unavailable" in m for m in messages), messages


def test_compile_with_a_forward_call_model_warns_and_decodes_eagerly():
    config = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    theirs = transformers.BloomForCausalLM(config).eval()
    with pytest.warns(RuntimeWarning, match="needs bloomlm's BloomForCausalLM"):
        decoder = ForwardDecoder.wrap(theirs).make_decoder(1, 8, compile=True)
    assert isinstance(decoder, ForwardDecoder)

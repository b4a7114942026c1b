"""generate() against transformers 4.37.2's, token for token; filters, configs and streamers.

Models: tiny BLOOM checkpoints with every weight randomised (n_head 4 and 3), written by
transformers. `model` runs our `generate` on transformers' BloomForCausalLM and, once
`bloomlm.BloomForCausalLM` exists, on ours loaded from the same folder; `theirs` is the oracle.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_lp

from bloomlm.generation import GENERATION_CONFIG_NAME, GenerationConfig, load_generation_config
from bloomlm.streamers import TextIteratorStreamer, TextStreamer
from bloomlm.torch import generate as gen
from bloomlm.torch.engine import ForwardDecoder, StepOutput
from bloomlm.torch.generate import generate

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"
VOCAB = 160
PAD = 3
RTOL = 1e-5  # fp32 parity tolerance of the spec: |ours - ref| <= RTOL * max(1, max|ref|)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning"
)  # transformers' own max_length/flag advice


def _ours_available() -> bool:
    return importlib.util.find_spec("bloomlm.torch.model") is not None


MODEL_KINDS = ["transformers"] + (["bloomlm"] if _ours_available() else [])


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads,
    and on a busy machine they cost seconds per test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_bloom(n_head: int, hidden: int, seed: int) -> transformers.BloomForCausalLM:
    config = transformers.BloomConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        n_layer=2,
        n_head=n_head,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    model = transformers.BloomForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random, LayerNorms included, so text is not degenerate
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layernorm" in name or "ln_f" in name:
                param.copy_(1 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
            else:
                param.copy_(0.5 * noise)
    return model


@pytest.fixture(scope="module", params=[(4, 32), (3, 36)], ids=["heads4", "heads3"])
def checkpoint(request, tmp_path_factory) -> Path:
    n_head, hidden = request.param
    folder = tmp_path_factory.mktemp(f"bloom-h{n_head}")
    _random_bloom(n_head, hidden, seed=n_head).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def theirs(checkpoint) -> transformers.BloomForCausalLM:
    return transformers.BloomForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module", params=MODEL_KINDS)
def model(request, checkpoint, theirs):
    """What our `generate` drives: transformers' model through the engine's forward-call adapter
    (ForwardDecoder), or ours through its own Decoder."""
    if request.param == "transformers":
        return ForwardDecoder.wrap(theirs)
    from bloomlm import BloomForCausalLM

    return BloomForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def tokenizer():
    if importlib.util.find_spec("bloomlm.tokenizer") is not None:
        from bloomlm import BloomTokenizerFast

        return BloomTokenizerFast.from_pretrained(TOKENIZER_DIR)
    return transformers.BloomTokenizerFast.from_pretrained(TOKENIZER_DIR)


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts: lengths 7, 5 and 3."""
    ids = torch.randint(4, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 2), (2, 4)):
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask


def _eos_from_greedy(theirs, ids, mask, step: int = 3) -> int:
    """A token that greedy decoding of row 0 first produces at `step`, so eos really fires."""
    new = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)[
        0, ids.shape[1] :
    ]
    for k in range(step, len(new)):
        if int(new[k]) not in new[:k].tolist() and int(new[k]) != PAD:
            return int(new[k])
    return int(new[step])


def _assert_same_tokens(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.equal(ours, ref), f"\nours   {ours.tolist()}\ntheirs {ref.tolist()}"


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(ours)), "-inf masks differ"
    scale = max(1.0, ref[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(ours[finite], ref[finite], rtol=0, atol=RTOL * scale)


# --------------------------------------------------------------------------------------------------
# parity with transformers
# --------------------------------------------------------------------------------------------------


def test_greedy_single_prompt(model, theirs):
    ids, _ = _prompts()
    _assert_same_tokens(
        generate(model, ids[:1], max_new_tokens=12), theirs.generate(ids[:1], max_new_tokens=12)
    )


def test_greedy_left_padded_batch(model, theirs):
    ids, mask = _prompts()
    ours = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=12)
    _assert_same_tokens(ours, theirs.generate(ids, attention_mask=mask, max_new_tokens=12))
    assert ours.shape == (3, 19)


def test_mask_inferred_from_padding_and_bos_start(model, theirs):
    ids, _ = _prompts()  # no mask given: padding is found from pad_token_id, as transformers does
    _assert_same_tokens(
        generate(model, ids, max_new_tokens=8), theirs.generate(ids, max_new_tokens=8)
    )
    _assert_same_tokens(
        generate(model, max_new_tokens=8), theirs.generate(max_new_tokens=8)
    )  # from bos


def test_max_length_and_max_new_tokens_agree(model, theirs):
    ids, mask = _prompts()
    by_total = generate(model, ids, attention_mask=mask, max_length=ids.shape[1] + 6)
    _assert_same_tokens(by_total, generate(model, ids, attention_mask=mask, max_new_tokens=6))
    _assert_same_tokens(
        by_total, theirs.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 6)
    )


def test_eos_stops_generation_and_pads_finished_rows(model, theirs):
    ids, mask = _prompts()
    eos = _eos_from_greedy(theirs, ids, mask)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    ours = generate(model, ids, **kwargs)
    _assert_same_tokens(ours, theirs.generate(ids, **kwargs))
    row = ours[0, ids.shape[1] :].tolist()
    assert eos in row and all(t == PAD for t in row[row.index(eos) + 1 :])
    alone = generate(model, ids[:1], max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    assert alone[0, -1].item() == eos and alone.shape[1] < ids.shape[1] + 12  # stopped early


def test_eos_list_and_pad_defaulting_to_eos(model, theirs, caplog):
    ids, mask = _prompts()
    eos = [_eos_from_greedy(theirs, ids, mask, step=2), 2]
    ref = theirs.generate(
        ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=None
    )
    with caplog.at_level(logging.WARNING, logger="bloomlm"):
        config = GenerationConfig(eos_token_id=eos, pad_token_id=None, max_new_tokens=10)
        ours = generate(model, ids, generation_config=config, attention_mask=mask)
    _assert_same_tokens(ours, ref)
    assert f"Setting `pad_token_id` to `eos_token_id`:{eos[0]}" in caplog.text


@pytest.mark.parametrize("kind", ["min_new_tokens", "min_length"])
def test_min_length_forbids_early_eos(model, theirs, kind):
    ids, mask = _prompts()
    eos = _eos_from_greedy(theirs, ids, mask, step=1)
    value = 6 if kind == "min_new_tokens" else ids.shape[1] + 6
    kwargs = {"attention_mask": mask, "max_new_tokens": 10, "eos_token_id": eos, kind: value}
    ours = generate(model, ids, **kwargs)
    _assert_same_tokens(ours, theirs.generate(ids, **kwargs))
    assert eos not in ours[:, ids.shape[1] : ids.shape[1] + 6].tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(repetition_penalty=1.8),
        dict(repetition_penalty=0.7),
        dict(no_repeat_ngram_size=2),
        dict(no_repeat_ngram_size=1),
        dict(bad_words_ids=[[5], [7, 8], [2]]),
        dict(repetition_penalty=1.3, no_repeat_ngram_size=3, num_beams=3),
    ],
    ids=["rep1.8", "rep0.7", "ngram2", "ngram1", "badwords", "beam-mixed"],
)
def test_logits_processors_match(model, theirs, kwargs):
    ids, mask = _prompts()
    if "bad_words_ids" in kwargs:  # ban what greedy would otherwise say
        free = theirs.generate(ids, attention_mask=mask, max_new_tokens=10)[:, ids.shape[1] :]
        kwargs = dict(bad_words_ids=[[int(free[0, 0])], [int(free[1, 1]), int(free[1, 2])], [2]])
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=10, **kwargs)
    _assert_same_tokens(
        ours, theirs.generate(ids, attention_mask=mask, max_new_tokens=10, **kwargs)
    )
    new = ours[:, ids.shape[1] :]
    if kwargs.get("no_repeat_ngram_size") == 2:
        for row in ours.tolist():
            bigrams = list(zip(row, row[1:]))[ids.shape[1] - 1 :]
            assert len(bigrams) == len(set(bigrams))
    if "bad_words_ids" in kwargs:
        assert kwargs["bad_words_ids"][0][0] not in new.tolist()[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=3),
        dict(num_beams=3, num_return_sequences=2),
        dict(num_beams=3, num_return_sequences=3, length_penalty=0.3, early_stopping=True),
        dict(num_beams=4, num_return_sequences=2, length_penalty=2.0, early_stopping="never"),
        dict(num_beams=3, length_penalty=-1.0, early_stopping="never"),
        dict(num_beams=2, early_stopping=False),
    ],
    ids=["b3", "b3r2", "lp0.3-early", "lp2-never", "lp-1-never", "b2"],
)
def test_beam_search_matches(model, theirs, kwargs):
    ids, mask = _prompts()
    eos = [_eos_from_greedy(theirs, ids, mask, step=2), 2]
    common = dict(
        attention_mask=mask, max_new_tokens=9, eos_token_id=eos, pad_token_id=PAD, **kwargs
    )
    ours = generate(model, ids, **common)
    _assert_same_tokens(ours, theirs.generate(ids, **common))
    assert ours.shape[0] == 3 * kwargs.get("num_return_sequences", 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_beams=3, num_return_sequences=2),
        dict(output_attentions=True, output_hidden_states=True),
        dict(num_beams=2, output_attentions=True),
        dict(num_beams=2, output_hidden_states=True),
    ],
    ids=["greedy", "beam", "greedy-attentions", "beam-attentions", "beam-hidden"],
)
def test_return_dict_with_scores(model, theirs, kwargs):
    ids, mask = _prompts()
    eos = _eos_from_greedy(theirs, ids, mask, step=2)
    common = dict(
        attention_mask=mask,
        max_new_tokens=8,
        eos_token_id=eos,
        return_dict_in_generate=True,
        output_scores=True,
        **kwargs,
    )
    ours, ref = generate(model, ids, **common), theirs.generate(ids, **common)
    assert type(ours).__name__ == type(ref).__name__
    assert [k for k in ours.keys() if k != "past_key_values"] == [
        k for k in ref.keys() if k != "past_key_values"
    ]
    _assert_same_tokens(ours.sequences, ref.sequences)
    assert len(ours.scores) == len(ref.scores)
    for step_ours, step_ref in zip(ours.scores, ref.scores):
        _assert_close(step_ours, step_ref)
    for name in ("attentions", "hidden_states"):  # per step, per layer
        if getattr(ref, name, None) is not None:
            assert len(getattr(ours, name)) == len(getattr(ref, name))
            _assert_close(getattr(ours, name)[0][-1], getattr(ref, name)[0][-1])
            _assert_close(getattr(ours, name)[-1][-1], getattr(ref, name)[-1][-1])
    if "num_beams" in kwargs:
        _assert_close(ours.sequences_scores, ref.sequences_scores)
        _assert_same_tokens(ours.beam_indices, ref.beam_indices)
    assert len(ours.past_key_values) == len(ref.past_key_values)
    for ours_layer, ref_layer in zip(ours.past_key_values, ref.past_key_values):
        for ours_cache, ref_cache in zip(
            ours_layer, ref_layer
        ):  # key [N*H, D, S], value [N*H, S, D]
            _assert_close(ours_cache, ref_cache)
    assert ours[0] is ours.sequences and ours["scores"] is ours.scores
    ours.sequences[0, 0] = 1  # a normal tensor: editable outside inference mode


def test_generation_config_argument_and_model_default(model, theirs):
    ids, mask = _prompts()
    config = GenerationConfig(
        max_new_tokens=7, repetition_penalty=1.5, eos_token_id=None, pad_token_id=PAD
    )
    ours = generate(
        model, ids, config, attention_mask=mask
    )  # positional order of transformers' generate
    ref = theirs.generate(
        ids, transformers.GenerationConfig(**config.to_diff_dict()), attention_mask=mask
    )
    _assert_same_tokens(ours, ref)
    assert config.max_length == 20  # the caller's config is not modified
    if hasattr(model, "generate") and not isinstance(model, transformers.PreTrainedModel):
        _assert_same_tokens(model.generate(ids, config, attention_mask=mask), ours)


def test_use_cache_false_gives_the_same_tokens(model):
    ids, mask = _prompts()
    cached = generate(model, ids, attention_mask=mask, max_new_tokens=6)
    _assert_same_tokens(
        generate(model, ids, attention_mask=mask, max_new_tokens=6, use_cache=False), cached
    )


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------


def test_top_k_1_is_greedy(model):
    ids, mask = _prompts()
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=10)
    torch.manual_seed(123)
    _assert_same_tokens(
        generate(model, ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1),
        greedy,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(temperature=0.7, top_k=0, top_p=0.85),
        dict(typical_p=0.8, top_k=20),
        dict(epsilon_cutoff=0.02, num_return_sequences=2),
        dict(eta_cutoff=0.02, repetition_penalty=1.2),
        dict(num_beams=3, num_return_sequences=2, temperature=1.3),
    ],
    ids=["default", "temp-topp", "typical", "epsilon", "eta", "beam-sample"],
)
def test_seeded_sampling_reproducible_and_same_draws_as_transformers(model, theirs, kwargs):
    ids, mask = _prompts()
    common = dict(
        attention_mask=mask, max_new_tokens=10, do_sample=True, eos_token_id=None, **kwargs
    )
    torch.manual_seed(7)
    first = generate(model, ids, **common)
    torch.manual_seed(7)
    _assert_same_tokens(generate(model, ids, **common), first)
    torch.manual_seed(7)
    _assert_same_tokens(first, theirs.generate(ids, **common))


class _FixedLogitsModel(torch.nn.Module):
    """Returns the same next-token logits for every row and step; no cache."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.config = SimpleNamespace(
            eos_token_id=None, pad_token_id=None, bos_token_id=0, vocab_size=len(logits)
        )

    def forward(
        self, input_ids, past_key_values=None, attention_mask=None, use_cache=True, return_dict=True
    ):
        batch, length = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(batch, length, -1), past_key_values=None)


def test_sampled_frequencies_follow_softmax_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temperature, draws = 0.8, 20000
    model = _FixedLogitsModel(logits)
    torch.manual_seed(0)
    out = generate(
        model,
        torch.zeros((draws, 1), dtype=torch.long),
        max_new_tokens=1,
        do_sample=True,
        temperature=temperature,
        top_k=0,
    )
    counts = torch.bincount(out[:, 1], minlength=len(logits)).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 30.0, chi2  # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4


# --------------------------------------------------------------------------------------------------
# the logits filters as pure functions, against transformers' processors and warpers
# --------------------------------------------------------------------------------------------------


def _random_scores(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(6, 50, generator=generator) * 3
    scores[0, 10:14] = scores[0, 3]  # ties at the cut
    ids = torch.randint(0, 50, (6, 9), generator=generator)
    ids[:, -2:] = ids[:, 2:4]  # a repeated bigram prefix
    return ids, scores


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            lambda s, k: gen.top_k_filter(s, 5, k),
            lambda k: hf_lp.TopKLogitsWarper(5, min_tokens_to_keep=k),
        ),
        (
            lambda s, k: gen.top_p_filter(s, 0.7, k),
            lambda k: hf_lp.TopPLogitsWarper(0.7, min_tokens_to_keep=k),
        ),
        (
            lambda s, k: gen.typical_filter(s, 0.6, k),
            lambda k: hf_lp.TypicalLogitsWarper(0.6, min_tokens_to_keep=k),
        ),
        (
            lambda s, k: gen.epsilon_filter(s, 0.05, k),
            lambda k: hf_lp.EpsilonLogitsWarper(0.05, min_tokens_to_keep=k),
        ),
        (
            lambda s, k: gen.eta_filter(s, 0.05, k),
            lambda k: hf_lp.EtaLogitsWarper(0.05, min_tokens_to_keep=k),
        ),
        (lambda s, k: gen.apply_temperature(s, 0.6), lambda k: hf_lp.TemperatureLogitsWarper(0.6)),
    ],
    ids=["top_k", "top_p", "typical", "epsilon", "eta", "temperature"],
)
def test_warpers_equal_transformers(ours, theirs, keep):
    ids, scores = _random_scores()
    expected = theirs(keep)(ids, scores.clone())
    got = ours(scores.clone(), keep)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            lambda i, s: gen.apply_repetition_penalty(i, s, 1.7),
            hf_lp.RepetitionPenaltyLogitsProcessor(1.7),
        ),
        (lambda i, s: gen.ban_repeated_ngrams(i, s, 3), hf_lp.NoRepeatNGramLogitsProcessor(3)),
        (lambda i, s: gen.ban_repeated_ngrams(i, s, 1), hf_lp.NoRepeatNGramLogitsProcessor(1)),
        (lambda i, s: gen.ban_repeated_ngrams(i, s, 12), hf_lp.NoRepeatNGramLogitsProcessor(12)),
        (
            lambda i, s: gen.apply_sequence_bias(
                i, s, gen.bad_words_bias([[4], [7, 9], [1, 2, 3], [2]], [2])
            ),
            hf_lp.NoBadWordsLogitsProcessor([[4], [7, 9], [1, 2, 3], [2]], eos_token_id=2),
        ),
        (
            lambda i, s: gen.apply_sequence_bias(i, s, {(4,): 2.5, (int(i[0, -1]), 9): -1.0}),
            None,  # built below: needs the ids
        ),
        (lambda i, s: gen.remove_inf_nan(s), hf_lp.InfNanRemoveLogitsProcessor()),
    ],
    ids=[
        "repetition",
        "ngram3",
        "ngram1",
        "ngram-too-long",
        "bad-words",
        "sequence-bias",
        "inf-nan",
    ],
)
def test_processors_equal_transformers(ours, theirs):
    ids, scores = _random_scores(1)
    ids[2, -3:] = ids[2, :3]  # the last three tokens repeat the first three
    ids[3, -1] = ids[3, 0]
    scores[1, 4] = float("nan")
    scores[1, 5] = float("inf")
    if theirs is None:
        theirs = hf_lp.SequenceBiasLogitsProcessor({(4,): 2.5, (int(ids[0, -1]), 9): -1.0})
    if not isinstance(theirs, hf_lp.InfNanRemoveLogitsProcessor):
        scores = torch.nan_to_num(scores, nan=0.0, posinf=1.0)
    expected = theirs(ids, scores.clone())
    torch.testing.assert_close(ours(ids, scores.clone()), expected, rtol=0, atol=0)


def test_processor_chain_order_matches_transformers(theirs):
    config = GenerationConfig(
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        bad_words_ids=[[5]],
        min_new_tokens=3,
        min_length=12,
        eos_token_id=2,
        suppress_tokens=[6],
        begin_suppress_tokens=[9],
        exponential_decay_length_penalty=(1, 1.5),
        forced_eos_token_id=2,
        renormalize_logits=True,
        max_length=14,
    )
    hf_config = transformers.GenerationConfig(**config.to_diff_dict())
    expected_chain = theirs._get_logits_processor(
        hf_config, 9, None, None, transformers.LogitsProcessorList()
    )
    ours_chain = gen.build_logits_processors(config, 9)
    assert len(ours_chain) == len(expected_chain)
    generator = torch.Generator().manual_seed(3)
    for length in (9, 10, 11, 13):
        ids = torch.randint(0, 20, (2, length), generator=generator)
        scores = torch.randn(2, 20, generator=generator)
        expected = expected_chain(
            ids, scores.clone()
        )  # NaN where decay meets a banned eos, as in transformers
        torch.testing.assert_close(
            gen.run_chain(ours_chain, ids, scores.clone()), expected, equal_nan=True
        )


# --------------------------------------------------------------------------------------------------
# the loop on a fake model whose next token is (last token + 1) % V
# --------------------------------------------------------------------------------------------------


class _CountingModel(torch.nn.Module):
    """Logits 5 * one-hot on (token + 1) % V, plus 1 * one-hot on (sum of the prefix) % V.

    The cache is BLOOM's layout holding the ids themselves (H = D = 1), and the second term reads
    the whole prefix through it, so a wrongly reordered cache changes the beams.
    """

    def __init__(self, vocab: int = 10, eos: int | None = None, delay: float = 0.0):
        super().__init__()
        self.vocab, self.delay, self.calls = vocab, delay, []
        self.config = SimpleNamespace(
            eos_token_id=eos, pad_token_id=None, bos_token_id=0, vocab_size=vocab, n_head=1
        )

    def forward(
        self, input_ids, past_key_values=None, attention_mask=None, use_cache=True, return_dict=True
    ):
        time.sleep(self.delay)
        past_len = 0 if past_key_values is None else past_key_values[0][1].shape[1]
        self.calls.append((input_ids.shape[1], past_len, attention_mask.shape[1]))
        value = input_ids[:, :, None].float()  # [N*H, T, D]
        if past_key_values is not None:
            value = torch.cat([past_key_values[0][1], value], dim=1)
        prefix_sums = value[:, :, 0].long().cumsum(dim=1)[:, past_len:]
        one_hot = torch.nn.functional.one_hot
        logits = one_hot((input_ids + 1) % self.vocab, self.vocab) * 5.0 + one_hot(
            prefix_sums % self.vocab, self.vocab
        )
        past = ((value.transpose(1, 2), value),) if use_cache else None
        return SimpleNamespace(logits=logits, past_key_values=past)


def test_fake_model_greedy_feeds_only_new_tokens():
    model = _CountingModel()
    out = generate(model, torch.tensor([[3, 4]]), max_new_tokens=4)
    assert out.tolist() == [[3, 4, 5, 6, 7, 8]]
    assert model.calls == [
        (2, 0, 2),
        (1, 2, 3),
        (1, 3, 4),
        (1, 4, 5),
    ]  # prompt once, then one token at a time


def test_fake_model_eos_pad_and_custom_hooks():
    model = _CountingModel(eos=7)
    out = generate(model, torch.tensor([[1, 2], [5, 6]]), max_new_tokens=6, pad_token_id=0)
    assert out.tolist() == [
        [1, 2, 3, 4, 5, 6, 7],
        [5, 6, 7, 0, 0, 0, 0],
    ]  # stops once every row has eos
    stop_at_9 = generate(
        _CountingModel(),
        torch.tensor([[1]]),
        max_new_tokens=20,
        stopping_criteria=[lambda ids, s: ids[0, -1] == 4],
    )
    assert stop_at_9.tolist() == [[1, 2, 3, 4]]
    ban_5 = generate(
        _CountingModel(),
        torch.tensor([[3]]),
        max_new_tokens=3,
        logits_processor=[lambda ids, s: s.index_fill(1, torch.tensor([5]), -float("inf"))],
    )
    assert ban_5[0, 2].item() != 5


def test_fake_model_beam_search_reorders_the_cache():
    ids = torch.tensor([[2, 3], [1, 1]])
    kwargs = dict(
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=3,
        return_dict_in_generate=True,
        output_scores=True,
    )
    cached = generate(_CountingModel(), ids, **kwargs)
    uncached = generate(_CountingModel(), ids, use_cache=False, **kwargs)
    _assert_same_tokens(cached.sequences, uncached.sequences)
    _assert_same_tokens(cached.beam_indices, uncached.beam_indices)
    assert cached.sequences[0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    assert len({tuple(row) for row in cached.sequences.tolist()}) == 6
    assert (
        cached.beam_indices[:, :6] % 3 != cached.beam_indices[:, :6] // 3 * 0
    ).any()  # beams did move


def test_a_model_making_its_own_decoder_is_driven_through_the_protocol():
    """generate asks the model for a decoder (no probing of its forward): one prefill with the
    prompt, then one step per token with the last token only, and a reorder per beam step."""
    calls = []

    class Recording:
        def __init__(self, rows, capacity):
            calls.append(("make", rows, capacity))

        def prefill(self, ids, mask, **flags):
            calls.append(("prefill", ids.tolist(), mask.tolist()))
            return StepOutput(torch.nn.functional.one_hot((ids[:, -1:] + 1) % 10, 10).float())

        def step(self, ids, **flags):
            calls.append(("step", ids.tolist()))
            return StepOutput(torch.nn.functional.one_hot((ids + 1) % 10, 10).float())

        def crop(self, length):
            calls.append(("crop", length))

        def reorder(self, rows, masks=True):
            calls.append(("reorder", rows.tolist(), masks))

        def legacy_cache(self):
            return None

    class Source:
        config = SimpleNamespace(
            eos_token_id=None, pad_token_id=None, bos_token_id=0, vocab_size=10
        )
        generation_config = None

        def make_decoder(self, rows, capacity, *, compile=None):
            return Recording(rows, capacity)

    out = generate(Source(), torch.tensor([[1, 2]]), max_new_tokens=3)
    assert out.tolist() == [[1, 2, 3, 4, 5]]
    assert calls == [("make", 1, 5), ("crop", 0), ("prefill", [[1, 2]], [[1, 1]]), ("step", [[3]]),
                     ("step", [[4]])]  # fmt: skip
    calls.clear()
    generate(Source(), torch.tensor([[1, 2]]), max_new_tokens=3, num_beams=2)
    assert [c[0] for c in calls].count("reorder") == 3 and calls[0] == ("make", 2, 5)
    assert all(c[2] is False for c in calls if c[0] == "reorder")  # the mask stays in place


# --------------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(max_length=3, max_new_tokens=None), "max_length"),
        (dict(max_new_tokens=-2), "max_new_tokens"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, top_p=1.5), "top_p"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_k=-1), "top_k"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(num_beams=0), "num_beams"),
        (dict(early_stopping="sometimes", num_beams=2), "early_stopping"),
        (dict(bad_words_ids=[5]), "bad_words_ids"),
        (dict(bad_words_ids=[[3], [4, 99]]), "outside the vocabulary"),
        (dict(sequence_bias={(1,): 2}), "sequence_bias"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(eos_token_id=-1, min_length=3), "eos_token_id"),  # -1 alone: "never stops"
        (dict(eos_token_id=1.5), "eos_token_id"),
        (dict(num_beam_groups=2, num_beams=3, diversity_penalty=1.0), "divisible"),
        (dict(num_beam_groups=2, num_beams=4), "diversity_penalty"),
        (dict(num_beam_groups=2, num_beams=4, diversity_penalty=1.0, do_sample=True), "do_sample"),
        (dict(diversity_penalty=1.0), "group beam search"),
        (dict(num_beams=2, diversity_penalty=1.0), "group beam search"),
        (dict(force_words_ids=[[5]]), "num_beams > 1"),
        (dict(force_words_ids=[5], num_beams=2), "force_words_ids"),
        (dict(force_words_ids=[[[5, 6], [5]]], num_beams=2), "prefix"),
        (dict(constraints=[], num_beams=2, do_sample=True), "do_sample"),
        (dict(penalty_alpha=0.6, top_k=4, use_cache=False), "use_cache"),
        (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens"),
        (dict(prompt_lookup_num_tokens=2, use_cache=False), "use_cache"),
        (dict(prompt_lookup_num_tokens=2, num_beams=2), "greedy search and sampling"),
        (dict(forced_decoder_ids=[[1]]), "forced_decoder_ids"),
        (dict(encoder_repetition_penalty=1.2), "encoder"),
        (dict(negative_prompt_ids=torch.tensor([[1]])), "guidance_scale"),
        (dict(guidance_scale=2.0, negative_prompt_ids=torch.tensor([[1.5]])), "negative_prompt"),
        (dict(prefix_allowed_tokens_fn=lambda b, ids: []), "prefix_allowed_tokens_fn"),
        (
            dict(guidance_scale=1.5, num_beams=2, num_beam_groups=2, diversity_penalty=1.0),
            "guidance_scale",
        ),
        (dict(prompt_lookup_num_tokens=2, do_sample=True, num_return_sequences=2), "one prompt"),
        (dict(prompt_lookup_num_tokens=2, inputs_embeds=torch.zeros(1, 3, 4)), "inputs_embeds"),
        (dict(foo=1), "foo"),
        (dict(inputs_embeds=torch.zeros(1, 3)), "inputs_embeds"),
        (dict(assistant_model=object()), "assistant_model"),
        (dict(synced_gpus=True), "synced_gpus"),
        (dict(attention_mask=torch.ones(1, 2)), "attention_mask"),
        (dict(input_ids=torch.tensor([[1, 2, 3]])), "inputs"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        generate(_CountingModel(), torch.tensor([[1, 2, 3]]), **({"max_new_tokens": 2} | kwargs))


def test_bad_inputs_raise_value_error(tokenizer):
    model = _CountingModel()
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.tensor([[1.0, 2.0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.tensor([1, 2]), max_new_tokens=2)
    with pytest.raises(ValueError, match="beam search"):
        generate(
            model,
            torch.tensor([[1, 2]]),
            max_new_tokens=2,
            num_beams=2,
            streamer=TextStreamer(tokenizer),
        )
    with pytest.raises(ValueError, match="batch size 1"):
        generate(
            model,
            torch.tensor([[1, 2], [3, 4]]),
            max_new_tokens=2,
            streamer=TextStreamer(tokenizer),
        )
    model.config.bos_token_id = None
    with pytest.raises(ValueError, match="bos_token_id"):
        generate(model, max_new_tokens=2)


# --------------------------------------------------------------------------------------------------
# GenerationConfig
# --------------------------------------------------------------------------------------------------


def test_generation_config_defaults_are_transformers():
    ours = GenerationConfig().to_dict()
    ref = transformers.GenerationConfig().to_dict()
    ref.pop("transformers_version")
    ref.pop("_from_model_config")
    assert ours == ref


def test_generation_config_round_trip_with_transformers(tmp_path):
    ours = GenerationConfig(
        max_new_tokens=9, do_sample=True, top_p=0.9, eos_token_id=[2, 5], custom_key="kept"
    )
    ours.save_pretrained(tmp_path / "a")
    assert [p.name for p in (tmp_path / "a").iterdir()] == [
        GENERATION_CONFIG_NAME
    ]  # no temp file left
    ref = transformers.GenerationConfig.from_pretrained(tmp_path / "a")
    assert (ref.max_new_tokens, ref.top_p, ref.eos_token_id, ref.custom_key) == (
        9,
        0.9,
        [2, 5],
        "kept",
    )
    ref.num_beams = 4
    ref.save_pretrained(tmp_path / "b")
    back = GenerationConfig.from_pretrained(tmp_path / "b")
    assert back.num_beams == 4 and back.eos_token_id == [2, 5] and back.custom_key == "kept"
    assert back == GenerationConfig.from_pretrained(tmp_path / "b" / GENERATION_CONFIG_NAME)


def test_generation_config_from_model_config_and_loader(checkpoint, tmp_path):
    model_config = transformers.BloomConfig.from_pretrained(checkpoint)
    from_model = GenerationConfig.from_model_config(model_config)
    assert (from_model.bos_token_id, from_model.eos_token_id, from_model.pad_token_id) == (
        1,
        2,
        PAD,
    )
    assert (
        load_generation_config(tmp_path, model_config) == from_model
    )  # no file: from the model config
    GenerationConfig(eos_token_id=7, max_new_tokens=4).save_pretrained(tmp_path)
    loaded = load_generation_config(tmp_path, model_config)
    assert loaded.eos_token_id == 7 and loaded.max_new_tokens == 4
    with pytest.raises(FileNotFoundError, match=GENERATION_CONFIG_NAME):
        GenerationConfig.from_pretrained(tmp_path / "missing")


def test_from_pretrained_gives_generating_models_the_folder_generation_config(checkpoint, tmp_path):
    from bloomlm import BloomForCausalLM, BloomForSequenceClassification

    shutil.copytree(checkpoint, tmp_path / "with")
    GenerationConfig(eos_token_id=[2, 7], max_new_tokens=5).save_pretrained(tmp_path / "with")
    loaded = BloomForCausalLM.from_pretrained(tmp_path / "with").generation_config
    assert (loaded.eos_token_id, loaded.max_new_tokens) == ([2, 7], 5)
    other = BloomForSequenceClassification.from_pretrained(tmp_path / "with")
    assert other.generation_config is None  # as transformers: only generating models have one

    shutil.copytree(checkpoint, tmp_path / "without")
    (tmp_path / "without" / GENERATION_CONFIG_NAME).unlink(missing_ok=True)
    model = BloomForCausalLM.from_pretrained(tmp_path / "without")
    assert model.generation_config == GenerationConfig.from_model_config(model.config)
    assert model.generation_config.max_new_tokens is None


def test_generation_config_update_and_validate():
    config = GenerationConfig()
    assert config.update(top_k=3, attention_mask="m", bogus=1) == {
        "attention_mask": "m",
        "bogus": 1,
    }
    assert config.top_k == 3
    with pytest.warns(UserWarning, match="top_k"):
        config.validate()
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=-1.0).validate()
    with pytest.raises(ValueError, match="inconsistent"):
        GenerationConfig(temperature=0.5).save_pretrained("/nonexistent-never-written")
    assert dataclasses.is_dataclass(config)


# --------------------------------------------------------------------------------------------------
# streamers
# --------------------------------------------------------------------------------------------------


def _token_stream(tokenizer) -> list[int]:
    text = "Hello world, streaming\nworks 你好世界 and   spaces end"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_streamer_chunks_equal_transformers(tokenizer, skip_prompt):
    ids = _token_stream(tokenizer)
    ours = TextIteratorStreamer(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
    ref = transformers.TextIteratorStreamer(
        tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True
    )
    for streamer in (ours, ref):
        streamer.put(torch.tensor([ids[:3]]))
        for token in ids[3:]:
            streamer.put(torch.tensor([token]))
        streamer.end()
    ours_chunks, ref_chunks = list(ours), list(ref)
    assert ours_chunks == ref_chunks and len(ours_chunks) > 5
    assert "".join(ours_chunks) == tokenizer.decode(ids[3:] if skip_prompt else ids)


def test_text_streamer_prints_the_decoded_sequence(model, tokenizer, capsys):
    ids, _ = _prompts()
    out = generate(model, ids[:1], max_new_tokens=10, streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out == tokenizer.decode(out[0]) + "\n"
    generate(model, ids[:1], max_new_tokens=10, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out == tokenizer.decode(out[0, ids.shape[1] :]) + "\n"


def test_iterator_streamer_yields_before_generate_returns(tokenizer):
    model = _CountingModel(vocab=100, delay=0.02)
    streamer = TextIteratorStreamer(tokenizer, timeout=10)
    returned = threading.Event()
    result = {}

    def run():
        result["ids"] = generate(
            model, torch.tensor([[40, 41]]), max_new_tokens=15, streamer=streamer
        )
        returned.set()

    thread = threading.Thread(target=run)
    thread.start()
    chunks = [next(streamer)]
    first_came_before_return = not returned.is_set()
    chunks += list(streamer)
    thread.join(timeout=10)
    assert first_came_before_return
    assert "".join(chunks) == tokenizer.decode(result["ids"][0])


def test_iterator_streamer_ends_when_generate_fails(tokenizer):
    class Broken(_CountingModel):
        def forward(self, *args, **kwargs):
            if len(self.calls) == 2:
                raise RuntimeError("boom")
            return super().forward(*args, **kwargs)

    streamer = TextIteratorStreamer(tokenizer, timeout=10)
    with pytest.raises(RuntimeError, match="boom"):
        generate(Broken(vocab=100), torch.tensor([[40]]), max_new_tokens=5, streamer=streamer)
    assert isinstance("".join(streamer), str)  # the consumer is released, not left waiting


def test_generation_config_json_is_plain_json(tmp_path):
    GenerationConfig(bad_words_ids=[[1, 2]], sequence_bias=None).save_pretrained(tmp_path)
    data = json.loads((tmp_path / GENERATION_CONFIG_NAME).read_text())
    assert data == {"bad_words_ids": [[1, 2]]}

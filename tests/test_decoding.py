"""The decoding strategies beyond greedy/sampling/beam search, against transformers 4.37.2's
`generate`, token for token: group (diverse) beam search, constrained beam search, contrastive
search, assisted decoding (an assistant model; prompt lookup), beam sampling's outputs,
`prefix_allowed_tokens_fn`, `forced_decoder_ids`, classifier-free guidance, `inputs_embeds`,
negative eos / pad ids, and the mode table.

As in test_generate.py, `model` is transformers' BloomForCausalLM driven through the engine's
forward-call adapter (ForwardDecoder) or bloomlm's own model on the same folder; `theirs` (the
oracle) is transformers' model running its own `generate`.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from transformers.generation import beam_constraints as hf_constraints

from bloomlm import BloomForCausalLM
from bloomlm.constraints import ConstraintListState, DisjunctiveConstraint, PhrasalConstraint
from bloomlm.torch.engine import ForwardDecoder
from bloomlm.torch.generate import generate, generation_mode
from test_generate import PAD, _assert_close, _assert_same_tokens, _prompts, _random_bloom

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # transformers' max_length/flag advice
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bloom-decoding")
    _random_bloom(4, 32, seed=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def theirs(checkpoint) -> transformers.BloomForCausalLM:
    return transformers.BloomForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module", params=["transformers", "bloomlm"])
def model(request, checkpoint, theirs):
    if request.param == "transformers":
        return ForwardDecoder.wrap(theirs)
    return BloomForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def assistants(tmp_path_factory, model):
    """A smaller random BLOOM (2 heads, hidden 16, same vocabulary) as transformers' and as
    bloomlm's model: (the one transformers' generate gets, the one ours gets)."""
    folder = tmp_path_factory.mktemp("bloom-assistant")
    _random_bloom(2, 16, seed=9).save_pretrained(folder)
    ref = transformers.BloomForCausalLM.from_pretrained(folder).eval()
    if isinstance(model, BloomForCausalLM):
        return ref, BloomForCausalLM.from_pretrained(folder).eval()
    return ref, ref


def _eos(theirs, ids, mask, step: int = 2) -> int:
    """A token greedy decoding of row 0 produces at `step`, so eos really fires."""
    new = theirs.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    return int(new[0, ids.shape[1] + step])


def _both(model, theirs, ids, seed: int | None = None, **kwargs):
    """Our generate on `model` and transformers' own, from the same random state."""
    ref_kwargs = dict(kwargs)
    if "ref_assistant" in kwargs:  # transformers' generate gets transformers' assistant
        ref_kwargs["assistant_model"] = ref_kwargs.pop("ref_assistant")
        del kwargs["ref_assistant"]
    if seed is not None:
        torch.manual_seed(seed)
    ours = generate(model, ids, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    return ours, theirs.generate(ids, **ref_kwargs)


def _assert_same_output(ours, ref) -> None:
    """sequences, scores, beam indices, attentions and hidden states of two generate outputs."""
    assert type(ours).__name__ == type(ref).__name__
    _assert_same_tokens(ours.sequences, ref.sequences)
    assert (ours.scores is None) == (ref.scores is None)
    if ref.scores is not None:
        assert len(ours.scores) == len(ref.scores)
        for step_ours, step_ref in zip(ours.scores, ref.scores):
            _assert_close(step_ours, step_ref)
    for name in ("beam_indices", "sequences_scores"):
        if getattr(ref, name, None) is not None:
            _assert_close(getattr(ours, name).float(), getattr(ref, name).float())
    for name in ("attentions", "hidden_states"):
        if getattr(ref, name) is not None:
            assert len(getattr(ours, name)) == len(getattr(ref, name))
            for step_ours, step_ref in zip(getattr(ours, name), getattr(ref, name)):
                assert len(step_ours) == len(step_ref)
                for layer_ours, layer_ref in zip(step_ours, step_ref):
                    assert layer_ours.shape == layer_ref.shape
                    _assert_close(layer_ours, layer_ref)


# --------------------------------------------------------------------------------------------------
# the mode table
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(do_sample=True),
        dict(penalty_alpha=0.6, top_k=4),
        dict(penalty_alpha=0.6, top_k=1),
        dict(num_beams=3),
        dict(num_beams=3, do_sample=True),
        dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
        dict(num_beams=2, force_words_ids=[[5]]),
        dict(num_beams=2, constraints=[]),
        dict(prompt_lookup_num_tokens=3),
        dict(prompt_lookup_num_tokens=3, do_sample=True),
    ],
)
def test_the_loop_is_chosen_as_transformers_chooses_it(kwargs):
    ref_config = transformers.GenerationConfig(**kwargs)
    ours = generation_mode(transformers.GenerationConfig(**kwargs))
    theirs = transformers.BloomForCausalLM._get_generation_mode(None, ref_config, None).value
    names = {
        "greedy_search": "greedy",
        "beam_search": "beam",
        "assisted_generation": "assisted",
        "contrastive_search": "contrastive",
        "constrained_beam_search": "constrained",
        "group_beam_search": "group_beam",
    }
    assert ours == names.get(theirs, theirs)


# --------------------------------------------------------------------------------------------------
# group (diverse) beam search
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.5, num_return_sequences=3),
        dict(
            num_beams=6,
            num_beam_groups=3,
            diversity_penalty=0.7,
            length_penalty=0.5,
            early_stopping=True,
            num_return_sequences=2,
        ),
        dict(
            num_beams=4,
            num_beam_groups=4,
            diversity_penalty=2.0,
            repetition_penalty=1.3,
            return_dict_in_generate=True,
            output_scores=True,
            output_attentions=True,
        ),
    ],
    ids=["4x2", "6x3-early", "4x4-dict"],
)
def test_group_beam_search_matches(model, theirs, kwargs):
    ids, mask = _prompts()
    eos = [_eos(theirs, ids, mask), 2]
    ours, ref = _both(
        model,
        theirs,
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        eos_token_id=eos,
        pad_token_id=PAD,
        **kwargs,
    )
    if "return_dict_in_generate" in kwargs:
        _assert_same_output(ours, ref)
    else:
        _assert_same_tokens(ours, ref)


def test_the_diversity_penalty_changes_what_later_groups_choose(model):
    ids, mask = _prompts()
    common = dict(
        attention_mask=mask,
        max_new_tokens=6,
        num_beams=4,
        num_return_sequences=4,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    plain = generate(model, ids, **common)
    diverse = generate(model, ids, num_beam_groups=4, diversity_penalty=100.0, **common)
    first_new = diverse[:, ids.shape[1]].view(3, 4)
    assert all(len(set(row.tolist())) == 4 for row in first_new)  # every group its own token
    assert not torch.equal(plain, diverse)


# --------------------------------------------------------------------------------------------------
# constrained beam search
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=3, force_words_ids=[[10, 11]]),
        dict(num_beams=4, force_words_ids=[[[10, 11], [12]], [20]], num_return_sequences=2),
        dict(
            num_beams=3,
            force_words_ids=[[30], [40, 41, 42]],
            length_penalty=0.5,
            return_dict_in_generate=True,
            output_scores=True,
        ),
    ],
    ids=["phrase", "choice-and-word", "two-phrases-dict"],
)
def test_constrained_beam_search_matches(model, theirs, kwargs):
    ids, mask = _prompts()
    eos = _eos(theirs, ids, mask)
    ours, ref = _both(
        model,
        theirs,
        ids,
        attention_mask=mask,
        max_new_tokens=9,
        eos_token_id=eos,
        pad_token_id=PAD,
        **kwargs,
    )
    if "return_dict_in_generate" in kwargs:
        _assert_same_output(ours, ref)
        ours = ours.sequences
    else:
        _assert_same_tokens(ours, ref)
    # what the constraints did: the text differs from beam search's; a lone phrase always fits
    plain = generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=9,
        eos_token_id=eos,
        pad_token_id=PAD,
        num_beams=kwargs["num_beams"],
    )
    assert not torch.equal(ours[:: kwargs.get("num_return_sequences", 1)], plain)
    if len(kwargs["force_words_ids"]) == 1:
        phrase = kwargs["force_words_ids"][0]
        for row in ours[:, ids.shape[1] :].tolist():
            assert any(row[i : i + len(phrase)] == phrase for i in range(len(row)))


def test_constraint_objects_of_either_library_work_in_either_generate(model, theirs):
    ids, mask = _prompts()
    common = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, pad_token_id=PAD)
    ours_objects = [PhrasalConstraint([10, 11]), DisjunctiveConstraint([[20, 21], [22]])]
    their_objects = [
        hf_constraints.PhrasalConstraint([10, 11]),
        hf_constraints.DisjunctiveConstraint([[20, 21], [22]]),
    ]
    expected = theirs.generate(ids, constraints=their_objects, **common)
    _assert_same_tokens(generate(model, ids, constraints=their_objects, **common), expected)
    _assert_same_tokens(generate(model, ids, constraints=ours_objects, **common), expected)
    _assert_same_tokens(theirs.generate(ids, constraints=ours_objects, **common), expected)


def test_constraint_states_equal_transformers_token_by_token():
    """Banks, completion and proposals of ConstraintListState, fed random sequences rich in the
    constraints' tokens (broken phrases, overlapping choices, stateful copies)."""
    specs = [("phrase", [5, 6, 7]), ("choice", [[5, 8], [6, 9, 9], [7]]), ("phrase", [8, 5])]
    make = {
        "ours": lambda kind, ids: (
            PhrasalConstraint if kind == "phrase" else DisjunctiveConstraint
        )(ids),
        "theirs": lambda kind, ids: (
            hf_constraints.PhrasalConstraint
            if kind == "phrase"
            else hf_constraints.DisjunctiveConstraint
        )(ids),
    }
    rng = random.Random(0)
    checked = 0
    for _ in range(200):
        sequence = [rng.choice([5, 6, 7, 8, 9, 10]) for _ in range(rng.randint(1, 12))]
        states = {}
        for lib, build in make.items():
            cls = ConstraintListState if lib == "ours" else hf_constraints.ConstraintListState
            states[lib] = cls([build(kind, ids) for kind, ids in specs])
        for token in sequence:
            copies = {lib: state.copy(stateful=True) for lib, state in states.items()}
            for lib in states:
                copies[lib].add(token)  # a stateful copy that advances (shares prefixes)
                states[lib].add(token)
            seen = [(s.get_bank(), s.completed, s.advance()) for s in states.values()]
            seen += [(s.get_bank(), s.completed, s.advance()) for s in copies.values()]
            assert seen[0] == seen[1] and seen[2] == seen[3], (sequence, seen)
            checked += 1
    assert checked > 500


# --------------------------------------------------------------------------------------------------
# contrastive search
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, batch",
    [
        (dict(penalty_alpha=0.6, top_k=4), 3),
        (dict(penalty_alpha=0.3, top_k=3, repetition_penalty=1.2), 3),
        (dict(penalty_alpha=0.6, top_k=4, low_memory=True), 1),
        (
            dict(
                penalty_alpha=0.5,
                top_k=3,
                return_dict_in_generate=True,
                output_scores=True,
                output_hidden_states=True,
                output_attentions=True,
            ),
            3,
        ),
    ],
    ids=["left-padded", "repetition", "low-memory", "dict"],
)
def test_contrastive_search_matches(model, theirs, kwargs, batch):
    ids, mask = _prompts()
    # no eos with return_dict: a finished row's padding is not what its cache holds
    eos = None if "return_dict_in_generate" in kwargs else _eos(theirs, ids, mask, step=4)
    ours, ref = _both(
        model,
        theirs,
        ids[:batch],
        attention_mask=mask[:batch],
        max_new_tokens=9,
        eos_token_id=eos,
        pad_token_id=PAD,
        **kwargs,
    )
    if "return_dict_in_generate" not in kwargs:
        _assert_same_tokens(ours, ref)
        low_memory = not kwargs.pop("low_memory", False)  # the other layout, at any batch size
        other = generate(model, ids, attention_mask=mask, max_new_tokens=9, eos_token_id=eos,
                         pad_token_id=PAD, low_memory=low_memory, **kwargs)  # fmt: skip
        _assert_same_tokens(other[:batch], ref)
        return
    _assert_same_output(ours, ref)
    # transformers 4.37 returns BLOOM's cache cut on the wrong axis here; ours is the cache of the
    # sequences without their last token, as a forward over them gives it.
    with torch.no_grad():
        sequences = ours.sequences[:, :-1]
        full_mask = torch.cat([mask, torch.ones_like(sequences[:, mask.shape[1] :])], 1)
        expected = theirs(sequences, attention_mask=full_mask).past_key_values
    kept = full_mask.repeat_interleave(model.config.n_head, dim=0).bool()  # [N * H, S]
    for (key, value), (ref_key, ref_value) in zip(ours.past_key_values, expected):
        # padding columns differ with the pass's length (their queries see no key: uniform weights)
        _assert_close(key.transpose(1, 2)[kept], ref_key.transpose(1, 2)[kept])
        _assert_close(value[kept], ref_value[kept])


# --------------------------------------------------------------------------------------------------
# assisted decoding
# --------------------------------------------------------------------------------------------------


class _CountingSource:
    """A model wrapped so its decoder counts the passes and the verified drafts."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.generation_config = model.generation_config
        self.passes, self.tokens_fed = 0, 0

    def make_decoder(self, rows, capacity, *, compile=None):
        decoder, counter = self.model.make_decoder(rows, capacity), self

        class Counting:
            def __getattr__(self, name):
                return getattr(decoder, name)

            def step(self, ids, **flags):
                counter.passes += 1
                counter.tokens_fed += ids.shape[1]
                return decoder.step(ids, **flags)

        return Counting()


@pytest.mark.parametrize("schedule", ["heuristic", "constant"])
@pytest.mark.parametrize("row", [0, 1], ids=["plain", "left-padded"])
def test_assisted_greedy_is_plain_greedy_and_matches(model, theirs, assistants, schedule, row):
    ids, mask = _prompts()
    ref_assistant, assistant = assistants
    for a in {id(ref_assistant): ref_assistant, id(assistant): assistant}.values():
        a.generation_config.num_assistant_tokens = 3
        a.generation_config.num_assistant_tokens_schedule = schedule
    eos = _eos(theirs, ids, mask, step=8)
    common = dict(
        attention_mask=mask[row : row + 1],
        max_new_tokens=12,
        eos_token_id=eos,
        pad_token_id=PAD,
        repetition_penalty=1.2,
    )
    ours, ref = _both(
        model,
        theirs,
        ids[row : row + 1],
        assistant_model=assistant,
        ref_assistant=ref_assistant,
        **common,
    )
    _assert_same_tokens(ours, ref)
    _assert_same_tokens(ours, theirs.generate(ids[row : row + 1], **common))


def test_assisted_decoding_verifies_several_drafts_per_pass(checkpoint):
    """The model itself as its own assistant: every draft is kept, so the model makes far fewer
    passes than tokens, and the heuristic schedule lengthens the drafts."""
    target = _CountingSource(BloomForCausalLM.from_pretrained(checkpoint).eval())
    assistant = BloomForCausalLM.from_pretrained(checkpoint).eval()
    ids, mask = _prompts()
    plain = generate(target.model, ids[:1], max_new_tokens=24, eos_token_id=None, pad_token_id=PAD)
    out = generate(
        target,
        ids[:1],
        assistant_model=assistant,
        max_new_tokens=24,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    _assert_same_tokens(out, plain)
    # drafts of 5 (verified by the prefill), 7, then 9 tokens: 6 + 8 + 10 = 24 tokens, 3 passes
    assert (target.passes, target.tokens_fed) == (2, 8 + 10)


@pytest.mark.parametrize(
    "kwargs",
    [dict(do_sample=True, top_k=20), dict(do_sample=True, temperature=0.8, top_p=0.9)],
    ids=["top-k", "temperature-top-p"],
)
def test_assisted_sampling_draws_as_transformers(model, theirs, assistants, kwargs):
    """Speculative sampling with the assistant's probabilities: same draws, same tokens."""
    ids, mask = _prompts()
    ref_assistant, assistant = assistants
    for a in {id(ref_assistant): ref_assistant, id(assistant): assistant}.values():
        a.generation_config.num_assistant_tokens = 4
        a.generation_config.num_assistant_tokens_schedule = "heuristic"
    for seed in (3, 4):
        ours, ref = _both(
            model,
            theirs,
            ids[1:2],
            seed=seed,
            assistant_model=assistant,
            ref_assistant=ref_assistant,
            attention_mask=mask[1:2],
            max_new_tokens=12,
            eos_token_id=None,
            pad_token_id=PAD,
            **kwargs,
        )
        _assert_same_tokens(ours, ref)


def test_assisted_outputs_match(model, theirs, assistants):
    """scores, attentions and hidden states per token (sliced as transformers slices them), and
    the model's cache of the sequence without its last token."""
    ids, mask = _prompts()
    ref_assistant, assistant = assistants
    ours, ref = _both(
        model,
        theirs,
        ids[1:2],
        assistant_model=assistant,
        ref_assistant=ref_assistant,
        attention_mask=mask[1:2],
        max_new_tokens=10,
        eos_token_id=None,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
        output_attentions=True,
        output_hidden_states=True,
    )
    _assert_same_output(ours, ref)
    for ours_layer, ref_layer in zip(ours.past_key_values, ref.past_key_values):
        for ours_cache, ref_cache in zip(ours_layer, ref_layer):
            _assert_close(ours_cache, ref_cache)


@pytest.mark.parametrize(
    "kwargs, seed",
    [(dict(), None), (dict(do_sample=True, top_k=10), 5), (dict(no_repeat_ngram_size=3), None)],
    ids=["greedy", "sampled", "ngram"],
)
def test_prompt_lookup_matches(model, theirs, kwargs, seed):
    ids, _ = _prompts()
    prompt = torch.cat([ids[:1, 2:], ids[:1, 2:], ids[:1, 2:4]], 1)  # repeats to look up
    ours, ref = _both(
        model,
        theirs,
        prompt,
        seed=seed,
        prompt_lookup_num_tokens=3,
        max_new_tokens=10,
        eos_token_id=None,
        pad_token_id=PAD,
        **kwargs,
    )
    _assert_same_tokens(ours, ref)
    if seed is None and not kwargs:
        _assert_same_tokens(
            ours, theirs.generate(prompt, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD)
        )


# --------------------------------------------------------------------------------------------------
# processors that need more than the config; beam sampling; eos and pad ids; inputs_embeds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prefix_allowed_tokens_fn=lambda b, row: list(range(5 + b, 60, 3 + int(row[-1]) % 3))),
        dict(prefix_allowed_tokens_fn=lambda b, row: [7 + b, 9, 11], num_beams=2),
        dict(forced_decoder_ids=[[9, 17], [11, 5]], begin_suppress_tokens=[40]),
        dict(guidance_scale=1.5),
        dict(guidance_scale=2.0, num_beams=2),
        dict(guidance_scale=1.5, penalty_alpha=0.5, top_k=3),
        dict(guidance_scale=1.5, use_cache=False),
    ],
    ids=[
        "prefix-fn",
        "prefix-fn-beams",
        "forced-ids",
        "cfg",
        "cfg-beams",
        "cfg-contrastive",
        "cfg-no-cache",
    ],
)
def test_config_free_processors_match(model, theirs, kwargs):
    ids, mask = _prompts()
    ours, ref = _both(
        model,
        theirs,
        ids,
        attention_mask=mask,
        max_new_tokens=7,
        pad_token_id=PAD,
        eos_token_id=None,
        **kwargs,
    )
    _assert_same_tokens(ours, ref)


def test_guidance_with_a_negative_prompt_matches(model, theirs):
    ids, mask = _prompts()
    negative = torch.tensor([[40, 41, 42], [3, 50, 51], [3, 3, 60]])
    negative_mask = (negative != PAD).long()
    common = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=PAD, guidance_scale=3.0)
    ours = generate(
        model,
        ids,
        negative_prompt_ids=negative,
        negative_prompt_attention_mask=negative_mask,
        **common,
    )
    ref = theirs.generate(
        ids, negative_prompt_ids=negative, negative_prompt_attention_mask=negative_mask, **common
    )
    _assert_same_tokens(ours, ref)
    assert not torch.equal(ours, generate(model, ids, **common))  # the negative prompt counts


def test_beam_sampling_outputs_match(model, theirs):
    ids, mask = _prompts()
    common = dict(
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=True,
        num_beams=3,
        num_return_sequences=2,
        top_k=30,
        eos_token_id=[_eos(theirs, ids, mask), 2],
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
    )
    ours, ref = _both(model, theirs, ids, seed=11, **common)
    _assert_same_output(ours, ref)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_beams=3),
        dict(do_sample=True),
        dict(penalty_alpha=0.6, top_k=3),
        dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
    ],
    ids=["greedy", "beam", "sample", "contrastive", "group-beam"],
)
@pytest.mark.parametrize("eos, pad", [(-1, 0), ([-1, -5], -1)], ids=["eos-1", "eos-list-pad-1"])
def test_a_negative_eos_never_stops(model, theirs, kwargs, eos, pad):
    """transformers accepts negative eos ids (no token matches them) and any int pad id."""
    ids, mask = _prompts()
    ours, ref = _both(
        model,
        theirs,
        ids,
        seed=2,
        attention_mask=mask,
        max_new_tokens=6,
        eos_token_id=eos,
        pad_token_id=pad,
        **kwargs,
    )
    _assert_same_tokens(ours, ref)
    assert ours.shape[1] == ids.shape[1] + 6


def test_a_negative_eos_never_stops_assisted_decoding(model, theirs, assistants):
    ids, _ = _prompts()
    ref_assistant, assistant = assistants
    ours, ref = _both(
        model,
        theirs,
        ids[:1],
        assistant_model=assistant,
        ref_assistant=ref_assistant,
        max_new_tokens=6,
        eos_token_id=-1,
        pad_token_id=0,
    )
    _assert_same_tokens(ours, ref)
    assert ours.shape[1] == ids.shape[1] + 6


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(with_ids=True), dict(num_beams=2), dict(with_mask=True), dict(do_sample=True)],
    ids=["embeds", "ids-and-embeds", "beams", "mask", "sampled"],
)
def test_inputs_embeds_match_transformers(model, theirs, kwargs):
    """transformers' decoder-only rule: the embeddings feed the first pass; the ids returned
    start with `input_ids` (or one bos token per row)."""
    ids, mask = _prompts()
    with torch.no_grad():
        embeds = theirs.transformer.word_embeddings(ids) * 1.5  # not any token's embedding
    extra = {}
    if kwargs.pop("with_ids", False):
        extra["input_ids"] = ids[:, :2]
    if kwargs.pop("with_mask", False):
        extra["attention_mask"] = mask
    common = dict(inputs_embeds=embeds, max_new_tokens=6, pad_token_id=PAD, eos_token_id=None)
    torch.manual_seed(1)
    ours = generate(model, **common, **extra, **kwargs)
    torch.manual_seed(1)
    _assert_same_tokens(ours, theirs.generate(**common, **extra, **kwargs))


def test_the_loops_drive_the_decoder_through_the_protocol():
    """Prompt lookup on a fake decoder: drafts are verified in one step with num_logits = k + 1,
    and rejected columns are cropped."""
    calls = []

    class Recording:
        def prefill(self, ids, mask, **flags):
            calls.append(("prefill", ids.shape[1], flags.get("num_logits")))
            return self._next(ids, flags.get("num_logits", 1))

        def step(self, ids, **flags):
            calls.append(("step", ids.shape[1], flags.get("num_logits")))
            return self._next(ids, flags.get("num_logits", 1))

        def _next(self, ids, k):  # the model says token + 1, unless the token is 7
            logits = torch.nn.functional.one_hot(torch.where(ids == 7, 0, ids + 1) % 10, 10)
            return type("Out", (), {"logits": logits[:, -k:].float()})()

        def crop(self, length):
            calls.append(("crop", length))

        def legacy_cache(self):
            return None

    class Source:
        config = type(
            "C",
            (),
            {"eos_token_id": None, "pad_token_id": None, "bos_token_id": 0, "vocab_size": 10},
        )()
        generation_config = None

        def make_decoder(self, rows, capacity, *, compile=None):
            return Recording()

    out = generate(
        Source(), torch.tensor([[5, 6, 7, 8, 5, 6]]), prompt_lookup_num_tokens=3, max_new_tokens=4
    )
    # lookup proposes 7 8 5 after "5 6"; the model says 7, then 0 (not 8): one match, then 0
    assert out.tolist() == [[5, 6, 7, 8, 5, 6, 7, 0, 1, 2]]
    assert calls[:3] == [("crop", 0), ("prefill", 9, 4), ("crop", 7)]
    assert all(c[0] != "step" or c[2] == c[1] for c in calls)  # every fed token is verified


class _Recording:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens += value.reshape(-1).tolist()

    def end(self):
        self.ended = True


@pytest.mark.parametrize(
    "kwargs",
    [dict(penalty_alpha=0.6, top_k=4), dict(prompt_lookup_num_tokens=2), dict(assistant=True)],
    ids=["contrastive", "prompt-lookup", "assisted"],
)
def test_a_streamer_sees_every_token_once(model, assistants, kwargs):
    ids, _ = _prompts()
    if kwargs.pop("assistant", False):
        kwargs["assistant_model"] = assistants[1]
    streamer = _Recording()
    out = generate(model, ids[:1], streamer=streamer, max_new_tokens=9, eos_token_id=None,
                   pad_token_id=PAD, **kwargs)  # fmt: skip
    assert streamer.tokens == out[0].tolist() and streamer.ended

"""Every bloomlm output follows transformers 4.37's ModelOutput rule, the generate outputs included.

transformers' ModelOutput is an OrderedDict of the fields that are set: iterating and unpacking give
their names, `out[i]` / `out[a:b]` / `to_tuple()` their values, `out["name"]` raises KeyError for a
field that is None. Each check builds ours and theirs from the same tensor objects and compares
every view (values by identity).
"""

from __future__ import annotations

import pytest
import torch
from transformers import modeling_outputs as hf_outputs
from transformers.generation import utils as hf_generation

from bloomlm import BloomConfig
from bloomlm import outputs as our_outputs
from bloomlm.torch import generate as our_generation
from bloomlm.torch.model import BloomForCausalLM

T = [torch.zeros(1) + i for i in range(6)]  # distinct objects, compared by identity

CASES = {
    "causal_lm_all_set": (
        our_outputs.CausalLMOutputWithCrossAttentions,
        hf_outputs.CausalLMOutputWithCrossAttentions,
        dict(
            loss=T[0],
            logits=T[1],
            past_key_values=(T[2],),
            hidden_states=(T[3],),
            attentions=(T[4],),
        ),
    ),
    "causal_lm_logits_only": (
        our_outputs.CausalLMOutputWithCrossAttentions,
        hf_outputs.CausalLMOutputWithCrossAttentions,
        dict(logits=T[1]),
    ),
    "base_model_with_gaps": (
        our_outputs.BaseModelOutputWithPastAndCrossAttentions,
        hf_outputs.BaseModelOutputWithPastAndCrossAttentions,
        dict(last_hidden_state=T[0], attentions=(T[1],)),
    ),
    "question_answering": (
        our_outputs.QuestionAnsweringModelOutput,
        hf_outputs.QuestionAnsweringModelOutput,
        dict(start_logits=T[0], end_logits=T[1]),
    ),
    "generate_greedy": (
        our_generation.GenerateDecoderOnlyOutput,
        hf_generation.GenerateDecoderOnlyOutput,
        dict(sequences=T[0], scores=(T[1], T[2]), past_key_values=((T[3], T[4]),)),
    ),
    "generate_beam": (
        our_generation.GenerateBeamDecoderOnlyOutput,
        hf_generation.GenerateBeamDecoderOnlyOutput,
        dict(sequences=T[0], sequences_scores=T[1], beam_indices=T[2]),
    ),
}


def _same(a, b) -> bool:
    """Equal structure, and the same objects at the leaves."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b


@pytest.mark.parametrize("ours_cls, theirs_cls, fields", CASES.values(), ids=CASES.keys())
def test_output_views_match_transformers(ours_cls, theirs_cls, fields):
    ours, theirs = ours_cls(**fields), theirs_cls(**fields)
    names = list(fields)
    assert list(ours) == list(theirs) == names, "iterating must yield the set fields' names"
    first, *rest = ours
    assert [first, *rest] == names, "unpacking goes over the names, as a dict's"
    assert len(ours) == len(theirs) == len(names)
    assert list(ours.keys()) == list(theirs.keys())
    assert _same(list(ours.values()), list(theirs.values()))
    assert _same(ours.to_tuple(), theirs.to_tuple())
    assert _same(ours[0], theirs[0]) and _same(ours[1:], theirs[1:])
    assert _same(ours[names[-1]], theirs[names[-1]])
    assert dict(ours).keys() == dict(theirs).keys()
    for name in {f for f in ours_cls.__dataclass_fields__} - set(names):
        assert name not in ours and name not in theirs
        assert ours.get(name, "absent") == theirs.get(name, "absent") == "absent"
        for out in (ours, theirs):
            with pytest.raises(KeyError):
                out[name]


def test_model_and_generate_outputs_iterate_over_names():
    """The real calls: a forward and a generate with return_dict_in_generate."""
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=4)).eval()
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        out = model(ids)
    assert list(out) == ["logits", "past_key_values"]
    assert _same(out.to_tuple(), (out.logits, out.past_key_values))
    generated = model.generate(
        ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    assert list(generated) == ["sequences", "scores", "past_key_values"]
    assert _same(generated[0], generated.sequences) and len(generated["scores"]) == 2
    with pytest.raises(KeyError):
        generated["attentions"]


def test_flax_outputs_follow_the_same_rule():
    from bloomlm.flax import outputs as flax_outputs

    out = flax_outputs.FlaxCausalLMOutput(logits=T[0], hidden_states=(T[1],))
    assert list(out) == ["logits", "hidden_states"]
    assert _same(out.to_tuple(), (T[0], (T[1],)))

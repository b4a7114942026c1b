"""The heads' semantics against transformers 4.37.2: losses and their gradients, and the places
where transformers 4.37 is wrong and bloomlm must not copy it (each asserts bloomlm's behaviour).

transformers defects covered here, by SPEC/issue letter:
(a) pretraining_tp > 1 with slow_but_exact=True drops two biases;
(b) sequence classification pools the token before the first pad id, even inside a row;
(c) the inferred problem_type is written into the config and sticks;
(e) a cache with fewer layers than the model is silently accepted;
(f) position_ids in question answering warns on every call.
(d) (tuples dropping hidden_states) is in test_torch_parity.py::test_return_dict_false_tuples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    FP32_TOL,
    GRAD_TOL,
    PAD_ID,
    assert_close,
    compare_outputs,
    forward_kwargs,
    make_inputs,
    ours_cls,
    ref_cls,
    reference_overrides,
)

# transformers' QA passes position_ids=None to its body, which then warns on every call (defect (f))
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:`position_ids` have no functionality in BLOOM:FutureWarning"
    ),
    pytest.mark.usefixtures("one_thread"),
]

SEQ = "BloomForSequenceClassification"
BATCH, LENGTH = 3, 7


# ---------------------------------------------------------------------------------------------
# Losses and gradients.


def _gen(seed: int = 11) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def causal_labels(input_ids, mask):
    labels = input_ids.clone()
    labels[mask == 0] = -100
    labels[0, 3] = -100
    return {"labels": labels}


def float_labels(*shape):
    return lambda input_ids, mask: {"labels": torch.randn(*shape, generator=_gen())}


def binary_labels(input_ids, mask):
    return {"labels": torch.randint(0, 2, (BATCH, 3), generator=_gen()).float()}


def class_labels(input_ids, mask):
    return {"labels": torch.tensor([2, 0, 1])}


def token_labels(input_ids, mask):
    labels = torch.randint(0, 5, (BATCH, LENGTH), generator=_gen())
    labels[mask == 0] = -100
    labels[1, -1] = -100
    return {"labels": labels}


def span_positions(start, end):
    return lambda input_ids, mask: {
        "start_positions": torch.tensor(start),
        "end_positions": torch.tensor(end),
    }


# name -> (config, arch, checkpoint overrides, from_pretrained overrides, labels)
LOSS_CASES = {
    "causal_lm": ("pow2", "BloomForCausalLM", {}, {}, causal_labels),
    "causal_lm_untied": ("untied", "BloomForCausalLM", {}, {}, causal_labels),
    "causal_lm_odd_heads": ("odd_heads", "BloomForCausalLM", {}, {}, causal_labels),
    "causal_lm_post_ln": ("post_ln", "BloomForCausalLM", {}, {}, causal_labels),
    "causal_lm_tp2_exact": ("tp2_exact", "BloomForCausalLM", {}, {}, causal_labels),
    "seq_regression": ("pow2", SEQ, {"num_labels": 1}, {}, float_labels(BATCH)),
    "seq_regression_column_labels": ("pow2", SEQ, {"num_labels": 1}, {}, float_labels(BATCH, 1)),
    "seq_single_label": ("pow2", SEQ, {"num_labels": 3}, {}, class_labels),
    "seq_multi_label": ("pow2", SEQ, {"num_labels": 3}, {}, binary_labels),
    # problem_type given explicitly, through from_pretrained and through config.json
    "seq_explicit_regression": (
        "pow2",
        SEQ,
        {"num_labels": 3},
        {"problem_type": "regression"},
        float_labels(BATCH, 3),
    ),
    "seq_explicit_single_label": (
        "pow2",
        SEQ,
        {"num_labels": 3},
        {"problem_type": "single_label_classification"},
        class_labels,
    ),
    "seq_explicit_multi_label": (
        "odd_heads",
        SEQ,
        {"num_labels": 3},
        {"problem_type": "multi_label_classification"},
        binary_labels,
    ),
    "seq_regression_in_config": (
        "pow2",
        SEQ,
        {"num_labels": 3, "problem_type": "regression"},
        {},
        binary_labels,
    ),
    "token_classification": (
        "pow2",
        "BloomForTokenClassification",
        {"num_labels": 5},
        {},
        token_labels,
    ),
    "token_classification_post_ln": (
        "post_ln",
        "BloomForTokenClassification",
        {"num_labels": 5},
        {},
        token_labels,
    ),
    "qa_in_range": (
        "pow2",
        "BloomForQuestionAnswering",
        {},
        {},
        span_positions([1, 4, 6], [3, 6, 6]),
    ),
    # clamped to [0, LENGTH]: LENGTH and beyond are ignored, negatives become 0
    "qa_out_of_range": (
        "pow2",
        "BloomForQuestionAnswering",
        {},
        {},
        span_positions([1, 50, -3], [LENGTH, 6, 2]),
    ),
    "qa_column_positions": (
        "odd_heads",
        "BloomForQuestionAnswering",
        {},
        {},
        span_positions([[1], [2], [0]], [[3], [9], [5]]),
    ),
}


# "default": the call users make; "attentions": output_attentions=True, which an implementation may
# serve by another code path (bloomlm: eager attention instead of fused SDPA)
@pytest.mark.parametrize("path", ["default", "attentions"])
@pytest.mark.parametrize("case", LOSS_CASES)
def test_loss_and_gradients(make_checkpoint, case, path):
    config_name, arch, checkpoint_overrides, load, make_labels = LOSS_CASES[case]
    folder = make_checkpoint(config_name, arch, **checkpoint_overrides)
    ours = ours_cls(arch).from_pretrained(folder, **load)
    ref = ref_cls(arch).from_pretrained(folder, **load, **reference_overrides(config_name))
    input_ids, mask = make_inputs(ours.config.vocab_size, "left", batch=BATCH, seq=LENGTH)
    kwargs = forward_kwargs(
        arch, None, input_ids=input_ids, attention_mask=mask, **make_labels(input_ids, mask)
    )
    kwargs["output_attentions"] = path == "attentions"
    ours_out, ref_out = ours(**kwargs), ref(**kwargs)
    assert ours_out.loss.dim() == 0 and torch.isfinite(ref_out.loss)
    compare_outputs(ours_out, ref_out, arch, query_mask=mask, kv_mask=mask)
    ours_out.loss.backward()
    ref_out.loss.backward()
    ours_params, ref_params = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert set(ours_params) == set(ref_params)
    checked = 0
    for name, ref_param in ref_params.items():
        if ref_param.grad is None:
            assert ours_params[name].grad is None or not ours_params[name].grad.any(), name
            continue
        assert_close(ours_params[name].grad, ref_param.grad, GRAD_TOL, name=f"grad {name}")
        checked += 1
    assert checked >= len(ref_params) - 1  # every parameter takes part (QA's body end aside)


def test_causal_lm_loss_ignores_minus_100(load_pair):
    ours, _ = load_pair("pow2", "BloomForCausalLM")
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    labels = causal_labels(input_ids, mask)["labels"]
    with torch.no_grad():
        out = ours(input_ids, attention_mask=mask, labels=labels)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    kept = targets != -100
    expected = F.cross_entropy(logits[kept], targets[kept])
    assert_close(out.loss, expected, FP32_TOL, name="loss")


# ---------------------------------------------------------------------------------------------
# (a) pretraining_tp=2, slow_but_exact=True: the biases are added.


@pytest.mark.parametrize("arch", ["BloomModel", "BloomForCausalLM", SEQ])
def test_slow_but_exact_keeps_biases(make_checkpoint, arch):
    folder = make_checkpoint("tp2_exact", arch)
    exact = ours_cls(arch).from_pretrained(folder)
    assert exact.config.pretraining_tp == 2 and exact.config.slow_but_exact is True
    fast = ours_cls(arch).from_pretrained(folder, slow_but_exact=False)
    ref_fast = ref_cls(arch).from_pretrained(folder, slow_but_exact=False)
    ref_defective = ref_cls(arch).from_pretrained(folder)  # slow_but_exact=True: biases dropped
    input_ids, mask = make_inputs(exact.config.vocab_size, "left")
    field = "last_hidden_state" if arch == "BloomModel" else "logits"
    token_mask = None if arch == SEQ else mask
    for output_attentions in (False, True):
        kwargs = dict(input_ids=input_ids, attention_mask=mask, output_attentions=output_attentions)
        with torch.no_grad():
            outputs = {
                name: getattr(model(**kwargs), field)
                for name, model in [
                    ("exact", exact),
                    ("fast", fast),
                    ("ref", ref_fast),
                    ("defect", ref_defective),
                ]
            }
        assert_close(
            outputs["exact"], outputs["fast"], FP32_TOL, token_mask, name="slow_but_exact vs fast"
        )
        assert_close(
            outputs["exact"], outputs["ref"], FP32_TOL, token_mask, name="vs transformers, fast"
        )
        # the fixture's biases are large enough that dropping them shows
        assert (outputs["defect"] - outputs["ref"]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# (b) sequence classification pools the last non-pad token, whatever sits inside the row.


def test_sequence_classification_pools_last_non_pad_token(load_pair):
    ours, ref = load_pair("pow2", SEQ)
    P = PAD_ID
    input_ids = torch.tensor(
        [
            [5, P, 7, 9, 11, 12, 13],  # pad id inside, no padding: last token
            [5, P, 7, 9, P, P, P],  # pad id inside, right padding
            [P, P, 5, P, 7, 8, 9],  # left padding, pad id inside
            [6, 7, P, P, 9, P, P],  # pad ids used as tokens (mask 1), then right padding
        ]
    )
    attention_mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 0, 0],
        ]
    )
    last = torch.tensor([6, 3, 6, 4])
    with torch.no_grad():
        hidden = ref.transformer(input_ids, attention_mask=attention_mask).last_hidden_state
        expected = ref.score(hidden)[torch.arange(4), last]
        out = ours(input_ids, attention_mask=attention_mask, labels=torch.tensor([0, 1, 1, 0]))
        defective = ref(input_ids, attention_mask=attention_mask).logits
    assert_close(out.logits, expected, FP32_TOL, name="pooled logits")
    assert_close(
        out.loss, F.cross_entropy(expected, torch.tensor([0, 1, 1, 0])), FP32_TOL, name="loss"
    )
    # transformers pools the token before the first pad id: rows 0 and 1 differ there
    assert (defective[0] - expected[0]).abs().max() > 1e-3


def test_sequence_classification_without_pad_token(make_checkpoint):
    folder = make_checkpoint("pow2", SEQ, pad_token_id=None)
    ours = ours_cls(SEQ).from_pretrained(folder)
    ref = ref_cls(SEQ).from_pretrained(folder)
    assert ours.config.pad_token_id is None
    input_ids, _ = make_inputs(ours.config.vocab_size)
    with pytest.raises(ValueError, match="pad"):
        ours(input_ids)
    with torch.no_grad():  # one row: its last token
        assert_close(ours(input_ids[:1]).logits, ref(input_ids[:1]).logits, FP32_TOL, name="logits")


# ---------------------------------------------------------------------------------------------
# (c) problem_type is inferred per call and never written into the config.


def test_problem_type_inferred_per_call(make_checkpoint):
    folder = make_checkpoint("pow2", SEQ, num_labels=3)
    ours = ours_cls(SEQ).from_pretrained(folder)
    assert ours.config.problem_type is None
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    int_labels = class_labels(input_ids, mask)["labels"]
    float_labels = binary_labels(input_ids, mask)["labels"]
    for labels, loss_fn in [
        (int_labels, F.cross_entropy),
        (float_labels, F.binary_cross_entropy_with_logits),
        (int_labels, F.cross_entropy),
    ]:
        with torch.no_grad():
            out = ours(input_ids, attention_mask=mask, labels=labels)
            ref_out = ref_cls(SEQ).from_pretrained(folder)(
                input_ids, attention_mask=mask, labels=labels
            )
        assert_close(
            out.loss, loss_fn(out.logits, labels), FP32_TOL, name=f"loss for {labels.dtype} labels"
        )
        assert_close(out.loss, ref_out.loss, FP32_TOL, name="vs a fresh transformers model")
        assert ours.config.problem_type is None, (
            "the inferred problem_type must not be written into the config"
        )


# ---------------------------------------------------------------------------------------------
# (e) a cache for another number of layers is refused.


@pytest.mark.parametrize(
    "arch", ["BloomModel", "BloomForCausalLM", SEQ, "BloomForTokenClassification"]
)
@pytest.mark.parametrize("layers", ["fewer", "more"])
def test_cache_with_wrong_layer_count_raises(load_pair, arch, layers):
    ours, _ = load_pair("odd_heads", arch)  # 3 layers
    input_ids, _ = make_inputs(ours.config.vocab_size)
    body = (
        ours if arch == "BloomModel" else ours.transformer
    )  # token classification returns no cache
    with torch.no_grad():
        cache = body(input_ids, use_cache=True).past_key_values
    assert len(cache) == 3
    bad = cache[:-1] if layers == "fewer" else cache + cache[:1]
    with pytest.raises(ValueError, match="(?i)layer"):
        ours(input_ids[:, :1], past_key_values=bad, use_cache=True)


# ---------------------------------------------------------------------------------------------
# (f) position_ids: accepted, no effect, and in QA warned about once per process.


@pytest.mark.parametrize(
    "arch",
    [
        "BloomModel",
        "BloomForCausalLM",
        SEQ,
        "BloomForTokenClassification",
        "BloomForQuestionAnswering",
    ],
)
def test_position_ids_have_no_effect(load_pair, arch):
    ours, _ = load_pair("pow2", arch)
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids) * 3
    field = "last_hidden_state" if arch == "BloomModel" else "logits"
    field = "start_logits" if arch == "BloomForQuestionAnswering" else field
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = getattr(ours(input_ids, attention_mask=mask), field)
        with_positions = getattr(
            ours(input_ids, attention_mask=mask, position_ids=position_ids), field
        )
    assert torch.equal(plain, with_positions)


WARN_ONCE_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import bloomlm

    folder = sys.argv[1]
    ids = torch.randint(4, 100, (2, 5))
    positions = torch.arange(5).expand(2, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # "once" must not depend on the warning filters
        first = bloomlm.BloomForQuestionAnswering.from_pretrained(folder)
        second = bloomlm.BloomForQuestionAnswering.from_pretrained(folder)
        with torch.no_grad():
            plain = first(ids)
            counts = [sum("position_ids" in str(w.message) for w in caught)]
            for model in (first, first, second):
                model(ids, position_ids=positions)
                counts.append(sum("position_ids" in str(w.message) for w in caught))
    print(json.dumps(counts))
    """
)


def test_question_answering_position_ids_warn_once_per_process(make_checkpoint):
    """A fresh process: no call warns without position_ids, the first with them warns,
    no later one."""
    import bloomlm

    folder = make_checkpoint("pow2", "BloomForQuestionAnswering")
    package_root = os.path.dirname(os.path.dirname(bloomlm.__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", WARN_ONCE_SCRIPT, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts == [0, 1, 1, 1], (
        f"position_ids warnings after each call: {counts} (expected [0, 1, 1, 1])"
    )


# ---------------------------------------------------------------------------------------------
# Signatures: users call forward positionally, so the order is transformers' exactly.

HEADS = ("BloomForCausalLM", SEQ, "BloomForTokenClassification", "BloomForQuestionAnswering")


@pytest.mark.parametrize("arch", ("BloomModel", *HEADS))
def test_forward_signature_is_transformers_positional_order(arch):
    import inspect

    def positional(cls):
        parameters = inspect.signature(cls.forward).parameters.values()
        return [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]

    assert positional(ours_cls(arch)) == positional(ref_cls(arch))
    keyword_only = [
        p.name
        for p in inspect.signature(ours_cls(arch).forward).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    ]
    assert keyword_only == (["num_logits_to_keep"] if arch == "BloomForCausalLM" else [])


@pytest.mark.parametrize("arch", HEADS)
def test_every_argument_positionally_equals_keywords(load_pair, arch):
    """All ten arguments by position (return_dict=False last) give what the keywords give."""
    ours, _ = load_pair("pow2", arch)
    input_ids, mask = make_inputs(128, "left", BATCH, LENGTH, seed=5)
    if arch == "BloomForQuestionAnswering":
        spans = torch.tensor([1, 2, 0]), torch.tensor([3, 4, 6])
        args = (input_ids, mask, None, None, None, *spans, True, True, False)
        kwargs = dict(attention_mask=mask, start_positions=spans[0], end_positions=spans[1])
    else:
        labels = input_ids if arch != SEQ else torch.tensor([0, 1, 0])
        labels = labels if arch != "BloomForTokenClassification" else input_ids % 2
        args = (input_ids, None, mask, None, None, labels, True, True, True, False)
        kwargs = dict(attention_mask=mask, labels=labels, use_cache=True)
    by_position = ours(*args)
    by_keyword = ours(input_ids, **kwargs, output_attentions=True, output_hidden_states=True)
    assert isinstance(by_position, tuple) and not isinstance(by_keyword, tuple)
    assert len(by_position) == len(by_keyword.to_tuple()) >= 4
    assert_close(by_position[0], by_keyword.loss, 0.0, name="loss")
    assert_close(by_position[1], by_keyword[1], 0.0, name="logits")


def test_num_logits_to_keep_is_keyword_only_and_checked(load_pair):
    ours, _ = load_pair("pow2", "BloomForCausalLM")
    input_ids, mask = make_inputs(128, "left", BATCH, LENGTH, seed=5)
    full = ours(input_ids, attention_mask=mask).logits
    last = ours(input_ids, attention_mask=mask, num_logits_to_keep=2).logits
    assert last.shape == (BATCH, 2, full.shape[-1])
    assert_close(last, full[:, -2:], FP32_TOL, name="last two positions")
    with pytest.raises(TypeError):
        ours(input_ids, None, mask, None, None, None, None, None, None, None, 1)
    with pytest.raises(ValueError, match="num_logits_to_keep must be >= 0"):
        ours(input_ids, num_logits_to_keep=-1)
    with pytest.raises(TypeError, match="num_logits_to_keep must be an int"):
        ours(input_ids, num_logits_to_keep=1.5)

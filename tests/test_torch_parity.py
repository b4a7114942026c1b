"""bloomlm's PyTorch classes against transformers 4.37.2 on the same checkpoint folders.

Every class x tiny config: plain, left- and right-padded forwards with every output field;
incremental decoding and caches exchanged both ways; head masks; inputs_embeds; return_dict=False
tuples; dropout; dtypes; checkpoint round trips in every format. Losses, gradients and the heads'
own semantics (including transformers' defects we do not copy) are in test_heads.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import (
    ARCHS,
    BF16_TOL,
    FP16_TOL,
    FP32_TOL,
    MAIN_FIELD,
    OUTPUT_FIELDS,
    PAD_ID,
    TINY_CONFIGS,
    assert_cache_close,
    assert_close,
    assert_tree_close,
    build_reference,
    compare_outputs,
    forward_kwargs,
    make_inputs,
    ours_cls,
    ref_cls,
)

# transformers' QA passes position_ids=None to its body, which then warns on every call
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:`position_ids` have no functionality in BLOOM:FutureWarning"
    ),
    pytest.mark.usefixtures("one_thread"),
]

CACHE_ARCHS = ("BloomModel", "BloomForCausalLM", "BloomForSequenceClassification")
HEAD_ARCHS = ARCHS[1:]


def run_both(ours, ref, arch: str, **kwargs):
    with torch.no_grad():
        return ours(**kwargs), ref(**kwargs)


# ---------------------------------------------------------------------------------------------
# The fixture itself: random weights that would expose a dropped bias or an ignored LayerNorm.


@pytest.mark.parametrize("config_name", TINY_CONFIGS)
def test_fixture_weights_are_informative(config_name):
    model = build_reference(config_name, "BloomForCausalLM").float()
    named = dict(model.named_parameters())
    assert named["transformer.h.0.self_attention.dense.bias"].abs().min() > 0
    assert (named["transformer.ln_f.weight"] - 1).abs().max() > 0.05
    input_ids, mask = make_inputs(model.config.vocab_size, seq=12)
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, output_attentions=True)
    assert out.logits.std() > 0.5
    probs = out.attentions[-1][:, :, -1, :]  # last query attends to 12 keys
    entropy = -(probs.clamp_min(1e-12).log() * probs).sum(-1)
    assert entropy.min() < 0.7 * torch.log(torch.tensor(12.0)), "attention is close to uniform"


# ---------------------------------------------------------------------------------------------
# Forward parity: every class x config x padding, every output field.


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config_name", TINY_CONFIGS)
def test_forward_parity(load_pair, config_name, arch, padding):
    ours, ref = load_pair(config_name, arch)
    input_ids, mask = make_inputs(ours.config.vocab_size, padding)
    kwargs = forward_kwargs(
        arch,
        input_ids=input_ids,
        attention_mask=mask,
        output_hidden_states=True,
        output_attentions=True,
    )
    ours_out, ref_out = run_both(ours, ref, arch, **kwargs)
    compare_outputs(ours_out, ref_out, arch, query_mask=mask, kv_mask=mask)
    # without attentions an implementation may take another (fused) path: same numbers
    kwargs["output_attentions"] = False
    ours_fast, ref_fast = run_both(ours, ref, arch, **kwargs)
    compare_outputs(ours_fast, ref_fast, arch, query_mask=mask, kv_mask=mask)
    n_layer, n_head = ref.config.n_layer, ref.config.n_head
    batch, seq = input_ids.shape
    head_dim = ref.config.hidden_size // n_head
    assert [tuple(a.shape) for a in ours_out.attentions] == [(batch, n_head, seq, seq)] * n_layer
    assert len(ours_out.hidden_states) == n_layer + 1
    if arch in ("BloomModel", "BloomForCausalLM", "BloomForSequenceClassification"):
        for key, value in ours_out.past_key_values:
            assert tuple(key.shape) == (batch * n_head, head_dim, seq)
            assert tuple(value.shape) == (batch * n_head, seq, head_dim)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_call_matches(load_pair, arch):
    """Positional input_ids and nothing else: the config's defaults decide every flag,
    as in transformers."""
    ours, ref = load_pair("pow2", arch)
    input_ids, _ = make_inputs(ours.config.vocab_size)
    with torch.no_grad():
        ours_out, ref_out = ours(input_ids), ref(input_ids)
    compare_outputs(ours_out, ref_out, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_is_invisible(load_pair, arch):
    """ALiBi positions come from the cumulative mask:
    a left-padded row equals the same row unpadded."""
    ours, _ = load_pair("odd_heads", arch)
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    row = 2
    n_pad = int((mask[row] == 0).sum())
    with torch.no_grad():
        padded = ours(input_ids, attention_mask=mask)
        alone = ours(input_ids[row : row + 1, n_pad:])
    field = MAIN_FIELD[arch]
    expected = getattr(alone, field)[0]
    got = getattr(padded, field)[row]
    if arch != "BloomForSequenceClassification":
        got = got[n_pad:]
    assert_close(got, expected, FP32_TOL, name=field)


# ---------------------------------------------------------------------------------------------
# Incremental decoding with the cache; caches exchanged with transformers both ways.


def _clone_cache(cache):
    return tuple((key.clone(), value.clone()) for key, value in cache)


@pytest.mark.parametrize("arch", CACHE_ARCHS)
@pytest.mark.parametrize("config_name", ["pow2", "odd_heads", "untied", "tp2_exact", "post_ln"])
def test_incremental_decoding_equals_full_forward(load_pair, config_name, arch):
    ours, ref = load_pair(config_name, arch)
    input_ids, mask = make_inputs(ours.config.vocab_size, "left", seq=9)
    prefix = 5  # every row keeps at least one real token in the prefix
    field = MAIN_FIELD[arch]
    with torch.no_grad():
        full = ours(input_ids, attention_mask=mask, use_cache=True)
        ref_full = ref(input_ids, attention_mask=mask, use_cache=True)
        first = ours(input_ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
        one = ours(
            input_ids[:, prefix : prefix + 1],
            past_key_values=first.past_key_values,
            attention_mask=mask[:, : prefix + 1],
            use_cache=True,
        )
        several = ours(
            input_ids[:, prefix + 1 :],
            past_key_values=one.past_key_values,
            attention_mask=mask,
            use_cache=True,
        )
    compare_outputs(full, ref_full, arch, query_mask=mask, kv_mask=mask)
    assert_cache_close(several.past_key_values, full.past_key_values, FP32_TOL, kv_mask=mask)
    if arch == "BloomForSequenceClassification":  # pooled: the last new token is the last token
        assert_close(several.logits, full.logits, FP32_TOL, name="pooled logits")
    else:
        assert_close(
            getattr(one, field), getattr(full, field)[:, prefix : prefix + 1], FP32_TOL, name=field
        )
        assert_close(
            getattr(several, field), getattr(full, field)[:, prefix + 1 :], FP32_TOL, name=field
        )


@pytest.mark.parametrize("output_attentions", [False, True])
@pytest.mark.parametrize(
    "direction", ["transformers_cache_into_ours", "our_cache_into_transformers"]
)
@pytest.mark.parametrize("arch", CACHE_ARCHS)
@pytest.mark.parametrize("config_name", ["pow2", "odd_heads"])
def test_cache_exchange(load_pair, config_name, arch, direction, output_attentions):
    ours, ref = load_pair(config_name, arch)
    input_ids, mask = make_inputs(ours.config.vocab_size, "left", seq=9)
    prefix = 5
    producer = ref if direction == "transformers_cache_into_ours" else ours
    with torch.no_grad():
        cache = producer(
            input_ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True
        ).past_key_values
    pristine = _clone_cache(cache)
    for new in (slice(prefix, prefix + 1), slice(prefix, None)):  # one token, then several
        kwargs = dict(
            input_ids=input_ids[:, new],
            past_key_values=cache,
            attention_mask=mask[:, : new.stop],
            use_cache=True,
            output_hidden_states=True,
            output_attentions=output_attentions,
        )
        ours_out, ref_out = run_both(ours, ref, arch, **kwargs)
        kv_mask = mask[:, : new.stop]
        compare_outputs(ours_out, ref_out, arch, kv_mask=kv_mask)
        # a cache passed in is read, never written: the caller may reuse it
        assert_tree_close(cache, pristine, 0.0, name="cache passed in")


def test_cache_from_incremental_steps_feeds_transformers(load_pair):
    """Our cache after several steps (not just one prefill) continues in transformers."""
    ours, ref = load_pair("post_ln", "BloomForCausalLM")
    input_ids, mask = make_inputs(ours.config.vocab_size, "left", seq=10)
    with torch.no_grad():
        cache = ours(input_ids[:, :5], attention_mask=mask[:, :5]).past_key_values
        for t in range(5, 8):
            cache = ours(
                input_ids[:, t : t + 1], past_key_values=cache, attention_mask=mask[:, : t + 1]
            ).past_key_values
        ref_next = ref(input_ids[:, 8:], past_key_values=cache, attention_mask=mask)
        full = ref(input_ids, attention_mask=mask)
    assert_close(ref_next.logits, full.logits[:, 8:], FP32_TOL, name="logits")


# ---------------------------------------------------------------------------------------------
# head_mask and inputs_embeds.


def _head_mask(config, kind: str) -> torch.Tensor:
    if kind == "per_head":
        head_mask = torch.ones(config.n_head)
        head_mask[1] = 0.0
    else:
        head_mask = torch.ones(config.n_layer, config.n_head)
        head_mask[0, 0] = 0.0
        head_mask[-1, -1] = 0.0
        head_mask[-1, 0] = 0.5  # not just a switch: it scales the probabilities
    return head_mask


@pytest.mark.parametrize("kind", ["per_head", "per_layer_and_head"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config_name", ["pow2", "odd_heads"])
def test_head_mask(load_pair, config_name, arch, kind):
    ours, ref = load_pair(config_name, arch)
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    head_mask = _head_mask(ours.config, kind)
    kwargs = forward_kwargs(
        arch,
        input_ids=input_ids,
        attention_mask=mask,
        output_attentions=True,
        output_hidden_states=True,
    )
    ours_out, ref_out = run_both(ours, ref, arch, head_mask=head_mask, **kwargs)
    compare_outputs(ours_out, ref_out, arch, query_mask=mask, kv_mask=mask)
    with torch.no_grad():
        unmasked = ours(**kwargs)
    field = MAIN_FIELD[arch]
    difference = (getattr(ours_out, field) - getattr(unmasked, field)).abs().max()
    assert difference > 1e-3, "head_mask had no effect"
    masked_layer = 0 if kind == "per_layer_and_head" else 1
    masked_head = 0 if kind == "per_layer_and_head" else 1
    assert torch.all(ours_out.attentions[masked_layer][:, masked_head] == 0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config_name", ["pow2", "odd_heads", "post_ln"])
def test_inputs_embeds(load_pair, config_name, arch, recwarn, caplog):
    ours, ref = load_pair(config_name, arch)
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    gen = torch.Generator().manual_seed(7)
    embeds = 0.5 * torch.randn(*input_ids.shape, ours.config.hidden_size, generator=gen)
    kwargs = forward_kwargs(
        arch, inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True
    )
    ours_out, ref_out = run_both(ours, ref, arch, **kwargs)
    compare_outputs(ours_out, ref_out, arch, query_mask=mask, kv_mask=mask)
    if arch == "BloomForSequenceClassification":
        # pads cannot be seen in embeddings: the last position is pooled, with a warning
        warned = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
        assert any("inputs_embeds" in message for message in warned), warned
        return
    # the same embeddings through input_ids give the same result
    with torch.no_grad():
        from_embeddings = ours(
            **forward_kwargs(arch, inputs_embeds=ours.get_input_embeddings()(input_ids))
        )
        from_ids = ours(**forward_kwargs(arch, input_ids=input_ids))
    field = MAIN_FIELD[arch]
    assert_close(getattr(from_embeddings, field), getattr(from_ids, field), FP32_TOL, name=field)


# ---------------------------------------------------------------------------------------------
# return_dict=False: the tuple of the non-None fields in transformers' order.


def _expected_tuple(arch: str, ref_dict_output) -> tuple:
    """What transformers' dataclass holds, as a tuple: the correct tuple (defect (d) aside)."""
    return tuple(
        getattr(ref_dict_output, f)
        for f in OUTPUT_FIELDS[arch]
        if getattr(ref_dict_output, f) is not None
    )


@pytest.mark.parametrize("extras", ["plain", "hidden_states", "all"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(
    ("arch", "with_labels"),
    [
        (arch, labels)
        for arch in ARCHS
        for labels in (False, True)
        if arch != "BloomModel" or not labels
    ],
)
def test_return_dict_false_tuples(load_pair, arch, with_labels, use_cache, extras):
    # QA has no use_cache argument: config.use_cache decides what transformers' body returns
    load = {"use_cache": use_cache} if arch == "BloomForQuestionAnswering" else None
    ours, ref = load_pair("pow2", arch, load=load)
    input_ids, mask = make_inputs(ours.config.vocab_size)
    kwargs = forward_kwargs(
        arch,
        use_cache=use_cache,
        input_ids=input_ids,
        attention_mask=mask,
        output_hidden_states=extras != "plain",
        output_attentions=extras == "all",
    )
    if with_labels:
        kwargs.update(_labels_for(arch, input_ids))
    with torch.no_grad():
        ours_tuple = ours(**kwargs, return_dict=False)
        ours_dict = ours(**kwargs, return_dict=True)
        ref_tuple = ref(**kwargs, return_dict=False)
        ref_dict = ref(**kwargs, return_dict=True)
    assert type(ours_tuple) is tuple
    expected = _expected_tuple(arch, ref_dict)
    assert_tree_close(ours_tuple, expected, name="return_dict=False")
    # transformers' own tuple is right except defect (d): token classification and QA drop
    # hidden_states from the tuple when the body ran without a cache
    transformers_drops = arch in ("BloomForTokenClassification", "BloomForQuestionAnswering")
    if not (transformers_drops and not use_cache and extras != "plain"):
        assert_tree_close(ours_tuple, ref_tuple, name="return_dict=False vs transformers")
    # the dataclass also behaves like that tuple
    assert list(ours_dict.keys()) == list(ref_dict.keys())
    assert_tree_close(tuple(ours_dict.to_tuple()), expected, name="to_tuple()")
    assert_tree_close(ours_dict[0], expected[0], name="output[0]")
    first_key = list(ref_dict.keys())[0]
    assert_tree_close(ours_dict[first_key], ref_dict[first_key], name=f"output[{first_key!r}]")
    assert len(tuple(ours_dict)) == len(expected)  # iterating sees the non-None fields only


def _labels_for(arch: str, input_ids: torch.Tensor) -> dict:
    batch, seq = input_ids.shape
    if arch == "BloomForCausalLM":
        return {"labels": input_ids.clone()}
    if arch == "BloomForSequenceClassification":
        return {"labels": torch.arange(batch) % 2}
    if arch == "BloomForTokenClassification":
        return {"labels": torch.arange(batch * seq).reshape(batch, seq) % 2}
    return {"start_positions": torch.arange(batch), "end_positions": torch.arange(batch) + 1}


# ---------------------------------------------------------------------------------------------
# Dropout only in train().


@pytest.mark.parametrize("output_attentions", [False, True])  # either attention path
@pytest.mark.parametrize("arch", ["BloomForCausalLM", "BloomForTokenClassification"])
def test_dropout_only_in_training(make_checkpoint, arch, output_attentions):
    folder = make_checkpoint("pow2", arch, hidden_dropout=0.3, attention_dropout=0.3)
    ours = ours_cls(arch).from_pretrained(folder)
    ref = ref_cls(arch).from_pretrained(folder)
    assert not ours.training, (
        "from_pretrained must return the model in eval mode, as transformers does"
    )
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    kwargs = dict(input_ids=input_ids, attention_mask=mask, output_attentions=output_attentions)
    with torch.no_grad():
        first = ours(**kwargs).logits
        second = ours(**kwargs).logits
        assert torch.equal(first, second)
        assert_close(first, ref(**kwargs).logits, FP32_TOL, mask=mask, name="eval logits")
        ours.train()
        torch.manual_seed(0)
        train_a = ours(**kwargs).logits
        train_b = ours(**kwargs).logits
        assert (train_a - train_b).abs().max() > 1e-3, "train() outputs should be random"
        assert (train_a - first).abs().max() > 1e-3
        ours.eval()
        again = ours(**kwargs).logits
    assert torch.equal(again, first)


# ---------------------------------------------------------------------------------------------
# Checkpoint round trips through the model classes.

FORMATS = {
    "safetensors": ({}, "model.safetensors"),
    "bin": ({"safe_serialization": False}, "pytorch_model.bin"),
    # the tiny models weigh ~100-150 kB: 50 kB shards give 3-4 files
    "safetensors_sharded": ({"max_shard_size": "50KB"}, "model.safetensors.index.json"),
    "bin_sharded": (
        {"safe_serialization": False, "max_shard_size": 50_000},
        "pytorch_model.bin.index.json",
    ),
}
WEIGHT_FILES = {name for _, name in FORMATS.values()}
# every class in the single-file formats; the sharded ones on a tied, an untied and a head model
ROUND_TRIP_CASES = [
    (config, arch, fmt)
    for fmt in FORMATS
    for config, arch in [("pow2", a) for a in ARCHS] + [("untied", "BloomForCausalLM")]
    if "sharded" not in fmt or arch in ("BloomForCausalLM", "BloomForSequenceClassification")
]


@pytest.fixture
def no_gc_between_shards(monkeypatch):
    """transformers runs gc.collect() after every shard (~0.2 s each here); not what is tested."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args: 0)


def _check_folder(folder, fmt: str) -> None:
    expected = FORMATS[fmt][1]
    present = {p.name for p in folder.iterdir()}
    assert "config.json" in present
    assert expected in present, f"{expected} not written; folder has {sorted(present)}"
    assert not (present & WEIGHT_FILES) - {expected}, f"extra weight files: {sorted(present)}"
    if expected.endswith(".index.json"):
        index = json.loads((folder / expected).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1, "max_shard_size should have split these weights"
        assert shards <= present


def _compare_models(ours, ref, arch):
    input_ids, mask = make_inputs(ref.config.vocab_size, "left")
    kwargs = forward_kwargs(
        arch, input_ids=input_ids, attention_mask=mask, output_hidden_states=True
    )
    ours_out, ref_out = run_both(ours, ref, arch, **kwargs)
    compare_outputs(ours_out, ref_out, arch, query_mask=mask, kv_mask=mask)


@pytest.mark.usefixtures("no_gc_between_shards")
@pytest.mark.parametrize(("config_name", "arch", "fmt"), ROUND_TRIP_CASES)
def test_our_save_loads_in_transformers(make_checkpoint, tmp_path, config_name, arch, fmt):
    ours = ours_cls(arch).from_pretrained(make_checkpoint(config_name, arch))
    ours.save_pretrained(tmp_path, **FORMATS[fmt][0])
    _check_folder(tmp_path, fmt)
    ref, info = ref_cls(arch).from_pretrained(tmp_path, output_loading_info=True)
    assert info == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    original = ref_cls(arch).from_pretrained(make_checkpoint(config_name, arch))
    for name, tensor in original.state_dict().items():
        assert torch.equal(ref.state_dict()[name], tensor), f"{name} changed in the round trip"
    _compare_models(ours, ref, arch)


@pytest.mark.usefixtures("no_gc_between_shards")
@pytest.mark.parametrize(("config_name", "arch", "fmt"), ROUND_TRIP_CASES)
def test_transformers_save_loads_in_ours(make_checkpoint, tmp_path, config_name, arch, fmt):
    ref = ref_cls(arch).from_pretrained(make_checkpoint(config_name, arch))
    ref.save_pretrained(tmp_path, **FORMATS[fmt][0])
    _check_folder(tmp_path, fmt)
    ours, info = ours_cls(arch).from_pretrained(tmp_path, output_loading_info=True)
    assert {k: list(v) for k, v in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    _compare_models(ours, ref, arch)


def _loading_info(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert set(info) == {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
    return model.eval(), {key: sorted(map(str, value)) for key, value in info.items()}


@pytest.mark.parametrize("arch", HEAD_ARCHS)
@pytest.mark.parametrize("config_name", ["pow2", "untied"])
def test_base_checkpoint_into_head(make_checkpoint, config_name, arch):
    folder = make_checkpoint(config_name, "BloomModel")
    ours, ours_info = _loading_info(ours_cls(arch), folder)
    ref, ref_info = _loading_info(ref_cls(arch), folder)
    assert ours_info == ref_info
    if arch != "BloomForCausalLM" or config_name == "untied":
        assert ours_info["missing_keys"], "the head's weights are not in a base checkpoint"
    for name in ours_info["missing_keys"]:
        value = ours.state_dict()[name]
        assert torch.isfinite(value).all(), f"missing {name} was not initialised"
        if name.endswith("weight"):
            assert value.std() > 0, f"missing {name} was not initialised randomly"
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    kwargs = forward_kwargs(
        arch, input_ids=input_ids, attention_mask=mask, output_hidden_states=True
    )
    ours_out, ref_out = run_both(ours, ref, arch, **kwargs)
    for i, (o, r) in enumerate(zip(ours_out.hidden_states, ref_out.hidden_states, strict=True)):
        assert_close(o, r, FP32_TOL, mask, name=f"hidden_states[{i}]")
    if arch == "BloomForCausalLM" and config_name == "pow2":  # tied head: fully determined
        assert_close(ours_out.logits, ref_out.logits, FP32_TOL, mask, name="logits")


@pytest.mark.parametrize("arch", HEAD_ARCHS)
@pytest.mark.parametrize("config_name", ["pow2", "untied"])
def test_head_checkpoint_into_base(make_checkpoint, config_name, arch):
    folder = make_checkpoint(config_name, arch)
    ours, ours_info = _loading_info(ours_cls("BloomModel"), folder)
    ref, ref_info = _loading_info(ref_cls("BloomModel"), folder)
    assert ours_info == ref_info
    if arch != "BloomForCausalLM" or config_name == "untied":
        assert ours_info["unexpected_keys"], "the head's weights should be reported unexpected"
    _compare_models(ours, ref, "BloomModel")


@pytest.mark.parametrize("config_name", ["pow2", "untied"])
def test_tied_lm_head_stored_once(make_checkpoint, tmp_path, config_name):
    from safetensors import safe_open

    folder = make_checkpoint(config_name, "BloomForCausalLM")
    ours = ours_cls("BloomForCausalLM").from_pretrained(folder)
    ours.save_pretrained(tmp_path / "ours")
    ref_cls("BloomForCausalLM").from_pretrained(folder).save_pretrained(tmp_path / "ref")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        ours_keys, metadata = set(f.keys()), f.metadata()
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as f:
        ref_keys = set(f.keys())
    assert metadata.get("format") == "pt"
    assert ours_keys == ref_keys
    tied = TINY_CONFIGS[config_name].get("tie_word_embeddings", True)
    assert ("lm_head.weight" in ours_keys) != tied
    assert "transformer.word_embeddings.weight" in ours_keys


def test_loading_keywords_are_accepted_and_not_saved(make_checkpoint, tmp_path):
    folder = make_checkpoint("pow2", "BloomForCausalLM")
    ours = ours_cls("BloomForCausalLM").from_pretrained(
        folder,
        low_cpu_mem_usage=True,
        local_files_only=True,
        use_safetensors=True,
        device_map="cpu",
    )
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for keyword in ("low_cpu_mem_usage", "local_files_only", "use_safetensors", "device_map"):
        assert keyword not in saved
    _compare_models(ours, ref_cls("BloomForCausalLM").from_pretrained(folder), "BloomForCausalLM")


# ---------------------------------------------------------------------------------------------
# dtypes: torch_dtype="auto" and explicit half precision.


@pytest.mark.parametrize(
    ("config_name", "torch_dtype", "expected"),
    [
        ("bf16", "auto", torch.bfloat16),  # config.json says bfloat16
        ("bf16", None, torch.float32),  # no torch_dtype: float32, as in transformers
        ("bf16", torch.float32, torch.float32),
        ("pow2", "auto", torch.float32),
        ("no_dtype_in_config", "auto", torch.float32),
        ("pow2", torch.float16, torch.float16),
        ("pow2", torch.bfloat16, torch.bfloat16),
    ],
)
def test_torch_dtype(make_checkpoint, tmp_path, config_name, torch_dtype, expected):
    if config_name == "no_dtype_in_config":
        folder = tmp_path / "no_dtype"
        shutil.copytree(make_checkpoint("pow2", "BloomForCausalLM"), folder)
        config = json.loads((folder / "config.json").read_text())
        config.pop("torch_dtype")
        (folder / "config.json").write_text(json.dumps(config))
    else:
        folder = make_checkpoint(config_name, "BloomForCausalLM")
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    ours = ours_cls("BloomForCausalLM").from_pretrained(folder, **kwargs)
    assert {p.dtype for p in ours.parameters()} == {expected}
    assert ours.dtype == expected
    ref = ref_cls("BloomForCausalLM").from_pretrained(folder, **kwargs)
    assert ref.dtype == expected  # the oracle agrees
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    with torch.no_grad():
        logits, ref_logits = (
            ours(input_ids, attention_mask=mask).logits,
            ref(input_ids, attention_mask=mask).logits,
        )
    tol = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL, torch.float16: FP16_TOL}[expected]
    assert_close(logits, ref_logits, tol, mask, name=f"{expected} logits")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, BF16_TOL), (torch.float16, FP16_TOL)])
@pytest.mark.parametrize("config_name", ["bf16", "odd_heads"])
def test_half_precision_parity(make_checkpoint, config_name, dtype, tol):
    """Same dtype both sides, softmax in fp32 both sides: equal within the stated bound."""
    arch = "BloomForCausalLM"
    folder = make_checkpoint(config_name, arch)
    ours = ours_cls(arch).from_pretrained(folder, torch_dtype=dtype)
    ref = ref_cls(arch).from_pretrained(folder, torch_dtype=dtype)
    input_ids, mask = make_inputs(ours.config.vocab_size, "left")
    kwargs = dict(
        input_ids=input_ids, attention_mask=mask, output_hidden_states=True, output_attentions=True
    )
    ours_out, ref_out = run_both(ours, ref, arch, **kwargs)
    assert ours_out.logits.dtype == dtype
    compare_outputs(ours_out, ref_out, arch, tol=tol, query_mask=mask, kv_mask=mask)
    fast_kwargs = dict(
        input_ids=input_ids, attention_mask=mask, use_cache=True
    )  # no attentions: any path
    ours_fast, ref_fast = run_both(ours, ref, arch, **fast_kwargs)
    compare_outputs(ours_fast, ref_fast, arch, tol=tol, query_mask=mask, kv_mask=mask)
    for attention in ours_out.attentions:  # probabilities from an fp32 softmax: rows sum to 1
        row_sums = attention.float().sum(-1)[
            mask.bool()[:, None, :].expand(-1, attention.shape[1], -1)
        ]
        assert (row_sums - 1).abs().max() < 2e-2
    # and the half-precision result is near the fp32 one on the same weights
    ours32 = ours_cls(arch).from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        fp32_logits = ours32(input_ids, attention_mask=mask).logits
    assert_close(ours_out.logits.float(), fp32_logits, tol, mask, name="half vs fp32 logits")


def test_bf16_checkpoint_round_trip_keeps_dtype(make_checkpoint, tmp_path):
    folder = make_checkpoint("bf16", "BloomForCausalLM")
    ours = ours_cls("BloomForCausalLM").from_pretrained(folder, torch_dtype="auto")
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = ref_cls("BloomForCausalLM").from_pretrained(tmp_path, torch_dtype="auto")
    original = ref_cls("BloomForCausalLM").from_pretrained(folder, torch_dtype="auto")
    assert ref.dtype == torch.bfloat16
    for name, tensor in original.state_dict().items():
        assert torch.equal(ref.state_dict()[name], tensor), name


def test_pad_id_is_the_configured_one():
    """The inputs helper pads with PAD_ID, which is the configs' pad_token_id."""
    input_ids, mask = make_inputs(128, "right")
    assert torch.all(input_ids[mask == 0] == PAD_ID)
    assert torch.all(input_ids[mask == 1] != PAD_ID)
    assert all(config["pad_token_id"] == PAD_ID for config in TINY_CONFIGS.values())

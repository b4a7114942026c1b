"""BloomConfig: defaults, aliases, the real bigscience hub files, validation,
and meta-device sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import bloomlm
from bloomlm import BloomConfig, BloomForCausalLM, BloomModel

HUB_CONFIGS = sorted(
    Path(__file__).resolve().parents[2].glob("shared/bigscience-configs/*/config.json")
)
if (
    not HUB_CONFIGS
):  # CI's clone has ../shared beside it; a developer's checkout may keep it elsewhere
    HUB_CONFIGS = sorted(Path("/work/shared/bigscience-configs").glob("*/config.json"))


def test_defaults_match_transformers():
    ours, theirs = BloomConfig(), transformers.BloomConfig()
    for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "layer_norm_epsilon",
                 "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
                 "hidden_dropout", "attention_dropout", "pretraining_tp", "slow_but_exact",
                 "tie_word_embeddings", "num_labels", "problem_type", "output_attentions",
                 "output_hidden_states", "return_dict",
                 "apply_residual_connection_post_layernorm"):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.id2label == {0: "LABEL_0", 1: "LABEL_1"} == theirs.id2label
    assert ours.label2id == theirs.label2id


def test_hub_configs_were_found():
    assert len(HUB_CONFIGS) >= 4, "the bigscience hub configs are missing from ../shared"


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda p: p.parent.name)
def test_reads_every_hub_config_like_transformers(path, tmp_path):
    raw = json.loads(path.read_text())
    ours = BloomConfig.from_pretrained(path.parent)
    theirs = transformers.BloomConfig.from_pretrained(path.parent)
    assert ours.hidden_size == theirs.hidden_size == raw["n_embed"]
    assert ours.n_head == theirs.n_head == raw["num_attention_heads"]
    assert ours.num_attention_heads == ours.n_head and ours.num_hidden_layers == ours.n_layer
    assert (ours.n_layer, ours.vocab_size, ours.pretraining_tp) == (
        theirs.n_layer, theirs.vocab_size, theirs.pretraining_tp)  # fmt: skip
    for key in ("seq_length", "offset_alibi", "skip_bias_add", "masked_softmax_fusion",
                "unk_token_id", "attention_softmax_in_fp32", "dtype"):  # fmt: skip
        if key in raw:
            assert getattr(ours, key) == raw[key], key
    # unknown keys survive a save and are read back by transformers too
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key in set(raw) - {"n_embed", "num_attention_heads", "transformers_version"}:
        assert written[key] == raw[key], key
    again = transformers.BloomConfig.from_pretrained(tmp_path)
    assert (again.hidden_size, again.n_head, again.n_layer) == (
        theirs.hidden_size,
        theirs.n_head,
        theirs.n_layer,
    )
    assert BloomConfig.from_pretrained(tmp_path) == ours


def test_transformers_save_reads_back(tmp_path):
    theirs = transformers.BloomConfig(hidden_size=48, n_head=6, num_labels=3,
                                      problem_type="regression", classifier_dropout=0.2,
                                      pad_token_id=3)  # fmt: skip
    theirs.save_pretrained(tmp_path)
    ours = BloomConfig.from_pretrained(tmp_path)
    assert ours.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"} and ours.num_labels == 3
    assert (ours.problem_type, ours.classifier_dropout, ours.pad_token_id) == ("regression", 0.2, 3)


def test_id2label_int_keys_after_json_round_trip(tmp_path):
    config = BloomConfig(id2label={0: "neg", 1: "neu", 2: "pos"})
    config.save_pretrained(tmp_path)
    again = BloomConfig.from_pretrained(tmp_path)
    assert again.id2label == {0: "neg", 1: "neu", 2: "pos"} and again.label2id == {
        "neg": 0,
        "neu": 1,
        "pos": 2,
    }
    assert transformers.BloomConfig.from_pretrained(tmp_path).id2label == again.id2label


def test_aliases_set_and_get():
    config = BloomConfig(num_hidden_layers=3, num_attention_heads=4, n_embed=32)
    assert (config.n_layer, config.n_head, config.hidden_size) == (3, 4, 32)
    config.num_attention_heads = 8
    assert config.n_head == 8 and "num_attention_heads" not in config.to_dict()


def test_num_labels_override():
    config = BloomConfig.from_dict({}, num_labels=5)
    assert config.num_labels == 5 and list(config.id2label) == [0, 1, 2, 3, 4]


def test_with_overrides_returns_a_validated_copy():
    config = BloomConfig(n_head=4, hidden_size=32, seq_length=2048)  # seq_length: a hub extra key
    changed = config.with_overrides(num_attention_heads=8, problem_type="regression", seq_length=9)
    assert (changed.n_head, changed.problem_type, changed.seq_length) == (8, "regression", 9)
    assert (config.n_head, config.problem_type, config.seq_length) == (4, None, 2048)  # untouched
    labelled = config.with_overrides(id2label={0: "neg", 1: "neu", 2: "pos"})
    assert labelled.num_labels == 3 and labelled.label2id == {"neg": 0, "neu": 1, "pos": 2}
    with pytest.raises(ValueError, match="n_head"):
        config.with_overrides(n_head=5)  # 32 is not divisible by 5


def test_with_overrides_refuses_unknown_keys_naming_what_is_allowed():
    with pytest.raises(TypeError, match=r"\['bogus', 'vocab'\].*vocab_size.*num_attention_heads"):
        BloomConfig().with_overrides(vocab=10, bogus=1, n_layer=3)


def test_json_string_round_trip():
    config = BloomConfig(n_layer=3, num_labels=4, seq_length=2048)
    assert BloomConfig.from_json_string(config.to_json_string()) == config
    with pytest.raises(ValueError, match="object"):
        BloomConfig.from_json_string("[1, 2]")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden_size": 30, "n_head": 4}, "hidden_size"),
        ({"n_head": 0}, "n_head"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"n_layer": 1.5}, "n_layer"),
        ({"hidden_dropout": 1.5}, "hidden_dropout"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
        ({"problem_type": "ranking"}, "problem_type"),
        ({"num_labels": 0}, "num_labels"),
        ({"pad_token_id": 10**7}, "pad_token_id"),
        ({"pretraining_tp": 0}, "pretraining_tp"),
    ],
)
def test_impossible_values_name_the_field_when_a_model_is_built(kwargs, field, tmp_path):
    """As in transformers, the config itself takes any values (it can be built step by step); the
    checks run where a model is built from it, in both frameworks and in from_pretrained."""
    config = BloomConfig(**kwargs) if field != "problem_type" else BloomConfig()
    if field == "problem_type":
        with pytest.raises(ValueError, match=field):  # the one check transformers makes early
            BloomConfig(**kwargs)
        config.problem_type = kwargs["problem_type"]
    with pytest.raises(ValueError, match=field):
        config.validate()
    with pytest.raises(ValueError, match=field):
        BloomModel(config)
    with pytest.raises(ValueError, match=field):
        bloomlm.FlaxBloomModel(config, _do_init=False)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=field):
        BloomForCausalLM.from_pretrained(tmp_path)


def test_a_config_can_be_built_step_by_step():
    config = BloomConfig(pad_token_id=300)  # beyond the default vocabulary only after the next line
    config.vocab_size = 256
    config.vocab_size = 512
    config.hidden_size, config.n_head = 30, 4  # not divisible yet
    config.hidden_size = 32
    assert BloomModel(config).config.pad_token_id == 300


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        BloomConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ({"hidden_size": 1024, "n_layer": 24, "n_head": 16}, 559_214_592),  # bloom-560m
        ({"hidden_size": 2048, "n_layer": 24, "n_head": 16}, 1_722_408_960),  # bloom-1b7
        ({"hidden_size": 14336, "n_layer": 70, "n_head": 112}, 176_247_271_424),  # bloom (176B)
    ],
)
def test_real_shapes_on_meta_device(shape, expected):
    config = BloomConfig(vocab_size=250880, **shape)
    with torch.device("meta"):
        base, lm = BloomModel(config), BloomForCausalLM(config)
    assert base.num_parameters() == expected
    assert lm.num_parameters() == expected  # the tied LM head adds nothing
    assert lm.device.type == "meta"


def test_import_does_not_pull_transformers_torch_or_jax():
    code = (
        "import sys, bloomlm; from bloomlm import BloomConfig; BloomConfig();"
        "bad = [m for m in ('transformers', 'torch', 'jax') if m in sys.modules]; "
        "assert not bad, bad;"
        "import bloomlm.torch.model; assert 'transformers' not in sys.modules; "
        "assert 'jax' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

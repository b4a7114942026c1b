"""BloomConfig's generic surface (transformers' PretrainedConfig) against transformers 4.37.2."""

from __future__ import annotations

import json

import pytest
import transformers

from bloomlm import BloomConfig
from bloomlm.config_compat import GENERATION_DEFAULTS, GENERIC_DEFAULTS

INPUTS = [
    {},
    dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4),
    dict(n_embed=48, num_attention_heads=6, num_labels=3, problem_type="regression"),
    dict(id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}, seq_length=2048),
    dict(classifier_dropout=0.2, pad_token_id=3, forced_eos_token_id=2, max_length=64),
    dict(output_hidden_states=True, torch_dtype="bfloat16", architectures=["BloomForCausalLM"]),
    dict(torchscript=True, task_specific_params={"summarization": {"num_beams": 4}}),
]


def _without_version(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k != "transformers_version"}


def test_every_generic_attribute_has_transformers_default():
    ours, theirs = BloomConfig(), transformers.BloomConfig()
    names = [*GENERIC_DEFAULTS, "is_encoder_decoder", "use_return_dict", "name_or_path",
             "num_labels", "id2label", "label2id", "is_composition", "model_type", "attribute_map",
             "keys_to_ignore_at_inference"]  # fmt: skip
    for name in names:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(GENERATION_DEFAULTS) == len(transformers.PretrainedConfig._get_generation_defaults())
    assert GENERATION_DEFAULTS == transformers.PretrainedConfig._get_generation_defaults()
    assert not hasattr(transformers.BloomConfig(), "classifier_dropout")
    assert BloomConfig().classifier_dropout is None  # read by the heads; written only when set


@pytest.mark.parametrize("kwargs", INPUTS, ids=range(len(INPUTS)))
def test_serialisation_equals_transformers(kwargs, tmp_path):
    ours, theirs = BloomConfig(**kwargs), transformers.BloomConfig(**kwargs)
    assert ours.to_dict() == _without_version(theirs.to_dict())
    assert ours.to_diff_dict() == _without_version(theirs.to_diff_dict())
    for use_diff in (True, False):
        mine = json.loads(ours.to_json_string(use_diff=use_diff))
        assert mine == _without_version(json.loads(theirs.to_json_string(use_diff=use_diff)))
    assert ours.to_json_string() == ours.to_json_string(use_diff=True)
    ours.to_json_file(tmp_path / "c.json")
    theirs.to_json_file(tmp_path / "t.json")
    written = json.loads((tmp_path / "c.json").read_text())
    assert written == _without_version(json.loads((tmp_path / "t.json").read_text()))
    assert BloomConfig.from_json_file(tmp_path / "c.json") == ours
    assert BloomConfig.from_json_file(tmp_path / "t.json") == ours  # theirs reads as ours
    assert transformers.BloomConfig.from_json_file(tmp_path / "c.json").to_dict() == {
        **theirs.to_dict(), "_name_or_path": ""}  # fmt: skip
    ours.save_pretrained(tmp_path / "saved")
    theirs.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == _without_version(
        json.loads((tmp_path / "theirs" / "config.json").read_text())
    )


def test_from_dict_update_and_update_from_string_as_transformers():
    config_dict = {"n_layer": 3, "num_labels": 4, "foo": "bar"}
    ours = BloomConfig.from_dict(config_dict, n_head=4)
    theirs = transformers.BloomConfig.from_dict(config_dict, n_head=4)
    assert ours.to_dict() == _without_version(theirs.to_dict())
    again, unused = BloomConfig.from_dict(config_dict, return_unused_kwargs=True)
    assert again.n_layer == 3 and unused == {}
    for config in (ours, theirs):
        config.update({"n_layer": 5, "new_key": [1]})
        config.update_from_string("n_head=8,use_cache=false,layer_norm_epsilon=0.001,foo=baz")
    assert ours.to_dict() == _without_version(theirs.to_dict())
    assert (ours.n_head, ours.use_cache, ours.layer_norm_epsilon, ours.foo) == (
        8,
        False,
        1e-3,
        "baz",
    )
    with pytest.raises(ValueError, match="isn't in the original config dict"):
        ours.update_from_string("not_a_key=1")
    with pytest.raises(ValueError, match="true or false"):
        ours.update_from_string("use_cache=maybe")
    with pytest.raises(ValueError, match="key=value"):
        ours.update_from_string("n_head")


def test_labels_stay_in_sync_and_return_dict_follows_torchscript():
    config = BloomConfig()
    config.num_labels = 3
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert config.label2id == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    config.id2label = {0: "a", 1: "b"}
    assert (config.num_labels, config.label2id) == (2, {"a": 0, "b": 1})
    assert config.use_return_dict
    config.torchscript = True
    assert not config.use_return_dict  # as transformers: TorchScript models return tuples


def test_name_or_path_is_kept_and_written(tmp_path):
    BloomConfig(n_layer=3).save_pretrained(tmp_path)
    loaded = BloomConfig.from_pretrained(tmp_path)
    theirs = transformers.BloomConfig.from_pretrained(tmp_path)
    assert loaded.name_or_path == theirs.name_or_path == ""  # models record it, configs do not
    loaded.name_or_path = "somewhere"
    assert loaded == BloomConfig(n_layer=3)  # where it came from is no part of equality
    loaded.name_or_path = tmp_path / "x"
    assert loaded.to_dict()["_name_or_path"] == str(tmp_path / "x")
    config, unused = BloomConfig.from_pretrained(tmp_path, return_unused_kwargs=True, n_head=2)
    assert (config.n_head, unused) == (2, {})

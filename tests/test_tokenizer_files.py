"""The tokenizer folder's file rules (bloomlm.tokenizer_files), checked without the Rust library.

One test runs the module in a fresh interpreter where `tokenizers` (and torch, jax, transformers)
cannot be imported, and asserts what it loads, merges and writes; the others check each rule on its
own. Parity of the whole tokenizer with transformers' lives in test_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bloomlm.tokenizer_files as files
from bloomlm.errors import CheckpointNotFoundError

SOURCE_ROOT = str(Path(files.__file__).parents[1])

# A folder as transformers < 4.34 wrote it: no added_tokens_decoder, so the map's tokens count.
LEGACY_CONFIG = {
    "name_or_path": "bigscience/bloom-560m",
    "tokenizer_class": "BloomTokenizerFast",
    "tokenizer_file": "/somewhere/tokenizer.json",
    "special_tokens_map_file": "/somewhere/special_tokens_map.json",
    "init_inputs": [],
    "padding_side": "left",
    "additional_special_tokens": ["<a>"],
    "custom_key": 3,
}
LEGACY_MAP = {
    "bos_token": {"content": "<s>", "lstrip": False, "__type": "AddedToken"},
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "additional_special_tokens": ["<a>", {"content": "<b>", "rstrip": True}, "<c>"],
}
# What merge_config makes of the legacy folder with kwargs {"eos_token": "</e>", "pad_token": None}.
B_TOKEN = {"content": "<b>", "rstrip": True, "special": True}
LEGACY_MERGED = {
    "padding_side": "left",
    "additional_special_tokens": ["<a>", B_TOKEN, "<c>"],
    "custom_key": 3,
    "eos_token": "</e>",  # a truthy kwarg beats the map
    "pad_token": "<pad>",  # a None kwarg does not
    "bos_token": {"content": "<s>", "lstrip": False, "special": True},  # "__type" dropped
}


def write_folder(folder: Path, config: dict | None, special_tokens_map: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # The backend's file: these rules check it is there, and never parse it.
    (folder / files.TOKENIZER_FILE).write_text("{}", encoding="utf-8")
    if config is not None:
        (folder / files.TOKENIZER_CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    if special_tokens_map is not None:
        text = json.dumps(special_tokens_map)
        (folder / files.SPECIAL_TOKENS_MAP_FILE).write_text(text, encoding="utf-8")
    return folder


# -- without the Rust library ----------------------------------------------------------------------


_BLOCKED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    # None in sys.modules makes `import name` raise ImportError.
    for name in ("tokenizers", "torch", "jax", "transformers"):
        sys.modules[name] = None
    try:
        import bloomlm.tokenizer  # needs tokenizers: must fail here, or nothing was blocked
        blocked = False
    except ImportError:
        blocked = True
    import bloomlm.tokenizer_files as files

    folder = files.resolve_tokenizer_folder(sys.argv[1], {})
    init_kwargs = files.read_init_kwargs(folder, {"eos_token": "</e>", "pad_token": None})
    config = files.config_to_save(
        init_kwargs,
        {key: None for key in files.SAVED_ATTRIBUTES} | {"padding_side": "right"},
        {"bos_token": "<s>"},
        {0: {"content": "<s>", "special": True}},
    )
    special = files.special_tokens_map_to_save({"bos_token": init_kwargs["bos_token"]})
    out = files.make_save_folder(Path(sys.argv[1]) / "saved")
    paths = files.write_texts(out, {"tokenizer_config.json": files.json_text(config)})
    print(json.dumps({
        "blocked": blocked,
        "init_kwargs": init_kwargs,
        "config": json.loads(Path(paths[0]).read_text(encoding="utf-8")),
        "special": special,
    }))
    """
)


def test_loads_merges_and_saves_without_tokenizers(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "tok", LEGACY_CONFIG, LEGACY_MAP)
    path = os.pathsep.join([SOURCE_ROOT, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_SCRIPT, str(folder)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["blocked"] is True
    assert report["init_kwargs"] == LEGACY_MERGED
    assert report["config"]["padding_side"] == "right"  # the current attribute, not the init kwarg
    assert report["config"]["custom_key"] == 3
    assert report["config"]["bos_token"] == "<s>"
    assert report["config"]["added_tokens_decoder"] == {"0": {"content": "<s>", "special": True}}
    assert report["config"]["tokenizer_class"] == "BloomTokenizer"
    assert report["special"] == {"bos_token": {"content": "<s>", "lstrip": False}}


# -- loading ---------------------------------------------------------------------------------------


def test_merge_config_follows_transformers_rules() -> None:
    kwargs = {"eos_token": "</e>", "pad_token": None}
    assert files.merge_config(LEGACY_CONFIG, LEGACY_MAP, kwargs) == LEGACY_MERGED


def test_merge_config_builds_tokens_with_make_token() -> None:
    made: list[dict] = []

    def make_token(fields: dict) -> tuple:
        made.append(fields)
        return ("token", fields["content"])

    merged = files.merge_config({}, LEGACY_MAP, {}, make_token=make_token)
    assert merged["bos_token"] == ("token", "<s>")
    assert merged["additional_special_tokens"] == ["<a>", ("token", "<b>"), "<c>"]
    assert [fields["special"] for fields in made] == [True, True]


def test_merge_config_keeps_additional_tokens_once() -> None:
    config = {"additional_special_tokens": ["<a>", "<b>"]}
    special_tokens_map = {"additional_special_tokens": ["<b>", "<c>", "<a>"]}
    merged = files.merge_config(config, special_tokens_map, {})
    assert merged["additional_special_tokens"] == ["<a>", "<b>", "<c>"]
    # A truthy kwarg replaces the list instead of merging into it.
    merged = files.merge_config(config, special_tokens_map, {"additional_special_tokens": ["<z>"]})
    assert merged["additional_special_tokens"] == ["<z>"]


def test_merge_config_ignores_the_map_when_config_has_added_tokens_decoder() -> None:
    config = {"added_tokens_decoder": {"0": {"content": "<s>"}}, "bos_token": "<s>"}
    merged = files.merge_config(config, {"bos_token": "<other>", "sep_token": "<sep>"}, {})
    assert merged == {"added_tokens_decoder": {"0": {"content": "<s>"}}, "bos_token": "<s>"}


def test_added_token_fields() -> None:
    saved = {"content": "<s>", "lstrip": True, "__type": "AddedToken", "special": False}
    assert files.added_token_fields(saved) == {"content": "<s>", "lstrip": True, "special": False}
    assert files.added_token_fields(saved, special=True)["special"] is True
    with pytest.raises(ValueError, match="needs a 'content' entry"):
        files.added_token_fields({"lstrip": True})


def test_read_init_kwargs_without_companion_files(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, None, None)
    assert files.read_init_kwargs(folder, {"padding_side": "right"}) == {"padding_side": "right"}


@pytest.mark.parametrize("as_auto_tokenizer", [False, True])
def test_generic_class_cleans_up_spaces_only_through_auto_tokenizer(
    tmp_path: Path, as_auto_tokenizer: bool
) -> None:
    folder = write_folder(tmp_path, {"tokenizer_class": "PreTrainedTokenizerFast"}, None)
    init_kwargs = files.read_init_kwargs(folder, {}, as_auto_tokenizer=as_auto_tokenizer)
    expected = {"clean_up_tokenization_spaces": True} if as_auto_tokenizer else {}
    assert init_kwargs == expected
    # A config that says otherwise keeps its own setting.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    folder = write_folder(tmp_path, config, None)
    init_kwargs = files.read_init_kwargs(folder, {}, as_auto_tokenizer=as_auto_tokenizer)
    assert init_kwargs == {"clean_up_tokenization_spaces": False}


def test_bad_json_names_the_file(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, None, None)
    (folder / files.SPECIAL_TOKENS_MAP_FILE).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="special_tokens_map.json must hold a JSON object"):
        files.read_init_kwargs(folder, {})


def test_folder_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / files.TOKENIZER_CONFIG_FILE).write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointNotFoundError, match="has no tokenizer.json"):
        files.resolve_tokenizer_folder(tmp_path, {})
    assert files.resolve_tokenizer_folder(write_folder(tmp_path, None, None), {}) == tmp_path


def test_recorded_defaults() -> None:
    assert files.recorded_defaults(None, None) == {}
    truncation = {"max_length": 8, "direction": "left", "stride": 2, "strategy": "only_first"}
    padding = {"pad_type_id": 0, "direction": "right", "pad_to_multiple_of": 4, "length": 16}
    assert files.recorded_defaults(truncation, padding) == {
        "max_length": 8,  # truncation's length wins over padding's
        "truncation_side": "left",
        "stride": 2,
        "truncation_strategy": "only_first",
        "pad_token_type_id": 0,
        "padding_side": "right",
        "pad_to_multiple_of": 4,
    }
    assert files.recorded_defaults(None, padding)["max_length"] == 16


# -- saving ----------------------------------------------------------------------------------------


def test_config_to_save() -> None:
    init_kwargs = {"padding_side": "left", "custom": {"nested": [1]}, "unk_token": "<old>"}
    attributes = {key: f"current {key}" for key in files.SAVED_ATTRIBUTES}
    config = files.config_to_save(
        init_kwargs, attributes, {"unk_token": "<unk>"}, {10: {"content": "b"}, 9: {"content": "a"}}
    )
    assert config == {
        "padding_side": "current padding_side",
        "custom": {"nested": [1]},
        "unk_token": "<unk>",  # the special tokens map wins over the attribute
        # written even though they were not init kwargs, as transformers does
        "model_max_length": "current model_max_length",
        "clean_up_tokenization_spaces": "current clean_up_tokenization_spaces",
        "added_tokens_decoder": {10: {"content": "b"}, 9: {"content": "a"}},
        "tokenizer_class": "BloomTokenizer",
    }
    # A deep copy: the tokenizer's own record is untouched.
    config["custom"]["nested"].append(2)
    assert init_kwargs["custom"] == {"nested": [1]}


def test_special_tokens_map_to_save() -> None:
    special = {
        "bos_token": {"content": "<s>", "lstrip": False, "special": True},
        "eos_token": "</s>",
        "pad_token": None,
        "sep_token": "",
        "additional_special_tokens": ["<a>", {"content": "<b>", "special": True}],
    }
    assert files.special_tokens_map_to_save(special) == {
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>",
        "additional_special_tokens": ["<a>", {"content": "<b>"}],
    }
    assert special["bos_token"]["special"] is True  # the input is not modified
    assert files.special_tokens_map_to_save({"additional_special_tokens": []}) == {}


def test_json_text_layout() -> None:
    text = files.json_text({"b": "é", "a": {10: 1, 9: 2}})
    assert text == '{\n  "a": {\n    "9": 2,\n    "10": 1\n  },\n  "b": "é"\n}\n'


def test_save_folder_and_writes(tmp_path: Path) -> None:
    folder = files.make_save_folder(tmp_path / "new" / "nested")
    assert folder.is_dir()
    paths = files.write_texts(folder, {"b.json": "B", "a.json": "A"})
    assert paths == (str(folder / "b.json"), str(folder / "a.json"))
    assert [Path(path).read_text(encoding="utf-8") for path in paths] == ["B", "A"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "b.json"]  # no temporaries left
    with pytest.raises(ValueError, match="needs a directory, but .* is a file"):
        files.make_save_folder(Path(paths[0]))


# -- where the names live --------------------------------------------------------------------------


def test_public_names_stay_importable_from_bloomlm_tokenizer() -> None:
    import bloomlm
    import bloomlm.encoding
    import bloomlm.tokenizer

    batch_encoding = bloomlm.encoding.BatchEncoding
    assert bloomlm.tokenizer.BatchEncoding is batch_encoding
    assert bloomlm.BatchEncoding is batch_encoding
    assert bloomlm.tokenizer.TENSOR_TYPES == ("pt", "np", "jax")
    for name in ("TOKENIZER_FILE", "TOKENIZER_CONFIG_FILE", "SPECIAL_TOKENS_MAP_FILE"):
        assert getattr(bloomlm.tokenizer, name) == getattr(files, name)
    assert bloomlm.tokenizer.SPECIAL_TOKEN_ATTRIBUTES == files.SPECIAL_TOKEN_ATTRIBUTES
    for name in bloomlm.tokenizer.__all__:
        assert getattr(bloomlm.tokenizer, name) is not None, name

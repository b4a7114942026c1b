"""The tokenizer folder's file rules, without the Rust `tokenizers` library.

This module owns what a tokenizer folder holds (tokenizer.json, with optional tokenizer_config.json
and special_tokens_map.json beside it), how the two JSON companions and the caller's keywords merge
into `BloomTokenizerFast`'s constructor arguments (transformers 4.37's rules), and what
`save_pretrained` writes back. It imports neither `tokenizers` nor a framework, so these rules are
tested on their own.

Special tokens saved as dicts (`{"content": "<s>", "lstrip": false, ...}`) become the caller's token
type through a `make_token` function the caller passes (bloomlm.tokenizer passes one that builds a
`tokenizers.AddedToken`); by default they stay dicts of the known fields. On the way out the caller
hands tokens over as strings or as the dicts they save to.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bloomlm import files
from bloomlm.files import read_json_object

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

SPECIAL_TOKEN_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
ADDITIONAL_SPECIAL_TOKENS = "additional_special_tokens"

# Tokenizer attributes that save_pretrained writes with their current value (transformers writes
# every init kwarg that is also an attribute; these are the ones BloomTokenizerFast has).
SAVED_ATTRIBUTES = (
    *SPECIAL_TOKEN_ATTRIBUTES,
    ADDITIONAL_SPECIAL_TOKENS,
    "add_prefix_space",
    "clean_up_tokenization_spaces",
    "model_max_length",
    "model_input_names",
    "padding_side",
    "truncation_side",
)
# Attributes transformers writes even when they were not init kwargs.
_ALWAYS_SAVED_ATTRIBUTES = ("model_max_length", "clean_up_tokenization_spaces", "padding_side")
# Config keys that say where a file came from, not how to tokenize; never passed on or written back.
_PRIVATE_CONFIG_KEYS = (
    "name_or_path",
    "special_tokens_map_file",
    "tokenizer_file",
    "tokenizer_class",
    "init_inputs",
)
# The fields of a saved added token (`tokenizers.AddedToken`'s constructor arguments).
ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")

MakeToken = Callable[[dict[str, Any]], Any]


# -- loading ---------------------------------------------------------------------------------------


def added_token_fields(value: Mapping[str, Any], special: bool | None = None) -> dict[str, Any]:
    """The AddedToken fields of a saved token dict (extra keys such as "__type" dropped).

    `special`, when given, overrides the saved flag. ValueError when the dict has no "content".
    """
    fields = {key: item for key, item in value.items() if key in ADDED_TOKEN_FIELDS}
    if "content" not in fields:
        raise ValueError(f"a special token given as a dict needs a 'content' entry, got {value!r}")
    if special is not None:
        fields["special"] = special
    return fields


def read_optional_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file is absent (the config files are optional)."""
    return read_json_object(path) if path.is_file() else {}


def resolve_tokenizer_folder(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
    """The local folder for `name_or_path` (a folder, or a hub id fetched with `hub_kwargs`).

    Raises CheckpointNotFoundError when the folder has no tokenizer.json.
    """
    from bloomlm.hub import resolve_model_dir

    wanted = [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE]
    folder = resolve_model_dir(name_or_path, wanted, **hub_kwargs)
    if not (folder / TOKENIZER_FILE).is_file():
        from bloomlm.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(
            f"{folder} has no {TOKENIZER_FILE}; BloomTokenizerFast is built from that file "
            f"(with optional {TOKENIZER_CONFIG_FILE} and {SPECIAL_TOKENS_MAP_FILE} beside it)"
        )
    return folder


def read_init_kwargs(
    folder: Path,
    kwargs: dict[str, Any],
    *,
    as_auto_tokenizer: bool = False,
    make_token: MakeToken = dict,
) -> dict[str, Any]:
    """Constructor arguments for the tokenizer in `folder`: its JSON files merged with `kwargs`."""
    config = read_optional_json_object(folder / TOKENIZER_CONFIG_FILE)
    if as_auto_tokenizer and config.get("tokenizer_class") == "PreTrainedTokenizerFast":
        # bigscience/bloom (176B) names the generic class, for which transformers' AutoTokenizer
        # builds a PreTrainedTokenizerFast whose decode cleans up spaces by default; keep its
        # decoded text identical.
        config.setdefault("clean_up_tokenization_spaces", True)
    special_tokens_map = read_optional_json_object(folder / SPECIAL_TOKENS_MAP_FILE)
    return merge_config(config, special_tokens_map, kwargs, make_token=make_token)


def merge_config(
    config: Mapping[str, Any],
    special_tokens_map: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    *,
    make_token: MakeToken = dict,
) -> dict[str, Any]:
    """Constructor arguments as transformers 4.37 derives them from the JSON files and kwargs.

    Token dicts from special_tokens_map.json become `make_token(fields)`, with `special` set True.
    """
    init_kwargs = {k: v for k, v in config.items() if k not in _PRIVATE_CONFIG_KEYS}
    init_kwargs.update(kwargs)
    # Configs written since transformers 4.34 carry `added_tokens_decoder`, and then transformers
    # ignores special_tokens_map.json entirely; older folders take their special tokens from it.
    if "added_tokens_decoder" in config:
        return init_kwargs
    for key, value in special_tokens_map.items():
        if kwargs.get(key):  # a truthy kwarg wins; a None kwarg does not (transformers' rule)
            continue
        if key == ADDITIONAL_SPECIAL_TOKENS and isinstance(value, list):
            value = _merged_additional_tokens(init_kwargs.get(key), value, make_token)
        elif isinstance(value, dict):
            value = make_token(added_token_fields(value, special=True))
        init_kwargs[key] = value
    return init_kwargs


def _merged_additional_tokens(
    current: list[Any] | None, saved: list[Any], make_token: MakeToken
) -> list[Any]:
    """`current` followed by the saved additional special tokens it does not hold yet."""
    merged = list(current or [])
    for token in saved:
        token = (
            make_token(added_token_fields(token, special=True))
            if isinstance(token, dict)
            else token
        )
        if token not in merged:
            merged.append(token)
    return merged


def recorded_defaults(
    truncation: Mapping[str, Any] | None, padding: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Init kwargs a tokenizer.json saved mid-use implies (its last truncation/padding settings).

    `truncation` and `padding` are the backend's settings as the `tokenizers` library reports them;
    explicit kwargs take precedence over these.
    """
    defaults: dict[str, Any] = {}
    if truncation is not None:
        defaults.update(
            max_length=truncation["max_length"],
            truncation_side=truncation["direction"],
            stride=truncation["stride"],
            truncation_strategy=truncation["strategy"],
        )
    if padding is not None:
        defaults.update(
            pad_token_type_id=padding["pad_type_id"],
            padding_side=padding["direction"],
            pad_to_multiple_of=padding["pad_to_multiple_of"],
        )
        defaults.setdefault("max_length", padding["length"])
    return defaults


# -- saving ----------------------------------------------------------------------------------------


def config_to_save(
    init_kwargs: Mapping[str, Any],
    attributes: Mapping[str, Any],
    special_tokens_map: Mapping[str, Any],
    added_tokens_decoder: Mapping[int, dict[str, Any]],
) -> dict[str, Any]:
    """tokenizer_config.json's content, as transformers 4.37 writes it.

    `attributes` holds the tokenizer's current value of each name in SAVED_ATTRIBUTES;
    `added_tokens_decoder` maps each added token's id to its saved dict.
    """
    config = copy.deepcopy(dict(init_kwargs))
    for key in {*config, *_ALWAYS_SAVED_ATTRIBUTES}:
        if key in SAVED_ATTRIBUTES:
            config[key] = attributes[key]
    config.update(special_tokens_map)
    # Int keys, so json's sort_keys orders them as numbers ("10" after "9"), as transformers' does.
    config["added_tokens_decoder"] = {
        int(index): dict(token) for index, token in added_tokens_decoder.items()
    }
    config["tokenizer_class"] = "BloomTokenizer"
    return config


def special_tokens_map_to_save(special_tokens: Mapping[str, Any]) -> dict[str, Any]:
    """special_tokens_map.json's content: the set special tokens (str or saved dict, or lists).

    A dict is written without its "special" flag, so older transformers versions can read the file.
    """

    def saved(token: Any) -> Any:
        if isinstance(token, Mapping):
            return {key: item for key, item in token.items() if key != "special"}
        return token

    saved_map = {}
    for key, value in special_tokens.items():
        if value:
            saved_map[key] = [saved(t) for t in value] if isinstance(value, list) else saved(value)
    return saved_map


def portable_tokenizer_json(text: str) -> str:
    """`text` (a tokenizer.json) in the form every `tokenizers` since 0.13 reads: BPE merges as
    "a b" strings.

    tokenizers 0.20 and later write each merge as a pair ["a", "b"], which the tokenizers releases
    transformers 4.37 needs cannot parse ("data did not match any variant of untagged enum
    ModelWrapper"). A merge whose parts hold a space has no string form, so such a file is left
    as it is (BLOOM's byte-level tokens never hold one).
    """
    data = json.loads(text)
    model = data.get("model")
    merges = model.get("merges") if isinstance(model, dict) else None
    if not merges or not all(isinstance(merge, list) for merge in merges):
        return text
    if any(" " in part for merge in merges for part in merge):
        return text
    model["merges"] = [" ".join(merge) for merge in merges]
    return json.dumps(data, indent=2, ensure_ascii=False)


def json_text(content: Mapping[str, Any]) -> str:
    """How the JSON companions are written: sorted keys, 2-space indent, UTF-8, final newline."""
    return json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def make_save_folder(save_directory: str | os.PathLike) -> Path:
    """`save_directory` as a Path, made if missing; ValueError when it is a file."""
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_pretrained needs a directory, but {folder} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_texts(folder: Path, texts: Mapping[str, str]) -> tuple[str, ...]:
    """Write each name -> text of `texts` into `folder`, all in one commit (`files.folder_save`:
    the tokenizer's files change together, the folder's other files stay); the paths, in order."""
    with files.folder_save(folder, files.owns_names(*texts)) as staging:
        for name, text in texts.items():
            files.write_text(staging / name, text)
    return tuple(str(folder / name) for name in texts)

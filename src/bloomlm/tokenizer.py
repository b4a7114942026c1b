"""BLOOM's fast tokenizer: the `tokenizers` library over tokenizer.json, with transformers' API.

`BloomTokenizerFast` gives the same ids, masks, offsets and decoded text as transformers'
`BloomTokenizerFast` on the same folder, and `save_pretrained` writes files transformers reads back
unchanged. `AutoTokenizer.from_pretrained` is a thin alias that always builds a
`BloomTokenizerFast`.

The Rust backend does the real work (pre-tokenising, BPE, truncation, padding, offsets); this module
owns the class: it turns transformers' arguments into backend settings, and backend encodings into a
`BatchEncoding`. Two framework-free neighbours hold the rest: `bloomlm.tokenizer_files` (what the
folder's JSON files hold, how they merge with the caller's keywords, what is written back) and
`bloomlm.encoding` (`BatchEncoding` and the tensor conversions); both names are re-exported here.
Imports stay light: torch and jax are imported only when tensors of that kind are asked for.

Deliberate differences from transformers 4.37, each where transformers' behaviour is an accident:
- `padding_side` defaults to "left" (BLOOM's, and what every bigscience tokenizer_config.json says);
  transformers falls back to "right" when the config omits it.
- A ragged batch with `return_tensors="np"` raises like "pt"/"jax" do (transformers builds an
  object array).
- An empty text with `return_tensors` gives integer tensors of shape (1, 0) (transformers gives
  floats).
- `encode(["a", "b"])` raises (transformers silently encodes the two strings as a *pair*).
- Truncation settings the backend cannot meet raise ValueError (transformers lets a bare Exception,
  or for some stride/pair combinations a Rust panic, escape).
"""

from __future__ import annotations

import json
import logging
import operator
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Encoding, Tokenizer

from bloomlm import files
from bloomlm.encoding import (
    TENSOR_TYPES,
    BatchEncoding,
    check_return_tensors,
    enum_choice,
    framework_of,
    to_python,
)
from bloomlm.tokenizer_compat import PreTrainedTokenizerFastAPI, legacy_padding
from bloomlm.tokenizer_files import (
    ADDITIONAL_SPECIAL_TOKENS,
    SAVED_ATTRIBUTES,
    SPECIAL_TOKEN_ATTRIBUTES,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    added_token_fields,
    config_to_save,
    json_text,
    make_save_folder,
    portable_tokenizer_json,
    read_init_kwargs,
    recorded_defaults,
    resolve_tokenizer_folder,
    special_tokens_map_to_save,
    write_texts,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ADDITIONAL_SPECIAL_TOKENS",
    "LARGE_INTEGER",
    "PADDING_STRATEGIES",
    "SPECIAL_TOKENS_MAP_FILE",
    "SPECIAL_TOKEN_ATTRIBUTES",
    "TENSOR_TYPES",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "TRUNCATION_STRATEGIES",
    "VERY_LARGE_INTEGER",
    "AutoTokenizer",
    "BatchEncoding",
    "BloomTokenizerFast",
    "clean_up_tokenization",
]

# transformers' "no limit" model_max_length, and the threshold above which a length is "no limit".
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second", "do_not_truncate")

_SPECIAL_TOKEN_KEYS = (*SPECIAL_TOKEN_ATTRIBUTES, ADDITIONAL_SPECIAL_TOKENS)
# AutoTokenizer keywords that choose a tokenizer class in transformers; there is one class here.
_AUTO_ONLY_KEYWORDS = ("use_fast", "tokenizer_type")

_TEXT_TYPES_MESSAGE = (
    "`str` (one text), `list[str]` (a batch of texts, or one pre-split text with "
    "is_split_into_words=True) or `list[list[str]]` (a batch of pre-split texts)"
)


# -- backend helpers -------------------------------------------------------------------------------


def _as_added_token(value: Any, special: bool | None = None) -> AddedToken:
    """An AddedToken from a saved dict (extra keys such as "__type" ignored); AddedTokens as is."""
    if isinstance(value, AddedToken):
        return value
    return AddedToken(**added_token_fields(value, special))


def _added_token_from_fields(fields: dict[str, Any]) -> AddedToken:
    """tokenizer_files' `make_token`: special tokens read from the JSON files become AddedTokens."""
    return AddedToken(**fields)


def _token_content(value: str | AddedToken | None) -> str | None:
    return value.content if isinstance(value, AddedToken) else value


def _saved_form(value: Any) -> Any:
    """A special token as special_tokens_map.json stores it: AddedTokens as their saved dicts."""
    if isinstance(value, list):
        return [_saved_form(token) for token in value]
    return value.__getstate__() if isinstance(value, AddedToken) else value


def _with_added_token_flags(init_kwargs: dict[str, Any], backend: Tokenizer) -> None:
    """Give each special token that is also an added token that token's flags, in place.

    The added tokens are the config's `added_tokens_decoder` if it has one, else the backend's.
    """
    saved_added = init_kwargs.get("added_tokens_decoder")
    if saved_added:
        added = map(_as_added_token, saved_added.values())
    else:
        added = backend.get_added_tokens_decoder().values()
    added_by_content = {token.content: token for token in added}
    for key in SPECIAL_TOKEN_ATTRIBUTES:
        value = init_kwargs.get(key)
        if isinstance(value, dict):
            value = _as_added_token(value, special=True)
        if value is not None:
            init_kwargs[key] = added_by_content.get(_token_content(value), value)


def _make_backend(
    tokenizer_object: Tokenizer | None,
    tokenizer_file: str | os.PathLike | None,
    add_prefix_space: bool,
) -> Tokenizer:
    """The backend: `tokenizer_object` itself, or `tokenizer_file` loaded."""
    if tokenizer_object is None and tokenizer_file is None:
        raise ValueError(
            "BloomTokenizerFast needs a tokenizers.Tokenizer or a tokenizer_file (tokenizer.json)"
        )
    if tokenizer_object is not None:
        backend = tokenizer_object
    else:
        backend = _read_tokenizer_file(tokenizer_file)
    if add_prefix_space:
        _with_prefix_space(backend)
    return backend


def _read_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    try:
        return Tokenizer.from_file(os.fspath(path))
    except Exception as err:  # tokenizers raises a bare Exception that does not name the file
        message = f"{os.fspath(path)} is not a tokenizer file tokenizers can read ({err})"
        raise ValueError(message) from err


def _with_prefix_space(backend: Tokenizer) -> None:
    """Turn on every ByteLevel `add_prefix_space` in the backend's pre-tokenizer and decoder.

    transformers does this by rewriting `"add_prefix_space":false` inside the pickled pre-tokenizer
    and decoder. Here the same JSON is edited, and the edited components are built by a throwaway
    tokenizer holding only them (cheap, unlike re-parsing BLOOM's 250k-token vocabulary).
    """

    def switch_on(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: True if k == "add_prefix_space" and v is False else switch_on(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [switch_on(item) for item in node]
        return node

    parts = {
        part: switch_on(json.loads(getattr(backend, part).__getstate__()))
        for part in ("pre_tokenizer", "decoder")
        if getattr(backend, part) is not None
    }
    carrier = Tokenizer.from_str(
        json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}, **parts})
    )
    for part in parts:
        setattr(backend, part, getattr(carrier, part))


# -- argument checks -------------------------------------------------------------------------------


def _padding_strategy(padding: Any) -> str:
    if padding is True:
        return "longest"
    if padding is False:
        return "do_not_pad"
    use = "True or 'longest', 'max_length', False or 'do_not_pad'"
    return enum_choice("padding", padding, PADDING_STRATEGIES, use)


def _truncation_strategy(truncation: Any) -> str:
    if truncation is True:
        return "longest_first"
    if truncation is None or truncation is False:
        return "do_not_truncate"
    use = "True or 'longest_first', 'only_first', 'only_second', False or 'do_not_truncate'"
    return enum_choice("truncation", truncation, TRUNCATION_STRATEGIES, use)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (or None), got {value!r}")


def _check_side(name: str, value: Any) -> str:
    if value not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
    return value


def _feature_columns(encoded_inputs: Any) -> Mapping[str, Any]:
    """`pad`'s input as one mapping of feature -> values (a list of dicts becomes a dict)."""
    if (
        isinstance(encoded_inputs, list | tuple)
        and encoded_inputs
        and isinstance(encoded_inputs[0], Mapping)
    ):
        encoded_inputs = {key: [row[key] for row in encoded_inputs] for key in encoded_inputs[0]}
    if not isinstance(encoded_inputs, Mapping) or "input_ids" not in encoded_inputs:
        if isinstance(encoded_inputs, Mapping):
            keys = list(encoded_inputs.keys())
        else:
            keys = type(encoded_inputs)
        raise ValueError(f"pad needs a dict (or list of dicts) holding input_ids; got {keys}")
    return encoded_inputs


def _without_batch_axis(features: dict[str, list[Any]]) -> dict[str, Any]:
    """One text's features as flat lists (transformers keeps `length` as a 1-list)."""
    return {k: v[0] if v and isinstance(v[0], list) else v for k, v in features.items()}


def _is_text(value: Any) -> bool:
    """transformers' test of a valid text argument: str, list of str, or list of lists of str."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list | tuple):
        return False
    if not value or isinstance(value[0], str):
        return all(isinstance(item, str) for item in value)
    return all(
        isinstance(item, list | tuple) and all(isinstance(w, str) for w in item) for item in value
    )


def _as_id_list(token_ids: Any, what: str = "token_ids") -> list[int]:
    """Python ints from an int, a list of ints, or a 0/1-d torch tensor, numpy or jax array."""
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    if not isinstance(token_ids, list | tuple):
        token_ids = [token_ids]
    try:
        ids = [operator.index(i) for i in token_ids]
    except TypeError:
        raise TypeError(
            f"{what} must be an int or a flat sequence of ints (list, tuple, 1-d tensor or array); "
            f"got {type(token_ids).__name__} {str(token_ids)[:80]}. "
            "Use batch_decode for several sequences."
        ) from None
    if any(i < 0 for i in ids):
        raise ValueError(f"{what} must be >= 0, got {min(ids)}")
    return ids


def clean_up_tokenization(text: str) -> str:
    """transformers' English clean-up: drop the space before punctuation and in contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


# -- special tokens as attributes ------------------------------------------------------------------


class _SpecialToken:
    """`tokenizer.pad_token` and friends: the token string, or None when unset."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, tokenizer: Any, owner: type | None = None) -> Any:
        if tokenizer is None:
            return self
        return _token_content(tokenizer._special_tokens.get(self.name))

    def __set__(self, tokenizer: Any, value: str | AddedToken | None) -> None:
        if value is not None and not isinstance(value, str | AddedToken):
            raise TypeError(
                f"{self.name} must be a str, a tokenizers.AddedToken or None, "
                f"got {type(value).__name__}"
            )
        tokenizer._special_tokens[self.name] = value


class _SpecialTokenId:
    """`tokenizer.pad_token_id` and friends: the token's id (the unk id if not in the vocab)."""

    def __init__(self, token_attribute: str) -> None:
        self.token_attribute = token_attribute

    def __get__(self, tokenizer: Any, owner: type | None = None) -> Any:
        if tokenizer is None:
            return self
        token = getattr(tokenizer, self.token_attribute)
        return None if token is None else tokenizer.convert_tokens_to_ids(token)

    def __set__(self, tokenizer: Any, value: int | None) -> None:
        token = None if value is None else tokenizer.convert_ids_to_tokens(operator.index(value))
        setattr(tokenizer, self.token_attribute, token)


# -- the tokenizer ---------------------------------------------------------------------------------


class BloomTokenizerFast(PreTrainedTokenizerFastAPI):
    """BLOOM's byte-level BPE tokenizer, compatible with transformers 4.37's `BloomTokenizerFast`.

    Build it with `from_pretrained(folder)`; call it on a str, a list of str, text pairs or
    pre-split words.
    """

    is_fast = True
    vocab_files_names = {"tokenizer_file": TOKENIZER_FILE}

    bos_token = _SpecialToken()
    eos_token = _SpecialToken()
    unk_token = _SpecialToken()
    sep_token = _SpecialToken()
    pad_token = _SpecialToken()
    cls_token = _SpecialToken()
    mask_token = _SpecialToken()
    bos_token_id = _SpecialTokenId("bos_token")
    eos_token_id = _SpecialTokenId("eos_token")
    unk_token_id = _SpecialTokenId("unk_token")
    sep_token_id = _SpecialTokenId("sep_token")
    pad_token_id = _SpecialTokenId("pad_token")
    cls_token_id = _SpecialTokenId("cls_token")
    mask_token_id = _SpecialTokenId("mask_token")

    # Over 40 lines for its signature: transformers' constructor arguments, each named and typed.
    def __init__(
        self,
        tokenizer_object: Tokenizer | None = None,
        *,
        tokenizer_file: str | os.PathLike | None = None,
        unk_token: str | AddedToken | None = "<unk>",
        bos_token: str | AddedToken | None = "<s>",
        eos_token: str | AddedToken | None = "</s>",
        pad_token: str | AddedToken | None = "<pad>",
        add_prefix_space: bool = False,
        clean_up_tokenization_spaces: bool = False,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        model_max_length: int | None = None,
        model_input_names: list[str] | None = None,
        name_or_path: str | os.PathLike = "",
        added_tokens_decoder: Mapping[int | str, Any] | None = None,
        **config: Any,
    ) -> None:
        """Wrap a `tokenizers.Tokenizer` (used as is, not copied) or load `tokenizer_file`.

        The other arguments are tokenizer_config.json keys; unknown keys are kept and written back
        by `save_pretrained`, as transformers does.
        """
        self._tokenizer = _make_backend(tokenizer_object, tokenizer_file, add_prefix_space)
        # A tokenizer.json saved mid-use records its last truncation/padding: like transformers,
        # take those as defaults for what the config does not set.
        recorded = recorded_defaults(self._tokenizer.truncation, self._tokenizer.padding)
        options = {
            "padding_side": padding_side or recorded.get("padding_side"),
            "truncation_side": truncation_side or recorded.get("truncation_side"),
            "model_max_length": model_max_length,
            "model_input_names": model_input_names,
        }
        config = {**{k: v for k, v in recorded.items() if not k.endswith("_side")}, **config}
        special = {
            "unk_token": unk_token,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            **{k: config.pop(k) for k in _SPECIAL_TOKEN_KEYS if k in config},
        }
        # What save_pretrained writes back: every key given, with current values for the attributes.
        self.init_kwargs: dict[str, Any] = {
            **special,
            "add_prefix_space": add_prefix_space,
            "clean_up_tokenization_spaces": clean_up_tokenization_spaces,
            **{key: value for key, value in options.items() if value is not None},
            **config,
        }
        self.name_or_path = os.fspath(name_or_path)
        self.add_prefix_space = add_prefix_space
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._set_options(**options)
        self._warned: set[str] = set()
        self._set_special_tokens(special)
        self._add_missing_tokens(added_tokens_decoder or {})

    def _set_options(
        self,
        padding_side: str | None,
        truncation_side: str | None,
        model_max_length: int | None,
        model_input_names: list[str] | None,
    ) -> None:
        """Attributes with defaults of their own, for when neither config nor backend sets them."""
        # BLOOM pads on the left (see the module docstring).
        self.padding_side = padding_side or "left"
        self.truncation_side = truncation_side or "right"
        self.model_max_length = (
            model_max_length if model_max_length is not None else VERY_LARGE_INTEGER
        )
        self.model_input_names = list(model_input_names or ["input_ids", "attention_mask"])

    def _set_special_tokens(self, special: Mapping[str, Any]) -> None:
        self._special_tokens: dict[str, Any] = {}
        for key, value in special.items():
            if isinstance(value, dict):
                value = _as_added_token(value, special=True)
            if key == ADDITIONAL_SPECIAL_TOKENS:
                self.additional_special_tokens = value
            else:
                setattr(self, key, value)

    def _add_missing_tokens(self, added_tokens_decoder: Mapping[int | str, Any]) -> None:
        """Put the config's added tokens and any special token the backend lacks into the backend.

        Mirrors transformers: tokens are added in id order, in runs of special / non-special tokens
        (one backend call per run, since each call rebuilds the backend's matcher).
        """
        to_add = [
            _as_added_token(token)
            for _, token in sorted(added_tokens_decoder.items(), key=lambda i: int(i[0]))
        ]
        known = set(self.get_added_vocab()) | {token.content for token in to_add}
        for token in self._special_tokens_extended():
            if _token_content(token) not in known:
                to_add.append(token)
                known.add(_token_content(token))
        special_contents = set(self.all_special_tokens)
        runs: list[tuple[bool, list[Any]]] = []
        for token in to_add:
            flagged = getattr(token, "special", False)
            is_special = _token_content(token) in special_contents or flagged
            if runs and runs[-1][0] == is_special:
                runs[-1][1].append(token)
            else:
                runs.append((is_special, [token]))
        for is_special, tokens in runs:
            self._add_to_backend(tokens, special=is_special)

    def _add_to_backend(self, tokens: list[str | AddedToken], special: bool) -> int:
        if special:
            return self._tokenizer.add_special_tokens(tokens)
        return self._tokenizer.add_tokens(tokens)

    # -- loading and saving ------------------------------------------------------------------------

    @classmethod
    @files.consistent_load  # a save committing meanwhile makes it read the folder again
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> BloomTokenizerFast:
        """Load from a folder with tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)
        or a hub id.

        Hub keywords (cache_dir, revision, local_files_only, token, ...) choose where files come
        from; every other keyword overrides a tokenizer_config.json entry (e.g.
        `padding_side="right"`, `pad_token=...`, `add_prefix_space=True`).
        """
        return cls._load(name_or_path, kwargs, as_auto_tokenizer=False)

    @classmethod
    def _load(
        cls, name_or_path: str | os.PathLike, kwargs: dict[str, Any], as_auto_tokenizer: bool
    ) -> BloomTokenizerFast:
        from bloomlm.hub import HUB_KEYWORDS

        hub_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in HUB_KEYWORDS}
        folder = resolve_tokenizer_folder(name_or_path, hub_kwargs)
        backend = _read_tokenizer_file(folder / TOKENIZER_FILE)
        init_kwargs = read_init_kwargs(
            folder, kwargs, as_auto_tokenizer=as_auto_tokenizer, make_token=_added_token_from_fields
        )
        _with_added_token_flags(init_kwargs, backend)
        return cls(backend, name_or_path=os.fspath(name_or_path), **init_kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str, ...]:
        """Write tokenizer_config.json, special_tokens_map.json and tokenizer.json, each atomically.

        transformers 4.37's `from_pretrained` reads the folder back to the same tokenizer.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "push_to_hub is not supported; save to a folder and upload it with huggingface_hub"
            )
        folder = make_save_folder(save_directory)
        attributes = {key: getattr(self, key) for key in SAVED_ATTRIBUTES}
        added_tokens = {index: t.__getstate__() for index, t in self.added_tokens_decoder.items()}
        config = config_to_save(self.init_kwargs, attributes, self.special_tokens_map, added_tokens)
        special = {key: _saved_form(value) for key, value in self._special_tokens.items()}
        texts = {
            TOKENIZER_CONFIG_FILE: json_text(config),
            SPECIAL_TOKENS_MAP_FILE: json_text(special_tokens_map_to_save(special)),
            TOKENIZER_FILE: portable_tokenizer_json(self._tokenizer.to_str(pretty=True)),
        }
        return write_texts(folder, texts)

    # -- vocabulary --------------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` doing the work."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self._tokenizer.get_added_tokens_decoder().items()))

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: index for index, token in self.added_tokens_decoder.items()}

    def add_tokens(
        self, new_tokens: str | AddedToken | list[str | AddedToken], special_tokens: bool = False
    ) -> int:
        """Add tokens to the vocabulary; returns how many were new."""
        tokens = [new_tokens] if isinstance(new_tokens, str | AddedToken) else list(new_tokens)
        return self._add_to_backend(tokens, special=special_tokens)

    def add_special_tokens(
        self, special_tokens_dict: Mapping[str, Any], replace_additional_special_tokens: bool = True
    ) -> int:
        """Set special tokens (`{"pad_token": "[PAD]"}`) and add them to the vocabulary.

        `additional_special_tokens` replace the current list, or, with
        `replace_additional_special_tokens=False`, join it. Returns how many were new.
        """
        new_tokens: list[str | AddedToken] = []
        for key, value in special_tokens_dict.items():
            if key == ADDITIONAL_SPECIAL_TOKENS:
                if not replace_additional_special_tokens:
                    known = set(self.additional_special_tokens)
                    current = self._special_tokens.get(ADDITIONAL_SPECIAL_TOKENS) or []
                    value = [*current, *(t for t in value if _token_content(t) not in known)]
                self.additional_special_tokens = value
                new_tokens.extend(value)
            elif key in SPECIAL_TOKEN_ATTRIBUTES:
                setattr(self, key, value)
                new_tokens.append(value)
            else:
                allowed = ", ".join((*SPECIAL_TOKEN_ATTRIBUTES, ADDITIONAL_SPECIAL_TOKENS))
                raise ValueError(f"{key!r} is not a special token attribute; use one of {allowed}")
        return self._add_to_backend(new_tokens, special=True)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tokenizer.num_special_tokens_to_add(pair)

    # -- special tokens ----------------------------------------------------------------------------

    @property
    def additional_special_tokens(self) -> list[str]:
        return [
            _token_content(t) for t in self._special_tokens.get(ADDITIONAL_SPECIAL_TOKENS) or []
        ]

    @additional_special_tokens.setter
    def additional_special_tokens(self, value: Iterable[str | AddedToken] | None) -> None:
        tokens = list(value or [])
        if not all(isinstance(t, str | AddedToken) for t in tokens):
            raise TypeError(
                "additional_special_tokens must be a list of str or tokenizers.AddedToken"
            )
        self._special_tokens[ADDITIONAL_SPECIAL_TOKENS] = tokens

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.additional_special_tokens)

    @property
    def pad_token_type_id(self) -> int:
        return 0

    @property
    def special_tokens_map(self) -> dict[str, str | list[str]]:
        """The set special tokens, attribute name -> token string(s)."""
        attributes = (*SPECIAL_TOKEN_ATTRIBUTES, ADDITIONAL_SPECIAL_TOKENS)
        return {key: getattr(self, key) for key in attributes if getattr(self, key)}

    def _special_tokens_extended(self) -> list[str | AddedToken]:
        """The distinct special tokens as given (str or AddedToken), in transformers' order."""
        tokens: list[str | AddedToken] = []
        for key in (*SPECIAL_TOKEN_ATTRIBUTES, ADDITIONAL_SPECIAL_TOKENS):
            value = self._special_tokens.get(key)
            for token in value if isinstance(value, list) else [value] if value else []:
                if _token_content(token) not in {_token_content(t) for t in tokens}:
                    tokens.append(token)
        return tokens

    @property
    def all_special_tokens(self) -> list[str]:
        return [_token_content(token) for token in self._special_tokens_extended()]

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        self._padding_side = _check_side("padding_side", value)

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        self._truncation_side = _check_side("truncation_side", value)

    # -- tokens <-> ids ----------------------------------------------------------------------------

    def convert_tokens_to_ids(self, tokens: str | Sequence[str] | None) -> int | list[int] | None:
        """Token string(s) to id(s); a token not in the vocabulary maps to the unk id."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(token) for token in tokens]

    def _token_to_id(self, token: str) -> int | None:
        index = self._tokenizer.token_to_id(token)
        return index if index is not None else self.unk_token_id

    def convert_ids_to_tokens(
        self, ids: Any, skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        """Id(s) to token string(s); an int gives a str, a sequence or tensor gives a list."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if not isinstance(ids, list | tuple):
            return self._tokenizer.id_to_token(operator.index(ids))
        special_ids = set(self.all_special_ids) if skip_special_tokens else set()
        return [
            self._tokenizer.id_to_token(i) for i in _as_id_list(ids, "ids") if i not in special_ids
        ]

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        """The token strings of one text (or pair)."""
        return self(text, pair, add_special_tokens=add_special_tokens, **kwargs).tokens()

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tokenizer.decoder.decode(tokens)

    # -- encoding ----------------------------------------------------------------------------------

    # Over 40 lines for its signature: transformers' 17 call arguments; the body is named steps.
    def __call__(
        self,
        text: str | Sequence[str] | Sequence[Sequence[str]],
        text_pair: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        pad_to_max_length: bool = False,
    ) -> BatchEncoding:
        """Tokenize one text, a batch, text pairs, or pre-split words (`is_split_into_words=True`).

        One text gives flat lists (tensors with a batch axis of 1 when `return_tensors` is set); a
        batch gives one row per text, plus one per overflow if `return_overflowing_tokens=True`.
        `pad_to_max_length` is transformers' deprecated spelling of `padding` (it warns).
        """
        padding = legacy_padding(padding, pad_to_max_length, max_length, verbose)
        tensor_type = self._check_call(
            text,
            text_pair,
            return_tensors,
            max_length,
            stride,
            pad_to_multiple_of,
            is_split_into_words,
        )
        batch, is_batched = self._batch_inputs(text, text_pair, is_split_into_words)
        padding_strategy, truncation_strategy, max_length = self._resolve_strategies(
            padding, truncation, max_length, pad_to_multiple_of, verbose
        )
        self._configure_truncation(truncation_strategy, max_length, stride)
        self._configure_padding(padding_strategy, max_length, pad_to_multiple_of)
        encodings = self._encode_batch(batch, add_special_tokens, is_split_into_words)

        features, rows = self._collect_features(
            encodings,
            return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask,
            return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask,
            return_offsets_mapping=return_offsets_mapping,
            return_length=return_length,
        )
        if verbose and max_length is None:
            self._warn_if_too_long(features["input_ids"])
        if not is_batched and tensor_type is None and not return_overflowing_tokens:
            features = _without_batch_axis(features)
        return BatchEncoding(features, rows, tensor_type=tensor_type)

    def _check_call(
        self,
        text: Any,
        text_pair: Any,
        return_tensors: Any,
        max_length: Any,
        stride: Any,
        pad_to_multiple_of: Any,
        is_split_into_words: bool,
    ) -> str | None:
        """Reject arguments `__call__` cannot take; returns the checked tensor type."""
        if text is None:
            raise ValueError(f"text is required: {_TEXT_TYPES_MESSAGE}")
        for name, value in (("text", text), ("text_pair", text_pair)):
            if value is not None and not _is_text(value):
                raise ValueError(
                    f"{name} must be {_TEXT_TYPES_MESSAGE}; got {type(value).__name__}"
                )
        tensor_type = check_return_tensors(return_tensors)
        _check_count("max_length", max_length, 0)
        _check_count("stride", stride, 0)
        _check_count("pad_to_multiple_of", pad_to_multiple_of, 1)
        if is_split_into_words and not self.add_prefix_space:
            raise ValueError(
                f"You need to instantiate {type(self).__name__} with add_prefix_space=True to use "
                "it with pretokenized inputs (is_split_into_words=True), e.g. "
                "BloomTokenizerFast.from_pretrained(path, add_prefix_space=True)."
            )
        return tensor_type

    def _batch_inputs(
        self, text: Any, text_pair: Any, is_split_into_words: bool
    ) -> tuple[list[Any], bool]:
        """The backend's batch (texts, or (text, pair) tuples), and whether `text` was a batch."""
        is_batched = isinstance(text, list | tuple) and (
            not is_split_into_words or (len(text) > 0 and isinstance(text[0], list | tuple))
        )
        if not is_batched:
            # As in transformers, an empty text_pair ("") means no pair at all.
            return ([(text, text_pair)] if text_pair else [text]), False
        return self._batch_from_lists(text, text_pair), True

    def _batch_from_lists(self, text: Any, text_pair: Any) -> list[Any]:
        """Batched `text` (and `text_pair`, one entry per text, if given) as the backend's batch."""
        if len(text) == 0:
            raise ValueError("text is an empty batch; pass at least one text")
        if text_pair is None:
            return list(text)
        if isinstance(text_pair, str):
            raise TypeError(
                "when text is a batch, text_pair must be a list or tuple with one entry per text"
            )
        if len(text_pair) != len(text):
            raise ValueError(
                f"batch length of text ({len(text)}) does not match batch length of text_pair "
                f"({len(text_pair)})"
            )
        return list(zip(text, text_pair))

    def _resolve_strategies(
        self,
        padding: Any,
        truncation: Any,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        verbose: bool,
    ) -> tuple[str, str, int | None]:
        """transformers' rules turning padding/truncation/max_length into strategies + a length."""
        truncation = self._implied_truncation(padding, truncation, max_length, verbose)
        padding_strategy = _padding_strategy(padding)
        truncation_strategy = _truncation_strategy(truncation)
        no_truncation = truncation_strategy == "do_not_truncate"
        if padding is True and verbose and max_length is not None and no_truncation:
            # stacklevel 3: the caller of __call__ or pad (both call this method directly).
            warnings.warn(
                "`max_length` is ignored when `padding`=`True` and there is no truncation "
                "strategy. To pad to max length, use `padding='max_length'`.",
                stacklevel=3,
            )
        if max_length is None:
            padding_strategy, truncation_strategy, max_length = self._default_to_model_max_length(
                padding_strategy, truncation_strategy, verbose
            )
        self._check_strategies(
            padding_strategy, truncation_strategy, max_length, pad_to_multiple_of
        )
        return padding_strategy, truncation_strategy, max_length

    def _implied_truncation(
        self, padding: Any, truncation: Any, max_length: int | None, verbose: bool
    ) -> Any:
        """`truncation`, or "longest_first" when max_length comes alone (transformers' old rule)."""
        if max_length is None or padding is not False or truncation is not None:
            return truncation
        if verbose:
            self._warn_once(
                "Truncation was not explicitly activated but `max_length` is provided a specific "
                "value, please use `truncation=True` to explicitly truncate examples to max "
                "length. Defaulting to 'longest_first' truncation strategy."
            )
        return "longest_first"

    def _check_strategies(
        self,
        padding_strategy: str,
        truncation_strategy: str,
        max_length: int | None,
        pad_to_multiple_of: int | None,
    ) -> None:
        """Reject padding without a pad token, or a truncation length padding would overrun."""
        if padding_strategy != "do_not_pad" and (
            self.pad_token is None or (self.pad_token_id or 0) < 0
        ):
            raise ValueError(
                "Asking to pad but the tokenizer does not have a padding token. Set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token`."
            )
        if (
            truncation_strategy != "do_not_truncate"
            and padding_strategy != "do_not_pad"
            and pad_to_multiple_of is not None
            and max_length is not None
            and max_length % pad_to_multiple_of != 0
        ):
            raise ValueError(
                "Truncation and padding are both activated but truncation length "
                f"({max_length}) is not a multiple of pad_to_multiple_of ({pad_to_multiple_of})."
            )

    def _default_to_model_max_length(
        self, padding_strategy: str, truncation_strategy: str, verbose: bool
    ) -> tuple[str, str, int | None]:
        """No max_length given: use model_max_length, or, when the model has none, switch off the
        max_length padding and the truncation that would need it (transformers' rule)."""
        needs_length = padding_strategy == "max_length" or truncation_strategy != "do_not_truncate"
        if self.model_max_length <= LARGE_INTEGER:
            return (
                padding_strategy,
                truncation_strategy,
                self.model_max_length if needs_length else None,
            )
        if padding_strategy == "max_length":
            if verbose:
                self._warn_once(
                    "Asking to pad to max_length but no maximum length is provided and the model "
                    "has no predefined maximum length. Default to no padding."
                )
            padding_strategy = "do_not_pad"
        if truncation_strategy != "do_not_truncate":
            if verbose:
                self._warn_once(
                    "Asking to truncate to max_length but no maximum length is provided and the "
                    "model has no predefined maximum length. Default to no truncation."
                )
            truncation_strategy = "do_not_truncate"
        return padding_strategy, truncation_strategy, None

    def _configure_truncation(self, strategy: str, max_length: int | None, stride: int) -> None:
        """Set the backend's truncation for this call (left set afterwards, as in transformers)."""
        backend = self._tokenizer
        if strategy == "do_not_truncate":
            if backend.truncation is not None:
                backend.no_truncation()
            return
        target = {
            "max_length": max_length,
            "stride": stride,
            "strategy": strategy,
            "direction": self.truncation_side,
        }
        current = backend.truncation
        if current is None or {k: current.get(k) for k in target} != target:
            backend.enable_truncation(**target)

    def _configure_padding(
        self, strategy: str, max_length: int | None, pad_to_multiple_of: int | None
    ) -> None:
        """Set the backend's padding for this call (left set afterwards, as in transformers)."""
        backend = self._tokenizer
        if strategy == "do_not_pad":
            if backend.padding is not None:
                backend.no_padding()
            return
        target = {
            "length": max_length if strategy == "max_length" else None,
            "direction": self.padding_side,
            "pad_id": self.pad_token_id,
            "pad_token": self.pad_token,
            "pad_type_id": self.pad_token_type_id,
            "pad_to_multiple_of": pad_to_multiple_of,
        }
        if backend.padding != target:
            backend.enable_padding(**target)

    def _encode_batch(
        self, batch: list[Any], add_special_tokens: bool, is_pretokenized: bool
    ) -> list[Encoding]:
        try:
            return self._tokenizer.encode_batch(
                batch, add_special_tokens=add_special_tokens, is_pretokenized=is_pretokenized
            )
        except BaseException as err:
            # Truncation that cannot be met arrives as a bare Exception, or as a Rust panic (pyo3's
            # PanicException, a BaseException) when a stride does not fit a pair's share of
            # max_length. Both are bad arguments: make them a ValueError. Other errors already say
            # what is wrong.
            if type(err) is Exception or type(err).__name__ == "PanicException":
                raise ValueError(
                    f"{err} (the truncation, max_length and stride settings cannot be met)"
                ) from err
            raise

    def _collect_features(
        self,
        encodings: list[Encoding],
        *,
        return_token_type_ids: bool | None,
        return_attention_mask: bool | None,
        return_overflowing_tokens: bool,
        return_special_tokens_mask: bool,
        return_offsets_mapping: bool,
        return_length: bool,
    ) -> tuple[dict[str, list[Any]], list[Encoding]]:
        """Backend encodings -> feature lists, in transformers' key order; overflows: extra rows."""
        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        wanted = {
            "input_ids": (True, lambda e: e.ids),
            "token_type_ids": (return_token_type_ids, lambda e: e.type_ids),
            "attention_mask": (return_attention_mask, lambda e: e.attention_mask),
            "special_tokens_mask": (return_special_tokens_mask, lambda e: e.special_tokens_mask),
            "offset_mapping": (return_offsets_mapping, lambda e: e.offsets),
            "length": (return_length, lambda e: len(e.ids)),
        }
        rows: list[Encoding] = []
        sample_of_row: list[int] = []
        for sample, encoding in enumerate(encodings):
            group = [encoding, *encoding.overflowing] if return_overflowing_tokens else [encoding]
            rows.extend(group)
            sample_of_row.extend([sample] * len(group))
        features = {key: [read(row) for row in rows] for key, (on, read) in wanted.items() if on}
        if return_overflowing_tokens:
            features["overflow_to_sample_mapping"] = sample_of_row
        return features, rows

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def _warn_if_too_long(self, rows: list[list[int]]) -> None:
        longest = max((len(row) for row in rows), default=0)
        if longest > self.model_max_length:
            self._warn_once(
                "Token indices sequence length is longer than the specified maximum sequence "
                f"length for this model ({longest} > {self.model_max_length}). Running this "
                "sequence through the model will result in indexing errors"
            )

    def encode(
        self, text: str | Sequence[str], text_pair: str | Sequence[str] | None = None, **kwargs: Any
    ) -> list[int] | Any:
        """The input ids of one text (or pair); `return_tensors` gives a [1, T] tensor instead."""
        if isinstance(text, list | tuple) and not kwargs.get("is_split_into_words"):
            raise TypeError(
                "encode takes one text (str); to encode a batch call the tokenizer on a list"
            )
        return self(text, text_pair, **kwargs)["input_ids"]

    # -- padding encoded inputs --------------------------------------------------------------------

    def pad(
        self,
        encoded_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Pad already-encoded inputs (one dict, a dict of rows, or a list of dicts, as a collate_fn
        gets them).

        Tensor inputs come back as tensors of the same framework unless `return_tensors` says
        otherwise.
        """
        encoded_inputs = _feature_columns(encoded_inputs)
        features = {key: to_python(value) for key, value in encoded_inputs.items()}
        return_tensors = return_tensors or framework_of(encoded_inputs["input_ids"])
        ids = features["input_ids"]
        if not ids:
            if return_attention_mask:
                features["attention_mask"] = []
            return BatchEncoding(features)
        strategy, _, max_length = self._resolve_strategies(padding, None, max_length, None, verbose)
        if not isinstance(ids[0], list):
            padded = self._pad_row(
                features, max_length, strategy, pad_to_multiple_of, return_attention_mask
            )
        else:
            padded = self._pad_rows(
                features, max_length, strategy, pad_to_multiple_of, return_attention_mask
            )
        return BatchEncoding(padded, tensor_type=return_tensors)

    def _pad_rows(
        self,
        features: dict[str, list[Any]],
        max_length: int | None,
        strategy: str,
        pad_to_multiple_of: int | None,
        return_attention_mask: bool | None,
    ) -> dict[str, list[Any]]:
        """Pad every row of a batch to one length (the longest row's, for strategy "longest")."""
        ids = features["input_ids"]
        if strategy == "longest":
            max_length, strategy = max(len(row) for row in ids), "max_length"
        padded: dict[str, list[Any]] = {}
        for index in range(len(ids)):
            row = {key: value[index] for key, value in features.items()}
            for key, value in self._pad_row(
                row, max_length, strategy, pad_to_multiple_of, return_attention_mask
            ).items():
                padded.setdefault(key, []).append(value)
        return padded

    def _pad_row(
        self,
        row: dict[str, Any],
        max_length: int | None,
        strategy: str,
        pad_to_multiple_of: int | None,
        return_attention_mask: bool | None,
    ) -> dict[str, Any]:
        """Pad one encoded row on `padding_side` (transformers' `_pad`)."""
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        ids = row["input_ids"]
        if strategy == "longest":
            max_length = len(ids)
        if (
            max_length is not None
            and pad_to_multiple_of is not None
            and max_length % pad_to_multiple_of
        ):
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if return_attention_mask and "attention_mask" not in row:
            row["attention_mask"] = [1] * len(ids)
        if strategy == "do_not_pad" or max_length is None or len(ids) >= max_length:
            return row
        fill = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": self.pad_token_type_id,
            "special_tokens_mask": 1,
        }
        missing = max_length - len(ids)
        for key, value in fill.items():
            if key in row and (key != "attention_mask" or return_attention_mask):
                padding = [value] * missing
                row[key] = padding + row[key] if self.padding_side == "left" else row[key] + padding
        return row

    # -- decoding ----------------------------------------------------------------------------------

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Text of one sequence of ids (list, int, 1-d tensor or array)."""
        text = self._tokenizer.decode(
            _as_id_list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return self._clean_up(text, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Texts of several sequences (list of lists, or a 2-d tensor or array)."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        rows = [_as_id_list(sequence, "each sequence") for sequence in sequences]
        texts = self._tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        return [self._clean_up(text, clean_up_tokenization_spaces) for text in texts]

    def _clean_up(self, text: str, clean_up_tokenization_spaces: bool | None) -> str:
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    clean_up_tokenization = staticmethod(clean_up_tokenization)

    def __repr__(self) -> str:
        added = "\n\t".join(
            f"{index}: {token!r}," for index, token in self.added_tokens_decoder.items()
        )
        return (
            f"{type(self).__name__}(name_or_path='{self.name_or_path}', "
            f"vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            "is_fast=True, "
            f"padding_side='{self.padding_side}', "
            f"truncation_side='{self.truncation_side}', special_tokens={self.special_tokens_map}, "
            f"clean_up_tokenization_spaces={self.clean_up_tokenization_spaces}),  "
            "added_tokens_decoder={\n\t" + added + "\n}"
        )


class AutoTokenizer:
    """transformers' `AutoTokenizer.from_pretrained`, for BLOOM folders only.

    `from_pretrained` returns a `BloomTokenizerFast`.
    """

    def __init__(self) -> None:
        raise OSError(
            "AutoTokenizer is designed to be instantiated with AutoTokenizer.from_pretrained(path)"
        )

    @classmethod
    @files.consistent_load  # a save committing meanwhile makes it read the folder again
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> BloomTokenizerFast:
        for key in _AUTO_ONLY_KEYWORDS:
            kwargs.pop(key, None)
        return BloomTokenizerFast._load(name_or_path, kwargs, as_auto_tokenizer=True)

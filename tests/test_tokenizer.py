"""Parity of bloomlm's BloomTokenizerFast with transformers 4.37.2's, loaded from the same folder.

Every parity test runs the same call on `ours` and `theirs` and compares keys, types, dtypes and
values. Where bloomlm deliberately differs (see the module docstring of bloomlm.tokenizer), the test
says so and checks our behaviour on its own.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Encoding

import bloomlm.tokenizer
from bloomlm.errors import CheckpointNotFoundError
from bloomlm.tokenizer import AutoTokenizer, BatchEncoding, BloomTokenizerFast

FIXTURE = Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"

TEXTS = {
    "latin_accents": "Café déjà vu: naïve façade, São Paulo, Ærøskøbing — ¿qué tal?",
    "cjk": "你好，世界。東京は日本の首都です。한국어 문장입니다",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "devanagari": "नमस्ते दुनिया। यह एक परीक्षण है।",
    "emoji": "I ❤️ 🤗 and 👩‍👩‍👧‍👦 in 🇫🇷!",
    "space_runs": "many     spaces   here  ",
    "newlines_tabs": "line one\n\n\nline two\ttab\t\tdouble\r\nend",
    "leading_space": " leading and trailing ",
    "empty": "",
    "special_tokens_in_text": "<s>hello</s> <pad> <unk>",
    "long": " ".join(["The quick brown fox jumps over the lazy dog, then naps."] * 12),
}
BATCH = list(TEXTS.values())  # mixes the empty string with the long text
PAIR_FIRST = ["What is BLOOM?", "", "Où est la gare ?", "短い質問"]
PAIR_SECOND = [
    "A multilingual language model trained by BigScience.",
    "empty first",
    "À gauche.",
    "答え",
]
WORDS = [["Hello", "wörld", "!"], ["東京", "は", "大きい"], ["a"], []]


@functools.cache
def _load(
    options: tuple[tuple[str, object], ...],
) -> tuple[BloomTokenizerFast, transformers.BloomTokenizerFast]:
    kwargs = dict(options)
    ours = BloomTokenizerFast.from_pretrained(str(FIXTURE), **kwargs)
    theirs = transformers.BloomTokenizerFast.from_pretrained(str(FIXTURE), **kwargs)
    return ours, theirs


def load(**kwargs: object) -> tuple[BloomTokenizerFast, transformers.BloomTokenizerFast]:
    """Both tokenizers for the fixture, shared between tests (tests that mutate use `fresh`)."""
    return _load(tuple(sorted(kwargs.items())))


def fresh(**kwargs: object) -> tuple[BloomTokenizerFast, transformers.BloomTokenizerFast]:
    return _load.__wrapped__(tuple(sorted(kwargs.items())))


def plain(value: object) -> object:
    return value.tolist() if hasattr(value, "tolist") else value


def assert_same_encoding(ours: BatchEncoding, theirs: transformers.BatchEncoding) -> None:
    assert type(ours) is BatchEncoding
    assert list(ours.keys()) == list(theirs.keys())
    for key in theirs.keys():
        mine, ref = ours[key], theirs[key]
        assert type(mine) is type(ref), key
        if hasattr(ref, "dtype"):
            assert (mine.dtype, tuple(mine.shape)) == (ref.dtype, tuple(ref.shape)), key
        assert plain(mine) == plain(ref), key
    rows = theirs.encodings or []
    assert len(ours.encodings or []) == len(rows)
    for row in range(len(rows)):
        assert ours.tokens(row) == theirs.tokens(row)
        assert ours.word_ids(row) == theirs.word_ids(row)
        assert ours.sequence_ids(row) == theirs.sequence_ids(row)


def assert_same_call(
    *args: object, load_kwargs: dict | None = None, **kwargs: object
) -> BatchEncoding:
    ours, theirs = load(**(load_kwargs or {}))
    ours_out = ours(*args, **kwargs)
    assert_same_encoding(ours_out, theirs(*args, **kwargs))
    return ours_out


# -- encoding --------------------------------------------------------------------------------------

CALL_OPTIONS = {
    "defaults": {},
    "no_special_tokens": {"add_special_tokens": False},
    "no_attention_mask": {"return_attention_mask": False},
    "offsets_masks_length": {
        "return_offsets_mapping": True,
        "return_special_tokens_mask": True,
        "return_length": True,
    },
    "token_type_ids": {"return_token_type_ids": True},
}


@pytest.mark.parametrize("options", CALL_OPTIONS.values(), ids=CALL_OPTIONS.keys())
@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_single_text(text: str, options: dict) -> None:
    out = assert_same_call(text, **options)
    assert isinstance(out["input_ids"], list) and all(isinstance(i, int) for i in out["input_ids"])


BATCH_OPTIONS = {
    "no_padding": {},
    "padding_true": {"padding": True},
    "padding_longest": {"padding": "longest"},
    "max_length_no_truncation": {"padding": "max_length", "max_length": 24},
    "max_length_truncated": {"padding": "max_length", "max_length": 16, "truncation": True},
    "longest_truncated": {"padding": True, "truncation": True, "max_length": 10},
    "truncation_only": {"truncation": True, "max_length": 5},
    "max_length_implies_truncation": {"max_length": 5},
    "padding_true_ignores_max_length": {"padding": True, "max_length": 5},
    "pad_to_multiple_of": {"padding": True, "pad_to_multiple_of": 8},
    "offsets_padded": {
        "padding": True,
        "return_offsets_mapping": True,
        "return_special_tokens_mask": True,
    },
    "overflow_with_stride": {
        "truncation": True,
        "max_length": 6,
        "stride": 2,
        "return_overflowing_tokens": True,
    },
    "explicit_no": {"padding": "do_not_pad", "truncation": "do_not_truncate"},
}
LOAD_OPTIONS = {
    "left_padding_default": {},
    "right_padding": {"padding_side": "right"},
    "left_truncation": {"truncation_side": "left"},
}


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")
@pytest.mark.parametrize("options", BATCH_OPTIONS.values(), ids=BATCH_OPTIONS.keys())
@pytest.mark.parametrize("load_kwargs", LOAD_OPTIONS.values(), ids=LOAD_OPTIONS.keys())
def test_batch(load_kwargs: dict, options: dict) -> None:
    out = assert_same_call(BATCH, load_kwargs=load_kwargs, **options)
    assert len(out["input_ids"]) >= len(BATCH)


def test_default_padding_is_left() -> None:
    out = assert_same_call(["hi", "a longer text here"], padding=True)
    assert out.attention_mask[0][0] == 0 and out.attention_mask[0][-1] == 1


PAIR_OPTIONS = {
    "plain": {},
    "padded_offsets": {"padding": True, "return_offsets_mapping": True},
    "longest_first": {"truncation": "longest_first", "max_length": 9, "padding": "max_length"},
    "only_first": {"truncation": "only_first", "max_length": 12},
    "only_second": {"truncation": "only_second", "max_length": 14},
    "overflow_only_second": {
        "truncation": "only_second",
        "max_length": 16,
        "stride": 2,
        "return_overflowing_tokens": True,
        "padding": True,
    },
}


@pytest.mark.parametrize("options", PAIR_OPTIONS.values(), ids=PAIR_OPTIONS.keys())
def test_pair_batch(options: dict) -> None:
    first, second = (
        PAIR_FIRST[2:],
        PAIR_SECOND[2:],
    )  # non-empty firsts, so only_first can always truncate
    if options.get("truncation") != "only_first":
        first, second = PAIR_FIRST, PAIR_SECOND
    assert_same_call(first, second, **options)


@pytest.mark.parametrize(
    "second", ["A multilingual answer.", ""], ids=["pair", "empty_pair_means_no_pair"]
)
def test_single_pair(second: str) -> None:
    out = assert_same_call("What is BLOOM?", second, return_offsets_mapping=True)
    assert out.n_sequences == (2 if second else 1)


def test_pairs_given_as_tuples_in_a_batch() -> None:
    assert_same_call(list(zip(PAIR_FIRST, PAIR_SECOND)), padding=True)


@pytest.mark.parametrize("load_kwargs", [{}, {"model_max_length": 8}], ids=["unlimited", "limit_8"])
@pytest.mark.parametrize(
    "options",
    [{"padding": "max_length"}, {"truncation": True}, {"padding": True, "truncation": True}],
)
def test_model_max_length(load_kwargs: dict, options: dict) -> None:
    assert_same_call(BATCH[:4], load_kwargs=load_kwargs, **options)


def test_add_prefix_space_on_plain_text() -> None:
    out = assert_same_call(BATCH, load_kwargs={"add_prefix_space": True}, padding=True)
    assert out.input_ids != load()[0](BATCH, padding=True).input_ids


@pytest.mark.parametrize(
    "words, pair",
    [
        (WORDS[0], None),
        (WORDS[0], WORDS[1]),
        (WORDS, None),
        (WORDS[:3], WORDS[1:]),
    ],
    ids=["one", "one_pair", "batch_with_empty", "batch_pairs"],
)
def test_split_into_words(words: list, pair: list | None) -> None:
    out = assert_same_call(
        words,
        pair,
        load_kwargs={"add_prefix_space": True},
        is_split_into_words=True,
        padding=True,
        return_offsets_mapping=True,
    )
    word_ids = out.word_ids(0)
    assert any(i is not None for i in word_ids) or not words[0]


def test_split_into_words_needs_add_prefix_space() -> None:
    ours, theirs = load()
    with pytest.raises(Exception, match="add_prefix_space=True"):
        theirs(WORDS[0], is_split_into_words=True)
    with pytest.raises(ValueError, match="add_prefix_space=True"):
        ours(WORDS[0], is_split_into_words=True)


# -- tensors ---------------------------------------------------------------------------------------

TENSOR_CASES = {
    "single": (TEXTS["latin_accents"], {}),
    "padded_batch": (
        BATCH,
        {"padding": True, "return_offsets_mapping": True, "return_length": True},
    ),
    "truncated_pairs": (
        (PAIR_FIRST, PAIR_SECOND),
        {"padding": "max_length", "max_length": 12, "truncation": True},
    ),
}


def _require(framework: str) -> None:
    if framework == "jax":
        pytest.importorskip("jax")


@pytest.mark.parametrize("case", TENSOR_CASES.values(), ids=TENSOR_CASES.keys())
@pytest.mark.parametrize("framework", ["pt", "np", "jax"])
def test_return_tensors(framework: str, case: tuple) -> None:
    _require(framework)
    text, options = case
    args = text if isinstance(text, tuple) else (text,)
    out = assert_same_call(*args, return_tensors=framework, **options)
    assert out["input_ids"].ndim == 2
    if framework != "jax":  # jax gives int32 unless x64 is enabled, as transformers does
        assert out["input_ids"].dtype in (torch.int64, np.int64)


@pytest.mark.parametrize("framework", ["pt", "np", "jax"])
def test_ragged_batch_with_tensors_asks_for_padding(framework: str) -> None:
    _require(framework)
    ours, _ = load()
    # transformers raises for pt/jax and returns an object array for np; bloomlm raises for all
    # three.
    with pytest.raises(ValueError, match="padding=True"):
        ours(["short", "a much longer text than that"], return_tensors=framework)


@pytest.mark.parametrize("framework", ["pt", "np", "jax"])
def test_empty_text_gives_integer_tensors(framework: str) -> None:
    _require(framework)
    ours, theirs = load()
    out, ref = ours("", return_tensors=framework), theirs("", return_tensors=framework)
    assert tuple(out["input_ids"].shape) == tuple(ref["input_ids"].shape) == (1, 0)
    # transformers makes these float (an empty list has no element type); ids are integers.
    assert "int" in str(out["input_ids"].dtype)


def test_encode() -> None:
    ours, theirs = load()
    for text in BATCH:
        assert ours.encode(text) == theirs.encode(text)
    assert ours.encode("a", "b c") == theirs.encode("a", "b c")
    assert torch.equal(
        ours.encode("héllo", return_tensors="pt"), theirs.encode("héllo", return_tensors="pt")
    )
    # transformers encodes a 2-list as a pair; bloomlm refuses the ambiguity.
    with pytest.raises(TypeError, match="batch"):
        ours.encode(["a", "b"])


# -- decoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("clean_up", [None, True, False])
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode(skip_special_tokens: bool, clean_up: bool | None) -> None:
    ours, theirs = load()
    kwargs = {"skip_special_tokens": skip_special_tokens, "clean_up_tokenization_spaces": clean_up}
    extra = ["Hello , world . It 's fine , isn 't it ?"]
    for text in [*BATCH, *extra]:
        ids = [1, *theirs(text).input_ids, 2, 3]
        assert ours.decode(ids, **kwargs) == theirs.decode(ids, **kwargs)


@pytest.mark.parametrize(
    "ids",
    [
        [70, 71, 1],
        (70, 71),
        70,
        np.array([70, 71, 2]),
        torch.tensor([70, 71, 3]),
        torch.tensor(70),
        np.int64(70),
    ],
    ids=["list", "tuple", "int", "numpy", "torch", "torch_scalar", "numpy_scalar"],
)
def test_decode_input_types(ids: object) -> None:
    ours, theirs = load()
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(plain(ids))


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_batch_decode(skip_special_tokens: bool) -> None:
    ours, theirs = load()
    padded = theirs(BATCH, padding=True, return_tensors="pt").input_ids
    for sequences in (padded, padded.numpy(), padded.tolist()):
        expected = theirs.batch_decode(sequences, skip_special_tokens=skip_special_tokens)
        assert ours.batch_decode(sequences, skip_special_tokens=skip_special_tokens) == expected
    assert ours.batch_decode(padded, skip_special_tokens=skip_special_tokens)[-1].endswith("naps.")


def test_decode_round_trip() -> None:
    ours, _ = load()
    for text in BATCH:
        assert ours.decode(ours(text).input_ids) == text


# -- vocabulary and special tokens -----------------------------------------------------------------


def test_tokens_and_ids() -> None:
    ours, theirs = load()
    for text in BATCH:
        tokens = theirs.tokenize(text)
        assert ours.tokenize(text) == tokens
        assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
        ids = theirs(text).input_ids
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    for token in ["<s>", "<pad>", "not-a-token", "Ġthe"]:
        assert ours.convert_tokens_to_ids(token) == theirs.convert_tokens_to_ids(token)
    assert ours.convert_tokens_to_ids(None) is None
    ids = [1, 70, 2, 3, 0, 71]
    assert ours.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    ) == theirs.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert ours.convert_tokens_to_string(["Ġh", "ello"]) == theirs.convert_tokens_to_string(
        ["Ġh", "ello"]
    )


SPECIAL_LOAD_OPTIONS = {
    "defaults": {},
    "pad_is_eos": {"pad_token": "</s>"},
    "pad_unset": {"pad_token": None},
    "right_no_clean": {"padding_side": "right", "clean_up_tokenization_spaces": True},
    "new_token": {"pad_token": "<my-pad>", "additional_special_tokens": ["<extra>"]},
}
SPECIAL_ATTRIBUTES = [
    f"{name}_token{suffix}"
    for name in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")
    for suffix in ("", "_id")
]


@pytest.mark.parametrize(
    "load_kwargs", SPECIAL_LOAD_OPTIONS.values(), ids=SPECIAL_LOAD_OPTIONS.keys()
)
def test_special_tokens_and_vocabulary(load_kwargs: dict) -> None:
    ours, theirs = fresh(**load_kwargs)
    for name in [
        *SPECIAL_ATTRIBUTES,
        "all_special_tokens",
        "all_special_ids",
        "special_tokens_map",
        "additional_special_tokens",
        "vocab_size",
        "padding_side",
        "truncation_side",
        "model_max_length",
        "clean_up_tokenization_spaces",
        "model_input_names",
        "name_or_path",
    ]:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert len(ours) == len(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.get_added_vocab() == theirs.get_added_vocab()
    assert repr(ours) == repr(theirs)
    assert_same_encoding(ours("<my-pad> <extra> hi"), theirs("<my-pad> <extra> hi"))


def test_constructor_from_tokenizer_file() -> None:
    path = str(FIXTURE / "tokenizer.json")
    ours = BloomTokenizerFast(tokenizer_file=path)
    theirs = transformers.BloomTokenizerFast(tokenizer_file=path, padding_side="left")
    assert ours.padding_side == "left"
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert_same_encoding(ours(BATCH, padding=True), theirs(BATCH, padding=True))
    with pytest.raises(ValueError, match="tokenizer_file"):
        BloomTokenizerFast()


def test_pad_token_none_keyword_keeps_the_files_pad_token() -> None:
    # transformers' rule: a falsy keyword does not override special_tokens_map.json.
    ours, theirs = load(pad_token=None)
    assert ours.pad_token == theirs.pad_token == "<pad>"


def test_pad_token_unset_refuses_padding() -> None:
    ours, theirs = fresh()
    ours.pad_token = theirs.pad_token = None
    with pytest.raises(ValueError, match="padding token"):
        theirs(["a", "b c"], padding=True)
    with pytest.raises(ValueError, match="pad_token"):
        ours(["a", "b c"], padding=True)


def test_special_token_setters() -> None:
    ours, theirs = fresh()
    for tokenizer in (ours, theirs):
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.bos_token_id = 0
    assert (
        (ours.pad_token_id, ours.bos_token)
        == (theirs.pad_token_id, theirs.bos_token)
        == (2, "<unk>")
    )
    assert_same_encoding(ours(BATCH, padding=True), theirs(BATCH, padding=True))
    with pytest.raises(TypeError, match="pad_token must be a str"):
        ours.pad_token = 3


def test_add_tokens() -> None:
    ours, theirs = fresh()
    counts = [
        (
            tokenizer.add_tokens(["<new1>", "the", "hello"]),
            tokenizer.add_special_tokens({"cls_token": "<sep>"}),
        )
        for tokenizer in (ours, theirs)
    ]
    assert counts[0] == counts[1]
    assert len(ours) == len(theirs) == 1027  # "the" is in the vocabulary already, "hello" is not
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert_same_encoding(ours("a <new1> b <sep> hello the"), theirs("a <new1> b <sep> hello the"))
    assert ours.cls_token_id == theirs.cls_token_id == 1026
    assert ours.decode(ours("a <sep> b").input_ids, skip_special_tokens=True) == "a  b"


# -- BatchEncoding ---------------------------------------------------------------------------------


def test_batch_encoding_access() -> None:
    ours, _ = load()
    out = ours(["Hello world", "hi"], padding=True, return_tensors="pt")
    assert list(out.keys()) == ["input_ids", "attention_mask"]
    assert out.input_ids is out["input_ids"]
    assert isinstance(out, dict) and isinstance(out[0], Encoding)
    assert out.to("cpu") is out and out.input_ids.device.type == "cpu"
    assert out.to(torch.device("cpu")).attention_mask.dtype == torch.int64
    assert (
        out.to(torch.float16).input_ids.dtype == torch.int64
    )  # not a device: ignored, as in transformers
    assert out[:1]["input_ids"].shape == (1, out.input_ids.shape[1])
    with pytest.raises(AttributeError, match="no_such_feature"):
        _ = out.no_such_feature
    assert dict(**out).keys() == out.keys()
    restored = pickle.loads(pickle.dumps(out))
    assert torch.equal(restored.input_ids, out.input_ids) and restored.tokens(1) == out.tokens(1)


def test_pad_matches_transformers() -> None:
    ours, theirs = load()
    rows = [theirs(text, return_special_tokens_mask=True) for text in BATCH[:5]]
    for options in ({}, {"padding": "max_length", "max_length": 40}, {"pad_to_multiple_of": 8}):
        out = ours.pad([dict(row) for row in rows], **options)
        ref = theirs.pad([dict(row) for row in rows], **options)
        assert {k: plain(v) for k, v in out.items()} == {k: plain(v) for k, v in ref.items()}
    as_tensors = [{k: torch.tensor(v) for k, v in row.items()} for row in rows]
    out = ours.pad(as_tensors)
    assert out.input_ids.dtype == torch.int64
    assert out.input_ids.tolist() == theirs.pad([dict(row) for row in rows]).input_ids
    with pytest.raises(ValueError, match="only available"):
        out.tokens(0)


# -- saving and loading ----------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, str]:
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    return {name: (folder / name).read_text(encoding="utf-8") for name in names}


SAVE_LOAD_OPTIONS = {
    "defaults": {},
    "prefix_space_right_pad": {"add_prefix_space": True, "padding_side": "right"},
    "pad_is_eos": {"pad_token": "</s>", "model_max_length": 2048},
    "new_special_tokens": {"pad_token": "<my-pad>", "additional_special_tokens": ["<extra>"]},
}


@pytest.mark.parametrize("used", [False, True], ids=["fresh", "after_padded_truncated_call"])
@pytest.mark.parametrize("load_kwargs", SAVE_LOAD_OPTIONS.values(), ids=SAVE_LOAD_OPTIONS.keys())
def test_save_pretrained_writes_what_transformers_writes(
    tmp_path: Path, load_kwargs: dict, used: bool
) -> None:
    ours, theirs = fresh(**load_kwargs)
    if used:  # the backend keeps its last truncation/padding and tokenizer.json records it
        for tokenizer in (ours, theirs):
            tokenizer(BATCH, padding="max_length", truncation=True, max_length=12)
    written = ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert sorted(Path(p).name for p in written) == sorted(_files(tmp_path / "ours"))
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")
    assert not [p for p in (tmp_path / "ours").iterdir() if p.name.endswith(".tmp")]

    # Each library reads the other's folder back to the same tokenizer.
    ours_back = BloomTokenizerFast.from_pretrained(tmp_path / "theirs")
    theirs_back = transformers.BloomTokenizerFast.from_pretrained(tmp_path / "ours")
    assert ours_back.init_kwargs.keys() - {
        "added_tokens_decoder"
    } == theirs_back.init_kwargs.keys() - {
        "name_or_path",
        "tokenizer_file",
        "special_tokens_map_file",
    }
    for name in [
        "all_special_tokens",
        "all_special_ids",
        "padding_side",
        "add_prefix_space",
        "model_max_length",
    ]:
        assert getattr(ours_back, name) == getattr(theirs_back, name), name
    ours_back.save_pretrained(tmp_path / "ours_again")
    theirs_back.save_pretrained(tmp_path / "theirs_again")
    assert _files(tmp_path / "ours_again") == _files(tmp_path / "theirs_again")
    text = [*BATCH, "<my-pad> <extra>"]
    assert_same_encoding(ours_back(text, padding=True), theirs_back(text, padding=True))


def test_save_into_a_file_path_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load()[0].save_pretrained(tmp_path / "file")


# tokenizer_config.json of the real bigscience checkpoints: bloom-560m and friends, and bloom
# (176B).
BIGSCIENCE_CONFIGS = {
    "bloom_560m": {
        "unk_token": "<unk>",
        "eos_token": "</s>",
        "bos_token": "<s>",
        "pad_token": "<pad>",
        "name_or_path": "bigscience/tokenizer",
        "special_tokens_map_file": None,
        "tokenizer_class": "BloomTokenizerFast",
        "padding_side": "left",
    },
    "bloom_176b": {
        "unk_token": "<unk>",
        "eos_token": "</s>",
        "bos_token": "<s>",
        "pad_token": "<pad>",
        "name_or_path": "bigscience/tokenizer",
        "special_tokens_map_file": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "padding_side": "left",
    },
    "legacy_dict_tokens": {
        "pad_token": {
            "__type": "AddedToken",
            "content": "<pad>",
            "lstrip": False,
            "normalized": True,
        },
        "model_max_length": 64,
        "errors": "replace",
    },
    "no_config_keys": {},
}
SPECIAL_TOKENS_MAPS = {
    "none": None,
    "strings": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    "dicts": {
        "pad_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False}
    },
}


def _folder(tmp_path: Path, config: dict | None, special_tokens_map: dict | None) -> Path:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    shutil.copy(FIXTURE / "tokenizer.json", folder)
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return folder


@pytest.mark.parametrize(
    "special_map", SPECIAL_TOKENS_MAPS.values(), ids=SPECIAL_TOKENS_MAPS.keys()
)
@pytest.mark.parametrize("config", BIGSCIENCE_CONFIGS.values(), ids=BIGSCIENCE_CONFIGS.keys())
def test_config_files(tmp_path: Path, config: dict, special_map: dict | None) -> None:
    folder = _folder(tmp_path, config, special_map)
    ours = BloomTokenizerFast.from_pretrained(folder)
    theirs = transformers.BloomTokenizerFast.from_pretrained(folder)
    for name in [
        *SPECIAL_ATTRIBUTES,
        "all_special_tokens",
        "model_max_length",
        "clean_up_tokenization_spaces",
    ]:
        assert getattr(ours, name) == getattr(theirs, name), name
    if config.get("padding_side") is None:
        # transformers falls back to right padding; bloomlm keeps BLOOM's left padding (SPEC).
        assert (ours.padding_side, theirs.padding_side) == ("left", "right")
        theirs.padding_side = "left"
    assert_same_encoding(ours(BATCH, padding=True), theirs(BATCH, padding=True))
    ours.save_pretrained(tmp_path / "saved")
    again = transformers.BloomTokenizerFast.from_pretrained(tmp_path / "saved")
    assert again.padding_side == "left"
    assert again.special_tokens_map == ours.special_tokens_map


def test_hub_keywords_are_accepted_for_a_local_folder() -> None:
    ours = BloomTokenizerFast.from_pretrained(
        FIXTURE, local_files_only=True, revision="main", cache_dir=None
    )
    assert "revision" not in ours.init_kwargs and ours.pad_token_id == 3


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="tokenizer.json"):
        BloomTokenizerFast.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        BloomTokenizerFast.from_pretrained(tmp_path / "no-such-folder")


def test_corrupt_config(tmp_path: Path) -> None:
    folder = _folder(tmp_path, None, None)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        BloomTokenizerFast.from_pretrained(folder)


# -- AutoTokenizer ---------------------------------------------------------------------------------


def test_auto_tokenizer_returns_bloom_tokenizer() -> None:
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE, use_fast=True)
    assert type(tokenizer) is BloomTokenizerFast
    assert bloomlm.AutoTokenizer is AutoTokenizer and bloomlm.BatchEncoding is BatchEncoding
    assert repr(tokenizer) == repr(transformers.AutoTokenizer.from_pretrained(FIXTURE))
    with pytest.raises(OSError, match="from_pretrained"):
        AutoTokenizer()


def test_auto_tokenizer_on_the_176b_config_decodes_like_transformers(tmp_path: Path) -> None:
    folder = _folder(tmp_path, BIGSCIENCE_CONFIGS["bloom_176b"], None)
    ours, theirs = (
        AutoTokenizer.from_pretrained(folder),
        transformers.AutoTokenizer.from_pretrained(folder),
    )
    assert (
        type(theirs).__name__ == "PreTrainedTokenizerFast"
    )  # whose decode cleans up spaces by default
    ids = theirs("Hello , world . It 's fine").input_ids
    assert ours.decode(ids) == theirs.decode(ids) == "Hello, world. It's fine"
    assert BloomTokenizerFast.from_pretrained(folder).decode(ids) == "Hello , world . It 's fine"


# -- bad arguments ---------------------------------------------------------------------------------

BAD_CALLS = {
    "padding_value": (
        lambda t: t(["a"], padding="sideways"),
        ValueError,
        "padding='sideways' is not supported",
    ),
    "truncation_value": (lambda t: t(["a"], truncation="middle"), ValueError, "'only_second'"),
    "return_tensors": (lambda t: t("a", return_tensors="tf"), ValueError, "'pt' \\(torch\\)"),
    "text_int": (lambda t: t(5), ValueError, "text must be `str`"),
    "text_none": (lambda t: t(None), ValueError, "text is required"),
    "text_mixed_list": (lambda t: t(["a", 3]), ValueError, "list\\[str\\]"),
    "pair_str_for_batch": (lambda t: t(["a", "b"], "c"), TypeError, "text_pair must be a list"),
    "pair_length": (lambda t: t(["a", "b"], ["c"]), ValueError, "does not match"),
    "empty_batch": (lambda t: t([]), ValueError, "empty batch"),
    "max_length_negative": (
        lambda t: t("a", max_length=-1),
        ValueError,
        "max_length must be an int >= 0",
    ),
    "pad_to_multiple_of_zero": (
        lambda t: t("a", pad_to_multiple_of=0),
        ValueError,
        "pad_to_multiple_of",
    ),
    "multiple_vs_max_length": (
        lambda t: t("a", padding=True, truncation=True, max_length=10, pad_to_multiple_of=4),
        ValueError,
        "not a multiple",
    ),
    "only_second_without_pair": (
        lambda t: t("a b c d", truncation="only_second", max_length=2),
        ValueError,
        "Second sequence not provided",
    ),
    "stride_too_large": (
        lambda t: t("a b c d e f", "g h i j k", truncation="only_second", max_length=6, stride=1),
        ValueError,
        "stride",
    ),
    "unknown_keyword": (lambda t: t("a", return_everything=True), TypeError, "return_everything"),
    "decode_nested": (lambda t: t.decode([[1, 2]]), TypeError, "batch_decode"),
    "decode_negative": (lambda t: t.decode([-1]), ValueError, ">= 0"),
    "padding_side": (lambda t: setattr(t, "padding_side", "top"), ValueError, "'left' or 'right'"),
    "special_tokens_key": (lambda t: t.add_special_tokens({"pad": "x"}), ValueError, "pad_token"),
}


@pytest.mark.parametrize("call, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments(call, error: type[Exception], message: str) -> None:
    ours, _ = fresh()
    with pytest.raises(error, match=message):
        call(ours)


def test_bad_load_arguments() -> None:
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        BloomTokenizerFast.from_pretrained(FIXTURE, padding_side="middle")


# -- imports ---------------------------------------------------------------------------------------


def test_import_is_light() -> None:
    code = (
        "import sys, bloomlm.tokenizer; "
        "print(sorted(m for m in ('transformers', 'torch', 'jax') if m in sys.modules))"
    )
    # The same bloomlm as this test run imports, whether installed or on PYTHONPATH.
    source_root = str(Path(bloomlm.tokenizer.__file__).parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([source_root, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert result.stdout.strip() == "[]"

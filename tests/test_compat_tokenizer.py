"""BloomTokenizerFast's generic surface (transformers' PreTrainedTokenizerFast) against
transformers 4.37.2 on the embedded tokenizer: same ids, masks and strings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import AddedToken

import bloomlm
from bloomlm import chat

TINY = Path(bloomlm.__file__).parent / "assets" / "bloomlm-tiny"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is BLOOM?"},
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def pair():
    return (
        bloomlm.BloomTokenizerFast.from_pretrained(TINY),
        transformers.BloomTokenizerFast.from_pretrained(TINY),
    )


def _same(ours, theirs) -> None:
    """The same features with the same values (tensors of the same dtype)."""
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for key in theirs.keys():
        mine, ref = ours[key], theirs[key]
        if isinstance(ref, torch.Tensor):
            assert mine.dtype == ref.dtype and torch.equal(mine, ref), key
        else:
            assert mine == ref, key


ENCODE_KWARGS = [
    {},
    {"return_special_tokens_mask": True, "return_length": True},
    {"max_length": 4, "truncation": True, "return_overflowing_tokens": True, "stride": 1},
    {"padding": "max_length", "max_length": 16, "return_tensors": "pt"},
]


@pytest.mark.parametrize("kwargs", ENCODE_KWARGS, ids=range(len(ENCODE_KWARGS)))
def test_encode_plus_and_batch_encode_plus(pair, kwargs):
    ours, theirs = pair
    _same(ours.encode_plus("Hello there, friend", **kwargs),
          theirs.encode_plus("Hello there, friend", **kwargs))  # fmt: skip
    _same(ours.encode_plus("A question", "and its context", **kwargs),
          theirs.encode_plus("A question", "and its context", **kwargs))  # fmt: skip
    batch = ["Hello there", "a longer text than the first one"]
    padded = {**kwargs, "padding": kwargs.get("padding", True)}
    _same(ours.batch_encode_plus(batch, **padded), theirs.batch_encode_plus(batch, **padded))
    pairs = [("q one", "context one"), ("q two", "a much longer context two")]
    _same(ours.batch_encode_plus(pairs, **padded), theirs.batch_encode_plus(pairs, **padded))
    with pytest.raises(TypeError, match="batch_encode_plus"):
        ours.encode_plus(["a", "b"])


PREPARE_KWARGS = [
    {},
    {"return_length": True, "return_tensors": "pt", "prepend_batch_axis": True},
    {"max_length": 5, "truncation": True},
    {"max_length": 5, "truncation": "only_second", "return_overflowing_tokens": True, "stride": 1},
    {"max_length": 6, "truncation": "only_first", "return_overflowing_tokens": True},
    {"padding": "max_length", "max_length": 12, "pad_to_multiple_of": 8},
]  # fmt: skip


@pytest.mark.parametrize("kwargs", PREPARE_KWARGS, ids=range(len(PREPARE_KWARGS)))
@pytest.mark.parametrize("side", ["right", "left"])
def test_prepare_for_model_and_building_blocks(pair, kwargs, side):
    ours, theirs = pair
    ours.truncation_side = theirs.truncation_side = side
    first = theirs.encode("The first sequence is here", add_special_tokens=False)
    second = theirs.encode("and a second one, a bit longer", add_special_tokens=False)
    _same(ours.prepare_for_model(first, **kwargs), theirs.prepare_for_model(first, **kwargs))
    _same(ours.prepare_for_model(first, second, **kwargs),
          theirs.prepare_for_model(first, second, **kwargs))  # fmt: skip
    for args in ((first,), (first, second)):
        assert ours.build_inputs_with_special_tokens(*args) == (
            theirs.build_inputs_with_special_tokens(*args)
        )
        assert ours.create_token_type_ids_from_sequences(*args) == (
            theirs.create_token_type_ids_from_sequences(*args)
        )
    ids = [1, *first, 2, 3]
    assert ours.get_special_tokens_mask(ids, already_has_special_tokens=True) == (
        theirs.get_special_tokens_mask(ids, already_has_special_tokens=True)
    )
    with pytest.raises(ValueError, match="already_has_special_tokens=True"):
        ours.get_special_tokens_mask(ids)
    # transformers' fast tokenizers fail here (an AssertionError from get_special_tokens_mask);
    # BLOOM adds no special tokens, so the mask is all zeros.
    plain = {k: v for k, v in kwargs.items() if k not in ("return_tensors", "prepend_batch_axis")}
    out = ours.prepare_for_model(first, second, return_special_tokens_mask=True, **plain)
    assert out["special_tokens_mask"] == [1 - m for m in out["attention_mask"]]  # padding only
    with pytest.raises(AssertionError):
        theirs.prepare_for_model(first, return_special_tokens_mask=True)


def test_chat_template_renders_as_transformers(pair, tmp_path):
    ours, theirs = pair
    for template in (None, CHATML):
        for generation_prompt in (False, True):
            kwargs = dict(chat_template=template, add_generation_prompt=generation_prompt)
            text = ours.apply_chat_template(CONVERSATION, tokenize=False, **kwargs)
            assert text == theirs.apply_chat_template(CONVERSATION, tokenize=False, **kwargs)
            ids = ours.apply_chat_template(CONVERSATION, **kwargs)
            assert ids == theirs.apply_chat_template(CONVERSATION, **kwargs)
    tensors = ours.apply_chat_template(
        CONVERSATION, return_tensors="pt", padding=True, max_length=64
    )
    expected = theirs.apply_chat_template(
        CONVERSATION, return_tensors="pt", padding=True, max_length=64
    )
    assert torch.equal(tensors, expected)
    assert ours.apply_chat_template(CONVERSATION, tokenize=False).endswith("What is BLOOM?</s>")
    ours.chat_template = theirs.chat_template = CHATML
    ours.save_pretrained(tmp_path)
    reloaded = transformers.BloomTokenizerFast.from_pretrained(tmp_path)
    assert reloaded.chat_template == CHATML
    assert bloomlm.BloomTokenizerFast.from_pretrained(tmp_path).apply_chat_template(
        CONVERSATION, add_generation_prompt=True
    ) == theirs.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    failing = "{{ raise_exception('no system messages') }}"
    with pytest.raises(Exception, match="no system messages"):
        ours.apply_chat_template(CONVERSATION, chat_template=failing)
    with pytest.raises(TypeError, match="list of"):
        chat.render_chat("just a string")


def test_chat_without_jinja2_says_how_to_install():
    code = (
        "import sys; sys.modules['jinja2'] = None\n"
        "from bloomlm import chat\n"
        "try:\n    chat.render_chat([{'role': 'user', 'content': 'x'}])\n"
        "except ImportError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "chat templates need jinja2: pip install 'bloomlm[chat]'"


def test_train_new_from_iterator_equals_transformers(pair):
    ours, theirs = pair
    corpus = [["the quick brown fox jumps over the lazy dog"] * 3,
              ["a bloom of tokens, trained anew", "hello hello world"]]  # fmt: skip
    kwargs = dict(new_special_tokens=["<extra>"], special_tokens_map={"<pad>": "<PAD>"})
    mine, ref = (t.train_new_from_iterator(iter(corpus), 300, **kwargs) for t in (ours, theirs))
    assert isinstance(mine, bloomlm.BloomTokenizerFast)
    assert mine.get_vocab() == ref.get_vocab() and len(mine) == len(ref)
    assert mine.pad_token == ref.pad_token == "<PAD>"
    assert mine.additional_special_tokens == ref.additional_special_tokens == ["<extra>"]
    text = "the lazy fox says hello <extra>"
    assert mine(text).input_ids == ref(text).input_ids
    assert mine.decode(mine(text).input_ids) == ref.decode(ref(text).input_ids)


def test_special_tokens_and_their_ids(pair):
    ours, theirs = pair
    for name in ("sep_token", "cls_token", "mask_token", "sep_token_id", "mask_token_id"):
        assert getattr(ours, name) is None is getattr(theirs, name), name
    for tokenizer in pair:
        tokenizer.pad_token_id = 2
    assert ours.pad_token == theirs.pad_token == "</s>"
    assert ours.pad_token_id == theirs.pad_token_id == 2
    extra = {"additional_special_tokens": ["<a>", AddedToken("<b>", special=True)]}
    assert ours.add_special_tokens(extra) == theirs.add_special_tokens(extra) == 2
    more = {"additional_special_tokens": ["<b>", "<c>"]}
    for tokenizer in pair:
        tokenizer.add_special_tokens(more, replace_additional_special_tokens=False)
    assert (
        ours.additional_special_tokens == theirs.additional_special_tokens == ["<a>", "<b>", "<c>"]
    )
    assert ours.additional_special_tokens_ids == theirs.additional_special_tokens_ids
    ours.add_special_tokens({"additional_special_tokens": ["<d>"]})
    assert ours.additional_special_tokens == ["<d>"]


def test_pad_to_max_length_is_deprecated_as_in_transformers(pair):
    ours, theirs = pair
    for kwargs in ({}, {"max_length": 12}):
        with pytest.warns(FutureWarning, match="pad_to_max_length"):
            mine = ours(["hi", "a longer text"], pad_to_max_length=True, **kwargs)
        with pytest.warns(FutureWarning, match="pad_to_max_length"):
            ref = theirs(["hi", "a longer text"], pad_to_max_length=True, **kwargs)
        _same(mine, ref)

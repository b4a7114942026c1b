"""The models shipped inside the package: bloomlm-tiny (causal LM) and bloomlm-tiny-sentiment
(classifier).

The held-out sentences (never trained on, never used to choose an epoch) come from the
vaderSentiment sdist, stored by scripts/train_sentiment.py with VADER 3.3.2's own prediction for
each (`vader_label`: the sign of its compound score, 0 -> the training majority class) and the
training split's majority class, so the comparison runs without vaderSentiment installed.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

from bloomlm import AutoTokenizer, BloomConfig, BloomForCausalLM, BloomForSequenceClassification
from bloomlm.hub import ASSETS_DIR
from bloomlm.tasks import classify

FIXTURE_TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"
HELDOUT = ASSETS_DIR / "vader-heldout.jsonl"


@pytest.fixture(scope="module")
def tiny():
    return BloomForCausalLM.from_pretrained("bloomlm-tiny"), AutoTokenizer.from_pretrained(
        "bloomlm-tiny"
    )


def test_bloomlm_tiny_loads_by_name_in_half_precision(tiny):
    model, tokenizer = tiny
    config = BloomConfig.from_pretrained("bloomlm-tiny")
    assert (config.vocab_size, config.hidden_size, config.n_layer, config.n_head) == (
        4096,
        192,
        4,
        6,
    )
    assert config.torch_dtype == "float16"
    assert (
        BloomForCausalLM.from_pretrained("bloomlm-tiny", torch_dtype="auto").dtype == torch.float16
    )
    assert (
        model.dtype == torch.float32
    )  # transformers' default: float32 unless torch_dtype says otherwise
    assert len(tokenizer) == config.vocab_size
    size = sum(f.stat().st_size for f in (ASSETS_DIR / "bloomlm-tiny").iterdir())
    assert size < 8_000_000


def test_tokenizer_has_bloom_layout_and_special_tokens():
    ours = json.loads((ASSETS_DIR / "bloomlm-tiny" / "tokenizer.json").read_text(encoding="utf-8"))
    bloom = json.loads((FIXTURE_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    for key in ("pre_tokenizer", "post_processor", "decoder", "normalizer"):
        assert ours[key] == bloom[key], key
    assert ours["model"]["type"] == "BPE"
    assert [(t["id"], t["content"]) for t in ours["added_tokens"]] == [
        (0, "<unk>"),
        (1, "<s>"),
        (2, "</s>"),
        (3, "<pad>"),
    ]
    tokenizer = AutoTokenizer.from_pretrained("bloomlm-tiny")
    text = "def f(x):\n    return x ** 2  # squares, naïvely"
    assert (
        tokenizer.decode(tokenizer(text)["input_ids"]) == text
    )  # byte-level: every string round-trips


def test_greedy_generation_is_deterministic_and_readable(tiny):
    model, tokenizer = tiny
    inputs = tokenizer(["The list of", "A function"], padding=True, return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    second = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(first, second)
    text = tokenizer.decode(first[0], skip_special_tokens=True)
    assert text.startswith("The list of") and len(text.split()) > 5


def test_a_local_folder_of_the_same_name_wins(tmp_path, monkeypatch):
    folder = tmp_path / "bloomlm-tiny"
    BloomConfig(vocab_size=1024, hidden_size=16, n_layer=1, n_head=2).save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    assert BloomConfig.from_pretrained("bloomlm-tiny").hidden_size == 16
    monkeypatch.chdir(os.sep)
    assert BloomConfig.from_pretrained("bloomlm-tiny").hidden_size == 192


def test_sentiment_model_beats_majority_and_lexicon_baselines_on_held_out_sentences():
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1000 and {r["label"] for r in rows} == {"positive", "negative"}
    model = BloomForSequenceClassification.from_pretrained("bloomlm-tiny-sentiment")
    tokenizer = AutoTokenizer.from_pretrained("bloomlm-tiny-sentiment")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    with torch.inference_mode():
        predictions = [
            r["label"]
            for r in classify(model, tokenizer, [r["text"] for r in rows], batch_size=100)
        ]

    def accuracy(labels):
        return sum(p == r["label"] for p, r in zip(labels, rows)) / len(rows)

    ours = accuracy(predictions)
    lexicon = accuracy([r["vader_label"] for r in rows])
    majority = accuracy([r["majority_label"] for r in rows])
    assert ours > lexicon and ours > majority, (ours, lexicon, majority)
    assert classify(model, tokenizer, ["I love this"])[0]["label"] == "positive"

"""transformers 4.37's `pipeline(...)` given bloomlm model and tokenizer objects: the four BLOOM
tasks give the same outputs as with transformers' classes on the same folder."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import pipeline

import bloomlm

TINY = Path(bloomlm.__file__).parent / "assets" / "bloomlm-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TASKS = {
    "text-generation": "BloomForCausalLM",
    "text-classification": "BloomForSequenceClassification",
    "token-classification": "BloomForTokenClassification",
    "question-answering": "BloomForQuestionAnswering",
}
TEXTS = ["Hello there, my friend", "A short one"]
QUESTIONS = [
    {"question": "Who went home?", "context": "Bob went home early today, before the rain."},
    {"question": "When?", "context": "The meeting is on Monday at noon in the small room."},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The embedded tiny model with every head made and saved once by transformers (3 labels)."""
    out = {}
    for arch in TASKS.values():
        folder = tmp_path_factory.mktemp(arch)
        torch.manual_seed(0)
        model = getattr(transformers, arch).from_pretrained(TINY, num_labels=3)
        model.save_pretrained(folder)
        for name in TOKENIZER_FILES:
            shutil.copy(TINY / name, folder / name)
        out[arch] = folder
    return out


def _run(task: str, library, folder: Path):
    model = getattr(library, TASKS[task]).from_pretrained(folder)
    tokenizer = library.BloomTokenizerFast.from_pretrained(folder)
    runner = pipeline(task, model=model, tokenizer=tokenizer)
    with warnings.catch_warnings():
        if library is transformers:  # its QA head always warns about `position_ids`
            warnings.simplefilter("ignore", FutureWarning)
        if task == "text-generation":
            return runner(TEXTS, max_new_tokens=6, do_sample=False, batch_size=2)
        if task == "question-answering":
            return runner(QUESTIONS, top_k=2)
        return runner(TEXTS)


def _assert_same(ours, theirs, path: str = "output") -> None:
    """Equal structures; floats (scores) within float32 rounding."""
    if isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), path
        for key in theirs:
            _assert_same(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{path}[{i}]")
    elif isinstance(theirs, float | np.floating):
        assert ours == pytest.approx(theirs, abs=1e-5), path
    else:
        assert ours == theirs, path


@pytest.mark.parametrize("task", list(TASKS))
def test_pipeline_outputs_equal_transformers(folders, task):
    ours = _run(task, bloomlm, folders[TASKS[task]])
    theirs = _run(task, transformers, folders[TASKS[task]])
    _assert_same(ours, theirs)
    assert len(ours) == 2
    if task == "text-generation":
        assert all(len(row[0]["generated_text"]) > len(text) for row, text in zip(ours, TEXTS))

"""Write model folders with every bloomlm writer, for transformers 4.37 to read back (issue 12).

    python scripts/write_folders.py OUT

Run in an environment with the newest `tokenizers` and without transformers (`.ci/run` builds
one; `tests/test_written_folders.py` builds a lighter one when run alone). The writers are
`save_pretrained` (model and tokenizer), `bloomlm convert` and `bloomlm finetune`; each writes
into OUT/<writer>-<name>. OUT/manifest.json lists the folders, the class each holds and the
`tokenizers` version that wrote it. The test suite, in the main environment, then loads every
folder with transformers 4.37.2's AutoTokenizer and AutoModel* and compares ids and logits.

Fails at once when transformers is importable or `tokenizers` is older than 0.20 (the releases
that write BPE merges as pairs): folders written otherwise would prove nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.modules["transformers"] = None  # type: ignore[assignment]  # the writers must not need it

import tokenizers  # noqa: E402
import torch  # noqa: E402

import bloomlm  # noqa: E402
from bloomlm.cli import main as bloomlm_main  # noqa: E402

MINIMUM_TOKENIZERS = (0, 20)  # the first release writing merges as ["a", "b"] pairs
SENTIMENT_ROWS = [
    ("I love this, it is great", "positive"),
    ("What a waste of money", "negative"),
    ("Wonderful and fun", "positive"),
    ("Terrible, broken on arrival", "negative"),
]
NER_ROWS = [
    (["John", "lives", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"]),
    (["Mary", "visited", "Rome"], ["B-PER", "O", "B-LOC"]),
]


def check_environment() -> None:
    version = tuple(int(part) for part in tokenizers.__version__.split(".")[:2])
    if version < MINIMUM_TOKENIZERS:
        raise SystemExit(
            f"tokenizers {tokenizers.__version__} is too old to test anything: install the newest "
            f"(>= {'.'.join(map(str, MINIMUM_TOKENIZERS))}) in this environment"
        )


def save_pretrained_folders(out: Path) -> list[dict]:
    """Each head class, saved with its tokenizer by `save_pretrained`."""
    written = []
    tokenizer = bloomlm.AutoTokenizer.from_pretrained("bloomlm-tiny")
    config = bloomlm.BloomConfig.from_pretrained("bloomlm-tiny")
    for index, name in enumerate(
        ["BloomForCausalLM", "BloomForTokenClassification", "BloomForQuestionAnswering"]
    ):
        torch.manual_seed(index)
        model = getattr(bloomlm, name)(config)  # random weights: the files are what is tested
        folder = out / f"save_pretrained-{name}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        written.append({"folder": folder.name, "class": name})
    sentiment = bloomlm.BloomForSequenceClassification.from_pretrained("bloomlm-tiny-sentiment")
    folder = out / "save_pretrained-BloomForSequenceClassification"
    sentiment.save_pretrained(folder, safe_serialization=False)
    bloomlm.AutoTokenizer.from_pretrained("bloomlm-tiny-sentiment").save_pretrained(folder)
    written.append({"folder": folder.name, "class": "BloomForSequenceClassification"})
    return written


def cli(*args: str) -> None:
    status = bloomlm_main(list(args))
    if status != 0:
        raise SystemExit(f"bloomlm {' '.join(args)} failed with status {status}")


def convert_folders(out: Path) -> list[dict]:
    written = []
    for source, name, options in [
        ("bloomlm-tiny", "BloomForCausalLM", ["--dtype", "float32"]),
        ("bloomlm-tiny-sentiment", "BloomForSequenceClassification", ["--to", "bin"]),
    ]:
        folder = out / f"convert-{source}"
        cli("convert", source, str(folder), *options)
        written.append({"folder": folder.name, "class": name})
    return written


def finetune_folders(out: Path, data: Path) -> list[dict]:
    data.mkdir(parents=True, exist_ok=True)
    sentiment = data / "sentiment.jsonl"
    sentiment.write_text(
        "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in SENTIMENT_ROWS)
    )
    ner = data / "ner.jsonl"
    ner.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in NER_ROWS))
    quick = ["--epochs", "1", "--batch-size", "2", "--threads", "1"]
    written = []
    for task, train, name in [
        ("seq-cls", sentiment, "BloomForSequenceClassification"),
        ("token-cls", ner, "BloomForTokenClassification"),
    ]:
        folder = out / f"finetune-{task}"
        cli("finetune", task, "--train", str(train), "--out", str(folder), *quick)
        written.append({"folder": folder.name, "class": name})
    return written


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    check_environment()
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    written = save_pretrained_folders(out) + convert_folders(out)
    written += finetune_folders(out, out / "data")
    manifest = {"tokenizers": tokenizers.__version__, "folders": written}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(written)} folders with tokenizers {tokenizers.__version__} to {out}")


if __name__ == "__main__":
    main()

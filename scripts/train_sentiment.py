"""Make `bloomlm-tiny-sentiment`: `bloomlm finetune seq-cls` from `bloomlm-tiny` on VADER's
human-rated sentences.

Data: the ground-truth files of Hutto & Gilbert (ICWSM 2014) shipped in the vaderSentiment 3.3.2
source distribution (`additional_resources/hutto_ICWSM_2014.tar.gz`; the wheel lacks them): 4,200
tweets, 10,605 movie-review snippets, 3,708 Amazon review snippets and 5,190 New York Times
editorial snippets, each with the mean of about 20 human ratings on a -4..+4 scale. Licence: MIT
(Copyright (c) 2016 C.J. Hutto). Labels: `positive` when the mean rating is >= 0.5, `negative` when
it is <= -0.5; the near-neutral rest is left out (a two-label task with a clear answer).

Split (fixed, seed 0): 1,000 sentences held out and never trained on or used to pick the epoch;
1,000 for per-epoch evaluation (choosing the best epoch); the rest for training. The held-out
sentences are stored in `src/bloomlm/assets/vader-heldout.jsonl` with VADER's own prediction for
each, so the tests can compare the shipped model with both baselines without vaderSentiment
installed:
  * majority class: the training split's most frequent label, for every sentence;
  * lexicon: VADER 3.3.2's compound score (its lexicon + rules): > 0 positive, < 0 negative, 0 (no
    sentiment words) the majority class. Note: VADER's rules were developed on these same sentences,
    so this baseline has seen the test data; the fine-tuned model has not.

Training, both stages with the `bloomlm finetune` command line (bf16 autocast, AdamW, warmup +
linear decay):
  1. `causal-lm` from bloomlm-tiny, 2 epochs on the training sentences' text: bloomlm-tiny has read
     only Python documentation, so it first reads tweets and reviews (domain adaptation; labels
     unused, held-out unseen);
  2. `seq-cls` from that, 4 epochs; the epoch with the best accuracy on the evaluation split is
     kept.
The result is saved with fp16 weights; the held-out accuracy is measured on exactly what ships.

Run from the repository root (downloads ~2.5 MB with pip, then about 8.5 minutes on one CPU thread):
    python scripts/train_sentiment.py   # writes src/bloomlm/assets/bloomlm-tiny-sentiment/

The shipped model (run on CPython 3.11.7, torch 2.13 CPU, one thread of a Xeon with AMX, 509 s):
    best epoch 3: eval accuracy 0.7450
    held-out accuracy (1000 sentences): bloomlm-tiny-sentiment 0.736 (fp16 weights as shipped; fp32
    the same), VADER compound score 0.707, majority class (positive) 0.533
      tweets (179): 0.804 vs VADER 0.983; movies (518): 0.741 vs 0.624; amazon (148): 0.750 vs
      0.757; nyt (155): 0.626 vs 0.619
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

VADER = "vaderSentiment==3.3.2"
SOURCES = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
THRESHOLD = 0.5
N_HELDOUT, N_EVAL = 1000, 1000
ASSETS = Path(__file__).resolve().parent.parent / "src" / "bloomlm" / "assets"


def download_sdist(folder: Path) -> Path:
    """The vaderSentiment source distribution, fetched with pip (the only network access)."""
    existing = sorted(folder.glob("vaderSentiment-*.tar.gz"))
    if existing:
        return existing[-1]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        VADER,
        "-d",
        str(folder),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return sorted(folder.glob("vaderSentiment-*.tar.gz"))[-1]


def read_sdist(sdist: Path, unpack_to: Path) -> tuple[list[dict], object]:
    """(rated sentences, VADER's SentimentIntensityAnalyzer class) from the sdist."""
    rows = []
    with tarfile.open(sdist) as outer:
        inner_member = next(
            m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")
        )
        inner_bytes = outer.extractfile(inner_member).read()
        package = [m for m in outer.getmembers() if "/vaderSentiment/" in m.name and m.isfile()]
        for member in package:
            target = unpack_to / "vaderSentiment" / Path(member.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(outer.extractfile(member).read())
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for source, name in SOURCES.items():
            member = next(m for m in inner.getmembers() if m.name.endswith("/" + name))
            text = inner.extractfile(member).read().decode("utf-8")
            for line in text.splitlines():
                if not line.strip():
                    continue
                identifier, rating, sentence = line.split("\t", 2)
                rows.append(
                    {
                        "source": source,
                        "id": identifier,
                        "rating": float(rating),
                        "text": sentence.strip(),
                    }
                )
    spec = importlib.util.spec_from_file_location(
        "vader_module", unpack_to / "vaderSentiment" / "vaderSentiment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return rows, module.SentimentIntensityAnalyzer


def label_rows(rows: list[dict]) -> list[dict]:
    labelled = []
    for row in rows:
        if abs(row["rating"]) >= THRESHOLD:
            labelled.append({**row, "label": "positive" if row["rating"] > 0 else "negative"})
    return labelled


def bloomlm_finetune(arguments: list[str], env: dict[str, str]) -> None:
    """Run `bloomlm finetune ...` (the command line, as a user would) in a subprocess."""
    command = [sys.executable, "-m", "bloomlm", "finetune", *arguments]
    print("running: bloomlm finetune", " ".join(arguments), flush=True)
    subprocess.run(command, check=True, env=env)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )


def accuracy(predictions: list[str], rows: list[dict]) -> float:
    return sum(p == r["label"] for p, r in zip(predictions, rows)) / len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ASSETS / "bloomlm-tiny-sentiment"))
    parser.add_argument("--heldout-file", default=str(ASSETS / "vader-heldout.jsonl"))
    parser.add_argument("--download-dir", help="keep the sdist here (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1.5e-3)
    parser.add_argument(
        "--adapt-epochs", type=int, default=2, help="causal-LM epochs on the training text first"
    )
    parser.add_argument("--adapt-learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bloomlm-sentiment-") as work:
        work = Path(work)
        download_dir = Path(args.download_dir) if args.download_dir else work
        download_dir.mkdir(parents=True, exist_ok=True)
        rows, analyzer_class = read_sdist(download_sdist(download_dir), work / "vader")
        labelled = label_rows(rows)
        random.Random(args.seed).shuffle(labelled)
        heldout, evaluation, train = (
            labelled[:N_HELDOUT],
            labelled[N_HELDOUT : N_HELDOUT + N_EVAL],
            labelled[N_HELDOUT + N_EVAL :],
        )
        counts = Counter(r["label"] for r in train)
        majority = counts.most_common(1)[0][0]
        print(
            f"{len(rows)} rated sentences, {len(labelled)} with |rating| >= {THRESHOLD}: "
            f"train {len(train)} {dict(counts)}, eval {len(evaluation)}, held out {len(heldout)}"
        )

        analyzer = analyzer_class()
        for row in heldout:
            compound = analyzer.polarity_scores(row["text"])["compound"]
            row["vader_compound"] = compound
            row["vader_label"] = (
                "positive" if compound > 0 else "negative" if compound < 0 else majority
            )
            row["majority_label"] = majority
        write_jsonl(work / "train.jsonl", [{"text": r["text"], "label": r["label"]} for r in train])
        write_jsonl(
            work / "eval.jsonl", [{"text": r["text"], "label": r["label"]} for r in evaluation]
        )

        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(ASSETS.parent.parent), os.environ.get("PYTHONPATH", "")]
            ),
        }
        common = [
            "--train", str(work / "train.jsonl"),
            "--eval", str(work / "eval.jsonl"),
            "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length),
            "--threads", str(args.threads),
            "--seed", str(args.seed),
            "--bf16",
        ]  # fmt: skip
        base = "bloomlm-tiny"
        if (
            args.adapt_epochs
        ):  # stage 1: the language model reads the training sentences (text only)
            adapted = work / "adapted"
            bloomlm_finetune(
                ["causal-lm", "--model", base, "--out", str(adapted),
                 "--epochs", str(args.adapt_epochs),
                 "--learning-rate", str(args.adapt_learning_rate), *common],
                env,
            )  # fmt: skip
            shutil.rmtree(adapted / "training_state")
            base = str(adapted)
        trained = work / "model"
        bloomlm_finetune(
            ["seq-cls", "--model", base, "--out", str(trained), "--labels", "negative,positive",
             "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate), *common],
            env,
        )  # fmt: skip
        train_seconds = time.perf_counter() - started

        import torch

        from bloomlm import AutoTokenizer, BloomForSequenceClassification
        from bloomlm.tasks import classify

        torch.set_num_threads(args.threads)
        shutil.rmtree(trained / "training_state")  # optimizer and latest weights: not shipped
        model = BloomForSequenceClassification.from_pretrained(trained)
        tokenizer = AutoTokenizer.from_pretrained(trained)
        texts = [r["text"] for r in heldout]
        fp32 = accuracy([r["label"] for r in classify(model, tokenizer, texts)], heldout)
        model.half().save_pretrained(trained)  # ship fp16 weights: half the size
        half = BloomForSequenceClassification.from_pretrained(trained, torch_dtype=torch.float32)
        predictions = [r["label"] for r in classify(half, tokenizer, texts)]
        fp16 = accuracy(predictions, heldout)
        for row, prediction in zip(heldout, predictions):
            row["model_label"] = prediction  # for the record; the tests recompute it

        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(trained), out)
        write_jsonl(Path(args.heldout_file), heldout)

    results = json.loads((out / "eval_results.json").read_text())
    print(f"best epoch {results['best_epoch']}: eval accuracy {results['best']['accuracy']:.4f}")
    print(f"held-out accuracy ({len(heldout)} sentences):")
    print(
        f"  bloomlm-tiny-sentiment   {fp16:.4f}  "
        f"(fp16 weights as shipped; fp32 before saving {fp32:.4f})"
    )
    print(
        f"  VADER compound score     {accuracy([r['vader_label'] for r in heldout], heldout):.4f}"
    )
    print(f"  majority class ({majority}) {accuracy([majority] * len(heldout), heldout):.4f}")
    for source in SOURCES:
        rows = [r for r in heldout if r["source"] == source]
        ours = accuracy([r["model_label"] for r in rows], rows)
        vader = accuracy([r["vader_label"] for r in rows], rows)
        print(
            f"    {source:<7} ({len(rows):3d} sentences): "
            f"bloomlm-tiny-sentiment {ours:.3f}, VADER {vader:.3f}"
        )
    print(
        f"time: {train_seconds:.0f} s to download, split and fine-tune; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

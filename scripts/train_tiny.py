"""Train `bloomlm-tiny`, the embedded default model, from nothing but the Python standard library.

Data: the English text that ships with every CPython install, so the script runs offline anywhere:
  * `pydoc_data.topics` (the language reference topics `help()` shows), and
  * the docstrings (over 200 characters) of the pure-Python standard library modules, tests
    excluded.
Licence: Python Software Foundation License (PSF-2.0), which allows redistribution of derived works.
The exact text depends on the Python version (the shipped model used CPython 3.11.7).

Model (why this shape): BLOOM architecture, vocab 4096, hidden 192, 4 layers, 6 heads of 32, ~2.6M
parameters.
  * vocab 4096: the corpus is ~1.7 MB; a larger vocabulary would leave most rows of the embedding
    (which is also the tied LM head, the biggest matrix here) seen a handful of times, a smaller one
    makes sequences long;
  * hidden 192 / 4 layers: a few MB in fp16 and a few minutes of training on 2 CPU threads;
  * 6 heads: not a power of two, so the embedded default exercises BLOOM's interpolated ALiBi slopes
    (as bloom-176b's 112 heads do).

Training: 1000 steps of 16 x 128 tokens (2.0M tokens, about 5 passes over the 420k training tokens),
AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), 100 warmup steps then a cosine-shaped decay to 0,
bf16 autocast, fp32 weights; saved in float16 (the validation loss is the same with the fp16
weights).

Run from the repository root (about 4 minutes on 2 CPU threads):
    python scripts/train_tiny.py                 # writes src/bloomlm/assets/bloomlm-tiny/
    python scripts/train_tiny.py --steps 50 --out /tmp/t   # a quick smoke run

The shipped model (CPython 3.11.7, torch 2.13 CPU, 2 threads of a Xeon with AMX bf16): 2,265
documents, 1,668,355 characters; 420,309 training and 20,944 validation tokens; 2,566,656
parameters; validation loss 4.096 (perplexity 60.1), the same with fp16 weights; 234 s.
"""

from __future__ import annotations

import argparse
import ast
import math
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bloomlm import BloomConfig, BloomForCausalLM, BloomTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in BLOOM's tokenizer
# BLOOM's pre-tokenizer: split on runs of non-space, non-punctuation characters (with one leading
# space).
BLOOM_SPLIT = Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+")
SKIPPED_PARTS = ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo")


def corpus_documents() -> list[str]:
    """pydoc topics and long stdlib docstrings, in a fixed order."""
    import pydoc_data.topics

    documents = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in SKIPPED_PARTS or part.startswith("test") for part in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                docstring = ast.get_docstring(node)
                if docstring and len(docstring) > 200:
                    documents.append(docstring)
    return [doc.strip() for doc in documents if doc.strip()]


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE laid out exactly like BLOOM's tokenizer.json (pre-tokenizer, decoder,
    post-processor)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(BLOOM_SPLIT, behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=True, trim_offsets=False, use_regex=True
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def save_tokenizer(backend: Tokenizer, folder: Path) -> BloomTokenizerFast:
    tokenizer = BloomTokenizerFast(
        backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(folder)
    return BloomTokenizerFast.from_pretrained(folder)


def token_stream(tokenizer: BloomTokenizerFast, documents: list[str]) -> torch.Tensor:
    """All documents as one id stream, each ended by </s>."""
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def evaluate(model: BloomForCausalLM, stream: torch.Tensor, seq_len: int, batch_size: int) -> float:
    """Mean next-token loss over consecutive, non-overlapping windows of the validation stream."""
    model.eval()
    n_windows = (len(stream) - 1) // seq_len
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * batch.shape[0]
        count += batch.shape[0]
    model.train()
    return total / count


def learning_rate(step: int, steps: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress)) * 0.9 + peak * 0.1 * (1 - progress)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="src/bloomlm/assets/bloomlm-tiny")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="train in float32 (default: bfloat16 autocast, fp32 weights)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    documents = corpus_documents()
    random.Random(args.seed).shuffle(documents)
    n_val = max(1, len(documents) // 20)  # 5% of documents, never trained on
    train_docs, val_docs = documents[n_val:], documents[:n_val]
    print(
        f"corpus: {len(documents)} documents, {sum(map(len, documents)):,} characters "
        f"(Python {sys.version.split()[0]})"
    )

    staging = Path(tempfile.mkdtemp(prefix="bloomlm-tiny-"))
    staging.chmod(0o755)
    tokenizer = save_tokenizer(train_tokenizer(train_docs, args.vocab_size), staging)
    train_stream, val_stream = (
        token_stream(tokenizer, train_docs),
        token_stream(tokenizer, val_docs),
    )
    print(f"tokens: train {len(train_stream):,}, validation {len(val_stream):,}")

    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = BloomForCausalLM(config)
    model.train()
    print(f"model: {model.num_parameters():,} parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(args.seed)
    last_start = len(train_stream) - args.seq_len - 1
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(
                step, args.steps, warmup=min(100, args.steps // 10 + 1), peak=args.lr
            )
        starts = torch.randint(0, last_start, (args.batch_size,), generator=generator)
        batch = torch.stack([train_stream[s : s + args.seq_len] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  train loss {loss.item():.3f}  "
                f"{time.perf_counter() - started:6.0f} s",
                flush=True,
            )

    val_fp32 = evaluate(model, val_stream, args.seq_len, args.batch_size)
    model.half()
    val_fp16 = evaluate(
        model.float(), val_stream, args.seq_len, args.batch_size
    )  # fp16 weights, fp32 math
    model.half()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(staging)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), out)
    elapsed = time.perf_counter() - started
    print(
        f"validation loss: fp32 {val_fp32:.3f} (perplexity {math.exp(val_fp32):.1f}); "
        f"fp16 weights {val_fp16:.3f}"
    )
    print(f"time: {elapsed:.0f} s on {args.threads} CPU threads; saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

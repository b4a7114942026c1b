"""Quality cost of bf16 and weight-only int8 against fp32 on the same checkpoint.

    python benchmarks/quality.py /tmp/bloomlm-bench/bloom-560m            # the benchmark's random 560m
    python benchmarks/quality.py bloomlm-tiny --text                      # the trained embedded model

Reports, per variant: max and mean |logit - fp32 logit| over all positions of a batch of prompts, the share
of positions whose argmax agrees with fp32's, the share of 32 greedily generated tokens equal to fp32's
greedy continuation, and with --text the perplexity on held-out text (the Python docs' topics, which the
embedded model was not trained on past its validation split) next to fp32's. Writes benchmarks/QUALITY.md
when --out is given.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from bloomlm import AutoTokenizer, BloomForCausalLM

VARIANTS = {"bf16": {"torch_dtype": torch.bfloat16}, "int8": {"quantize": "int8"}}


def prompts(folder: str, text: bool, batch: int = 4, length: int = 64) -> torch.Tensor:
    if not text:
        return torch.randint(4, 1024, (batch, length), generator=torch.Generator().manual_seed(0))
    import pydoc_data.topics

    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = "\n".join(sorted(pydoc_data.topics.topics.values()))
    ids = tokenizer(corpus[-200_000:], return_tensors="pt").input_ids[0]  # the end of the corpus
    return ids[: batch * length].view(batch, length)


def perplexity(model: BloomForCausalLM, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        return math.exp(model(ids, labels=ids).loss.float().item())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument(
        "--text", action="store_true", help="real text prompts and perplexity (trained models)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = prompts(args.model, args.text)
    reference = BloomForCausalLM.from_pretrained(args.model)
    with torch.inference_mode():
        ref_logits = reference(ids).logits.float()
        ref_greedy = reference.generate(
            ids[:, :16], max_new_tokens=32, min_new_tokens=32, do_sample=False
        )
    lines = [
        f"# Quality of bf16 and int8 against fp32: `{args.model}`",
        "",
        f"Command: `python benchmarks/quality.py {args.model}{' --text' if args.text else ''}`; "
        f"{ids.shape[0]} prompts x {ids.shape[1]} tokens; greedy: 32 new tokens after 16.",
        "",
        "| variant | max abs logit diff | mean abs logit diff | argmax agreement | greedy tokens equal |"
        + (" perplexity (fp32 → variant) |" if args.text else ""),
        "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if args.text else ""),
    ]
    for name, kwargs in VARIANTS.items():
        model = BloomForCausalLM.from_pretrained(args.model, **kwargs)
        with torch.inference_mode():
            logits = model(ids).logits.float()
            greedy = model.generate(
                ids[:, :16], max_new_tokens=32, min_new_tokens=32, do_sample=False
            )
        diff = (logits - ref_logits).abs()
        agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        same = (greedy[:, 16:] == ref_greedy[:, 16:]).float().mean().item()
        row = f"| {name} | {diff.max():.4f} | {diff.mean():.5f} | {agree:.1%} | {same:.1%} |"
        if args.text:
            row += f" {perplexity(reference, ids):.2f} → {perplexity(model, ids):.2f} |"
        lines.append(row)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with args.out.open("a") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()

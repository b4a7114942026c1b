"""Quality cost of every `quantize=` mode (and bf16) against fp32 on the same checkpoint.

    python benchmarks/quality.py bloomlm-tiny --text                  # the trained embedded model
    python benchmarks/quality.py /tmp/bloomlm-bench/bloom-560m        # the benchmark's random 560m
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/quality.py ...  # as a CPU without VNNI runs

Greedy agreement (the issue's definition): fp32 continues each of 32 prompts greedily for 64 tokens;
each variant then reads prompt + that continuation (teacher forcing), and the share of the 64
positions where its top-1 token equals fp32's is counted, over all prompts. Also per variant: max
and mean |logit - fp32 logit| at those positions, the perplexity of fp32's continuation under the
variant, and with --text the perplexity of held-out text (the end of the Python docs' topics, which
the embedded model was not trained on past its validation split). `--sensitivity` adds int8 rows
with one part kept in float32 (the LM head, the embedding, the first or last block), to find what
costs agreement. Writes the table to --out (appended) when given.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from pathlib import Path

import torch

from bloomlm import AutoTokenizer, BloomForCausalLM
from bloomlm.torch.quantize import Int8Linear, activation_bits

PROMPTS, PROMPT_LENGTH, NEW_TOKENS = 32, 16, 64
CHUNK = 4  # prompts per forward: the 560m's logits for 4 x 80 positions are 320 MB
VARIANTS = {
    "bf16": {"torch_dtype": torch.bfloat16},
    "fp16": {"quantize": "fp16"},
    "int8": {"quantize": "int8"},
    "int8 (7-bit activations)": {"quantize": "int8", "bits": 7},
    "int8 (8-bit activations)": {"quantize": "int8", "bits": 8},
    "int8-weight-only": {"quantize": "int8-weight-only"},
}
KEEP_FLOAT = {  # --sensitivity: int8 with this part taken from the fp32 model
    "int8 (LM head fp32)": lambda m: m.lm_head,
    "int8 (embedding fp32)": lambda m: m.transformer.word_embeddings,
    "int8 (first block fp32)": lambda m: m.transformer.h[0],
    "int8 (last block fp32)": lambda m: m.transformer.h[-1],
}


def prompt_ids(folder: str, text: bool, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if not text:
        return torch.randint(4, vocab_size, (PROMPTS, PROMPT_LENGTH), generator=generator)
    ids = held_out_ids(folder)
    starts = torch.linspace(0, len(ids) - PROMPT_LENGTH - 1, PROMPTS).long()
    return torch.stack([ids[s : s + PROMPT_LENGTH] for s in starts.tolist()])


def held_out_ids(folder: str) -> torch.Tensor:
    import pydoc_data.topics

    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = "\n".join(sorted(pydoc_data.topics.topics.values()))
    return tokenizer(corpus[-200_000:], return_tensors="pt").input_ids[0]  # the corpus' end


def text_perplexity(model: BloomForCausalLM, ids: torch.Tensor) -> float:
    """Perplexity of 32 windows of 128 held-out tokens."""
    windows = ids[: 32 * 128].view(32, 128)
    losses = [model(w, labels=w).loss.float().item() for w in windows.split(CHUNK)]
    return math.exp(sum(losses) / len(losses))


def compare(model, reference, sequences: torch.Tensor) -> dict[str, float]:
    """Teacher-forced agreement with fp32's tokens, logit differences, continuation perplexity."""
    agree = total = 0
    max_diff, diff_sum, nll_sum = 0.0, 0.0, 0.0
    for chunk in sequences.split(CHUNK):
        positions = slice(PROMPT_LENGTH - 1, -1)  # the logits that predict the continuation
        ours = model(chunk).logits[:, positions].float()
        theirs = reference(chunk).logits[:, positions].float()
        target = chunk[:, PROMPT_LENGTH:]
        agree += (ours.argmax(-1) == target).sum().item()
        total += target.numel()
        diff = (ours - theirs).abs()
        max_diff = max(max_diff, diff.max().item())
        diff_sum += diff.mean(-1).sum().item()
        nll = torch.nn.functional.cross_entropy(
            ours.flatten(0, 1), target.flatten(), reduction="sum"
        )
        nll_sum += nll.item()
    return {
        "agreement": agree / total,
        "max_diff": max_diff,
        "mean_diff": diff_sum / total,
        "continuation_ppl": math.exp(nll_sum / total),
    }


def load_variant(folder: str, name: str, reference: BloomForCausalLM) -> BloomForCausalLM:
    if name in KEEP_FLOAT:
        model = BloomForCausalLM.from_pretrained(folder, quantize="int8")
        part = KEEP_FLOAT[name]
        target, source = part(model), part(reference)
        for parent in model.modules():  # swap the module in where it hangs
            for child_name, child in parent.named_children():
                if child is target:
                    setattr(parent, child_name, source)
        return model
    kwargs = dict(VARIANTS[name])
    bits = kwargs.pop("bits", None)
    model = BloomForCausalLM.from_pretrained(folder, **kwargs)
    if bits is not None:
        for module in model.modules():
            if isinstance(module, Int8Linear):
                module.bits = bits
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--text", action="store_true", help="real text prompts and perplexity")
    parser.add_argument("--sensitivity", action="store_true", help="int8 with one part in fp32")
    parser.add_argument("--variants", help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    reference = BloomForCausalLM.from_pretrained(args.model)
    prompts = prompt_ids(args.model, args.text, reference.config.vocab_size)
    sequences = torch.cat([
        reference.generate(chunk, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False)
        for chunk in prompts.split(8)
    ])  # fmt: skip
    held_out = held_out_ids(args.model) if args.text else None
    fp32 = compare(reference, reference, sequences)
    forced = "".join(
        f"{name}={os.environ[name]} "
        for name in ("FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
        if name in os.environ
    )  # what a CPU without VNNI (or AVX512) would run, forced on this one
    lines = [
        f"# Quality against fp32: `{args.model}`",
        "",
        f"Command: `{forced}python "
        f"benchmarks/quality.py {args.model}{' --text' if args.text else ''}"
        f"{' --sensitivity' if args.sensitivity else ''}"
        f"{f' --variants {chr(34)}{args.variants}{chr(34)}' if args.variants else ''}`; "
        f"{platform.machine()}, torch "
        f"{torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, int8 activations "
        f"{activation_bits()}-bit by default here. {PROMPTS} prompts x {PROMPT_LENGTH} tokens, "
        f"fp32 greedy continuation of {NEW_TOKENS} tokens each.",
        "",
        "| variant | greedy agreement | max abs logit diff | mean abs logit diff "
        "| continuation ppl (fp32 → variant) |"
        + (" held-out ppl (fp32 → variant) |" if args.text else ""),
        "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if args.text else ""),
    ]
    reference_ppl = text_perplexity(reference, held_out) if args.text else None
    # fp32 read teacher-forced against its own cached, incremental greedy run: the ceiling
    lines.append(
        f"| fp32 (itself, teacher-forced) | {fp32['agreement']:.1%} | 0 | 0 "
        f"| {fp32['continuation_ppl']:.3f} |" + (f" {reference_ppl:.2f} |" if args.text else "")
    )
    names = list(VARIANTS) + (list(KEEP_FLOAT) if args.sensitivity else [])
    if args.variants:
        names = [name for name in names if name in args.variants.split(",")]
    for name in names:
        model = load_variant(args.model, name, reference)
        result = compare(model, reference, sequences)
        row = (
            f"| {name} | {result['agreement']:.1%} | {result['max_diff']:.4f} "
            f"| {result['mean_diff']:.5f} "
            f"| {fp32['continuation_ppl']:.3f} → {result['continuation_ppl']:.3f} |"
        )
        if args.text:
            row += f" {reference_ppl:.2f} → {text_perplexity(model, held_out):.2f} |"
        lines.append(row)
        print(row, flush=True)
        del model
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()

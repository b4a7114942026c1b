"""Assisted (speculative) decoding: acceptance rate and speedup over plain greedy search, bloomlm
and transformers 4.37 on the same folders, in one process.

    python benchmarks/assisted_bench.py [--extra-layers 28] [--epsilons 0.05,0.3,1]
        [--new 48] [--rounds 3] [--threads 1] [--json benchmarks/ASSISTED.json]
        [--markdown benchmarks/ASSISTED.md]

How the draft is made useful without downloading a model: the draft is bloomlm-tiny, the small
BLOOM embedded in the package (trained on Python's documentation; 4 layers, hidden 192); the
target is that model with `--extra-layers` more blocks inserted before its final LayerNorm, every
weight of them drawn as BLOOM initialises (normal, std 0.02) and their two output projections
(attention `dense`, MLP `dense_4h_to_h`) scaled by epsilon. Each extra block adds epsilon times
a random update to the residual stream, so the target is the draft plus a perturbation whose size
epsilon sets: epsilon near 0 gives a target that mostly agrees with its draft (high acceptance),
1 a target whose extra layers are as strong as freshly initialised ones. The target costs
(4 + extra) / 4 times the draft per token, as a 7B model costs about 12x a 560m one.

For each epsilon and each prompt (Python-documentation text, the draft's domain): greedy search of
`--new` tokens by the target alone, then with `assistant_model=` the draft (transformers' default
schedule: 5 drafts, "heuristic"), then with `prompt_lookup_num_tokens=5`, in bloomlm and in
transformers; the assisted ids are checked equal to plain greedy search's. Timed rounds are
interleaved (every system's round r, then r + 1) and the median kept. One thread by default: on a
shared 2-core machine a 2-thread OpenMP team waits on the other jobs and times swing tenfold.
Acceptance = drafted tokens the target kept / drafted tokens, counted on bloomlm's run by wrapping
the target's decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from bloomlm import BloomConfig, BloomForCausalLM, BloomTokenizerFast

DRAFT = "bloomlm-tiny"
PROMPTS = [
    "The import statement combines two operations; it searches for the named module,",
    "A list comprehension consists of brackets containing an expression followed by a for",
    "Return a new dictionary initialized from an optional positional argument and a possibly",
    "The with statement is used to wrap the execution of a block with methods defined by a",
]


def build_target(draft: BloomForCausalLM, extra_layers: int, epsilon: float) -> BloomForCausalLM:
    """The draft's blocks, then `extra_layers` near-identity blocks, then its ln_f and head."""
    config = BloomConfig.from_dict(
        {**draft.config.to_dict(), "n_layer": draft.config.n_layer + extra_layers}
    )
    target = BloomForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in target.transformer.h[draft.config.n_layer :]:
            for name, param in block.named_parameters():
                if "layernorm" in name:
                    param.copy_(torch.ones_like(param) if name.endswith("weight") else 0 * param)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            block.self_attention.dense.weight.mul_(epsilon)
            block.mlp.dense_4h_to_h.weight.mul_(epsilon)
        state = {k: v for k, v in draft.state_dict().items()}
        missing = target.load_state_dict(state, strict=False).missing_keys
    assert all(".h." in key for key in missing), missing  # only the extra blocks are new
    return target.eval()


class CountingTarget:
    """bloomlm's target with a decoder that counts the passes and the tokens each one reads."""

    def __init__(self, model: BloomForCausalLM):
        self.model, self.config = model, model.config
        self.generation_config = model.generation_config
        self.passes, self.read = 0, 0

    def make_decoder(self, rows: int, capacity: int, *, compile=None):
        decoder, counter = self.model.make_decoder(rows, capacity), self

        class Counting:
            def __getattr__(self, name):
                return getattr(decoder, name)

            def prefill(self, ids, mask=None, **flags):
                counter.passes += 1
                counter.read += ids.shape[1]
                return decoder.prefill(ids, mask, **flags)

            def step(self, ids, **flags):
                counter.passes += 1
                counter.read += ids.shape[1]
                return decoder.step(ids, **flags)

        return Counting()


def acceptance(
    target: BloomForCausalLM, draft: BloomForCausalLM, ids: torch.Tensor, new: int
) -> dict:
    """Drafted tokens kept / drafted: each pass reads the prompt or the last token, plus drafts;
    each round adds the kept drafts plus one token of the target's."""
    counting = CountingTarget(target)
    out = counting_generate(counting, ids, new, assistant_model=draft)
    generated = out.shape[1] - ids.shape[1]
    drafted = counting.read - ids.shape[1] - (counting.passes - 1)
    kept = generated - counting.passes
    return {
        "target_passes": counting.passes,
        "drafted": drafted,
        "kept": kept,
        "acceptance": round(kept / max(drafted, 1), 3),
        "tokens_per_pass": round(generated / counting.passes, 2),
    }


def counting_generate(model, ids: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    from bloomlm.torch.generate import generate

    return generate(model, ids, max_new_tokens=new, min_new_tokens=new, pad_token_id=3, **kwargs)


def timed(model, ids: torch.Tensor, new: int, **kwargs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, pad_token_id=3, **kwargs)
    return time.perf_counter() - start, out


def run_epsilon(folders: dict, epsilon: float, prompts: list, args) -> list[dict]:
    """Every system on every prompt, rounds interleaved; returns one row per (system, prompt)."""
    # Over 40 lines: loads the four models, runs the interleaved rounds, checks ids, reports.
    ours = {
        name: BloomForCausalLM.from_pretrained(folder).eval() for name, folder in folders.items()
    }
    theirs = {
        name: transformers.BloomForCausalLM.from_pretrained(folder).eval()
        for name, folder in folders.items()
    }
    systems = {
        ("bloomlm", "greedy"): (ours["target"], {}),
        ("bloomlm", "assisted"): (ours["target"], {"assistant_model": ours["draft"]}),
        ("bloomlm", "prompt lookup"): (ours["target"], {"prompt_lookup_num_tokens": 5}),
        ("transformers", "greedy"): (theirs["target"], {}),
        ("transformers", "assisted"): (theirs["target"], {"assistant_model": theirs["draft"]}),
        ("transformers", "prompt lookup"): (theirs["target"], {"prompt_lookup_num_tokens": 5}),
    }
    times = {(system, p): [] for system in systems for p in range(len(prompts))}
    outputs = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up, untimed
        for system, (model, kwargs) in systems.items():
            for p, ids in enumerate(prompts):
                seconds, out = timed(model, ids, args.new, **kwargs)
                outputs[system, p] = out
                if round_ > 0:
                    times[system, p].append(seconds)
    rows = []
    for p, ids in enumerate(prompts):
        plain = outputs[("bloomlm", "greedy"), p]
        for system in systems:
            if not torch.equal(outputs[system, p], plain):
                raise AssertionError(f"{system} on prompt {p} differs from plain greedy search")
        stats = acceptance(ours["target"], ours["draft"], ids, args.new)
        for library, mode in systems:
            median = statistics.median(times[(library, mode), p])
            base = statistics.median(times[(library, "greedy"), p])
            rows.append(
                {
                    "epsilon": epsilon,
                    "prompt": p,
                    "library": library,
                    "mode": mode,
                    "median_s": round(median, 4),
                    "tokens_per_s": round(args.new / median, 1),
                    "speedup": round(base / median, 2),
                    **(stats if (library, mode) == ("bloomlm", "assisted") else {}),
                }
            )
    return rows


NOTES = """
Reading the table. epsilon scales the extra layers' output projections: 0.05 leaves the target
almost its draft (every drafted token kept), 1 makes the extra layers as strong as freshly
initialised ones (six in ten kept). Acceptance is drafted tokens kept / drafted (bloomlm's run,
counted on the target's decoder; transformers keeps the same tokens, its ids being equal).
The speedup stays below the tokens per target pass because drafting is not free (the 4-layer
draft runs once per drafted token, an eighth of the target each) and a pass over ten tokens costs
more than a pass over one. Prompt lookup copies tokens from the prompt and the text so far, so it
gains only where the text repeats itself. bloomlm and transformers run the same algorithm with the
same schedule (5 drafts, "heuristic": +2 after a fully kept draft, -1 otherwise); each library's
speedup is against its own greedy search, measured in the same rounds.
"""


def markdown(rows: list[dict], args, draft_layers: int) -> str:
    lines = [
        f"# Assisted decoding: bloomlm-tiny drafting for itself + {args.extra_layers} "
        "near-identity layers",
        "",
        f"Command: `python benchmarks/assisted_bench.py --extra-layers {args.extra_layers} "
        f"--epsilons {args.epsilons} --new {args.new} --rounds {args.rounds} "
        f"--threads {args.threads}`. Target {draft_layers + args.extra_layers} layers, draft "
        f"{draft_layers} (hidden 192, vocab 4096), fp32, greedy, {args.new} new tokens per prompt, "
        f"{len(PROMPTS)} prompts, median of {args.rounds} interleaved rounds; {args.threads} "
        f"thread(s) on a 2-core machine shared with other jobs (load average {args.load:.1f} at "
        "the end). Every assisted and prompt-lookup output equals plain greedy search's ids.",
        "",
        "| epsilon | library | mode | tokens/s | speedup vs its own greedy | acceptance | "
        "tokens per target pass |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    keys = sorted(
        {(r["epsilon"], r["library"], r["mode"]) for r in rows},
        key=lambda k: (k[0], k[1], ["greedy", "assisted", "prompt lookup"].index(k[2])),
    )
    for epsilon, library, mode in keys:
        group = [
            r for r in rows if (r["epsilon"], r["library"], r["mode"]) == (epsilon, library, mode)
        ]
        tokens = statistics.mean(r["tokens_per_s"] for r in group)
        speedup = statistics.mean(r["speedup"] for r in group)
        accepted = [r["acceptance"] for r in group if "acceptance" in r]
        per_pass = [r["tokens_per_pass"] for r in group if "tokens_per_pass" in r]
        acc = f"{statistics.mean(accepted):.2f}" if accepted else ""
        tpp = f"{statistics.mean(per_pass):.2f}" if per_pass else ""
        lines.append(
            f"| {epsilon:g} | {library} | {mode} | {tokens:.1f} | {speedup:.2f}x | {acc} | {tpp} |"
        )
    return "\n".join(lines) + "\n" + NOTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra-layers", type=int, default=28)
    parser.add_argument("--epsilons", default="0.05,0.3,1")
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    draft = BloomForCausalLM.from_pretrained(DRAFT, torch_dtype=torch.float32).eval()
    tokenizer = BloomTokenizerFast.from_pretrained(DRAFT)
    prompts = [tokenizer(text, return_tensors="pt")["input_ids"] for text in PROMPTS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        draft.save_pretrained(Path(tmp) / "draft")
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            build_target(draft, args.extra_layers, epsilon).save_pretrained(Path(tmp) / "target")
            folders = {"draft": Path(tmp) / "draft", "target": Path(tmp) / "target"}
            for row in run_epsilon(folders, epsilon, prompts, args):
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.load = os.getloadavg()[0]
    table = markdown(rows, args, draft.config.n_layer)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
            + "\n"
        )
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()

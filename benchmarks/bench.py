"""CPU inference benchmark: bloomlm against transformers 4.37.2 and CTranslate2, same checkpoint, same run.

    python benchmarks/bench.py                 # bloom-560m shape, 3 rounds, writes benchmarks/RESULTS.md
    python benchmarks/bench.py --quick         # tiny shape, 1 round (what the test suite runs)

Every (system, task) runs in a fresh process, so load times are cold-process times and each process's
peak RSS is its own. Tasks:
  load          from_pretrained (or CTranslate2's Generator) plus the first forward, after imports
  prefill-BxT   time to the first token's logits for a B x T prompt, as each system's generate does it
  decode-B      greedy decode of 32 new tokens after a 32-token prompt (eos cannot stop it: min length 32)
The machine's memory bandwidth is measured too; batch-1 decode reads every weight once per token, so
bandwidth / weight bytes is a ceiling on its tokens per second, printed next to each row.
Needs the test extra (transformers) and `pip install ctranslate2`; systems that are missing are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE_TOKENIZER = HERE.parent / "tests" / "fixtures" / "bloom-style-tokenizer"
SHAPES = {
    "560m": dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "tiny": dict(vocab_size=1024, hidden_size=64, n_layer=2, n_head=4),
}
SYSTEMS = [
    ("bloomlm", "fp32"),
    ("bloomlm", "bf16"),
    ("bloomlm", "int8"),
    ("transformers", "fp32"),
    ("ctranslate2", "fp32"),
    ("ctranslate2", "int8"),
    ("flax", "fp32"),
]
TASKS = ["load", "prefill-1x128", "prefill-8x128", "decode-1", "decode-8"]
PROMPT, NEW_TOKENS = 32, 32


# ---------------------------------------------------------------------------------------------------
# Setup: checkpoint, conversions, bandwidth
# ---------------------------------------------------------------------------------------------------


def make_checkpoint(shape: str, folder: Path) -> None:
    """A random BLOOM of a real shape, saved by bloomlm (transformers reads it), plus a tokenizer."""
    import torch

    from bloomlm import BloomConfig, BloomForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    config = BloomConfig(**SHAPES[shape], pad_token_id=3)
    model = BloomForCausalLM(config)  # initialised as transformers does: N(0, 0.02), zero biases
    model.save_pretrained(folder)
    for item in FIXTURE_TOKENIZER.iterdir():  # CTranslate2's converter wants a tokenizer
        shutil.copy(item, folder / item.name)


def convert_ctranslate2(folder: Path, out: Path, quantization: str) -> bool:
    if out.exists():
        return True
    converter = shutil.which("ct2-transformers-converter", path=str(Path(sys.executable).parent))
    if converter is None:
        return False
    cmd = [
        converter,
        "--model",
        str(folder),
        "--output_dir",
        str(out),
        "--quantization",
        quantization,
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return True


def memory_bandwidth(threads: int) -> float:
    """Read bandwidth in GB/s over 1 GiB: the best of a plain sum and of a matrix-vector product (the
    operation batch-1 decoding is made of), several tries each."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(2**28, dtype=torch.float32)
    matrix, vector = data.view(2**14, 2**14), torch.ones(2**14)
    best = float("inf")
    for read in (data.sum, lambda: torch.mv(matrix, vector)):
        for _ in range(5):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------------
# Workers: one (system, variant, task) per process
# ---------------------------------------------------------------------------------------------------


def _timed(run, reps: int) -> dict:
    """Median wall time of `reps` calls of `run` (already warmed up), and every time."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "all": times}


def _peak_rss_mb() -> float:
    # VmHWM is this process image's own high-water mark; getrusage's ru_maxrss would also count the
    # parent's peak, which a child inherits across fork and exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompt(batch: int, length: int, vocab: int = 1024):
    import numpy as np

    return np.random.default_rng(0).integers(4, vocab, size=(batch, length))


def _load_torch_model(system: str, variant: str, folder: Path):
    import torch

    if system == "transformers":
        from transformers import BloomForCausalLM

        return BloomForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    from bloomlm import BloomForCausalLM

    if variant == "int8":
        return BloomForCausalLM.from_pretrained(folder, quantize="int8")
    return BloomForCausalLM.from_pretrained(
        folder, torch_dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[variant]
    )


def _time_torch(system: str, variant: str, task: str, folder: Path, reps: int) -> dict:
    import torch

    start = time.perf_counter()
    model = _load_torch_model(system, variant, folder)
    with torch.inference_mode():
        if task == "load":
            model(torch.tensor([[5]]))
            return {"seconds": time.perf_counter() - start}
        if task.startswith("prefill"):
            batch, length = (int(x) for x in task.split("-")[1].split("x"))
            ids = torch.from_numpy(_prompt(batch, length))

            def run():
                if system == "bloomlm":  # what bloomlm's generate does: its decoder's prefill
                    model.make_decoder(batch, length + 1).prefill(ids)
                else:
                    model(ids)

        else:
            batch = int(task.split("-")[1])
            ids = torch.from_numpy(_prompt(batch, PROMPT))

            def run():
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=3)  # fmt: skip
                assert out.shape == (batch, PROMPT + NEW_TOKENS)

        run()  # warm-up
        return _timed(run, reps)


def _time_ctranslate2(variant: str, task: str, folder: Path, reps: int) -> dict:
    import ctranslate2

    model_dir = folder.parent / f"{folder.name}-ct2-{variant}"
    start = time.perf_counter()
    compute_type = {"fp32": "float32", "int8": "int8"}[variant]
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    generator = ctranslate2.Generator(
        str(model_dir), device="cpu", compute_type=compute_type, intra_threads=threads
    )
    vocabulary = _ct2_vocabulary(model_dir)

    def tokens(ids):
        return [[vocabulary[i] for i in row] for row in ids.tolist()]

    if task == "load":
        generator.forward_batch([[vocabulary[5]]])
        return {"seconds": time.perf_counter() - start}
    if task.startswith("prefill"):
        batch, length = (int(x) for x in task.split("-")[1].split("x"))
        prompt = tokens(_prompt(batch, length))

        def run():
            generator.generate_batch(
                prompt, max_length=1, sampling_topk=1, include_prompt_in_result=False
            )

    else:
        batch = int(task.split("-")[1])
        prompt = tokens(_prompt(batch, PROMPT))

        def run():
            out = generator.generate_batch(prompt, max_length=NEW_TOKENS, min_length=NEW_TOKENS, sampling_topk=1,
                                           include_prompt_in_result=False)  # fmt: skip
            assert all(len(r.sequences_ids[0]) == NEW_TOKENS for r in out)

    run()  # warm-up
    return _timed(run, reps)


def _time_flax(task: str, folder: Path, reps: int) -> dict:
    """Flax: every call is jitted; the first call of each shape compiles, reported as `compile_seconds`."""
    import jax.numpy as jnp

    from bloomlm import FlaxBloomForCausalLM

    start = time.perf_counter()
    model = FlaxBloomForCausalLM.from_pretrained(folder)
    if task == "load":
        model(jnp.asarray([[5]])).logits.block_until_ready()
        return {"seconds": time.perf_counter() - start}
    if task.startswith("prefill"):
        batch, length = (int(x) for x in task.split("-")[1].split("x"))
        ids = jnp.asarray(_prompt(batch, length))

        def run():
            model(ids).logits.block_until_ready()

    else:
        batch = int(task.split("-")[1])
        ids = jnp.asarray(_prompt(batch, PROMPT))

        def run():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=3)
            assert out.sequences.block_until_ready().shape == (batch, PROMPT + NEW_TOKENS)

    t0 = time.perf_counter()
    run()  # compiles
    first = time.perf_counter() - t0
    result = _timed(run, reps)
    return {**result, "compile_seconds": first - result["seconds"]}


def _ct2_vocabulary(model_dir: Path) -> list[str]:
    for name in ("vocabulary.json", "vocabulary.txt"):
        path = model_dir / name
        if path.exists():
            text = path.read_text(encoding="utf-8")
            return json.loads(text) if name.endswith(".json") else text.splitlines()
    raise FileNotFoundError(f"no vocabulary in {model_dir}")


def worker(system: str, variant: str, task: str, folder: Path, reps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if system == "ctranslate2":
        result = _time_ctranslate2(variant, task, folder, reps)
    elif system == "flax":
        result = _time_flax(task, folder, reps)
    else:
        result = _time_torch(system, variant, task, folder, reps)
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def run_one(system, variant, task, folder, reps, threads) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        system,
        variant,
        task,
        str(folder),
        str(reps),
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  {system} {variant} {task}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def weight_bytes(folder: Path, variant: str) -> int:
    """Bytes batch-1 decode reads per token: every weight once (the tied LM head is the embedding)."""
    from bloomlm import BloomConfig

    config = BloomConfig.from_pretrained(folder)
    h, v, n = config.hidden_size, config.vocab_size, config.n_layer
    linear = n * 12 * h * h  # qkv 3h*h, dense h*h, mlp 8h*h
    small = n * (13 * h) + 4 * h  # biases and LayerNorms
    per_weight = {"fp32": 4, "bf16": 2, "int8": 1}[variant]
    embedding_bytes = v * h * (1 if variant == "int8" else per_weight)
    return linear * per_weight + embedding_bytes + small * 4


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shape, one round, one repetition"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="560m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions inside each process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bloomlm-bench"))
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--systems", default=",".join(f"{s}:{v}" for s, v in SYSTEMS))
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        system, variant, task, folder, reps, threads = args.worker
        worker(system, variant, task, Path(folder), int(reps), int(threads))
        return
    if args.quick:
        args.shape, args.rounds, args.reps = "tiny", 1, 1
    folder = args.work_dir / f"bloom-{args.shape}"
    make_checkpoint(args.shape, folder)
    systems = [tuple(item.split(":")) for item in args.systems.split(",")]
    available = []
    for system, variant in systems:
        if system == "ctranslate2":
            quant = {"fp32": "float32", "int8": "int8"}[variant]
            try:
                ok = convert_ctranslate2(
                    folder, folder.parent / f"{folder.name}-ct2-{variant}", quant
                )
            except subprocess.CalledProcessError as err:
                print(f"CTranslate2 conversion failed: {err.stderr[-500:]}", file=sys.stderr)
                ok = False
            if not ok:
                continue
        if (system == "transformers" and _missing("transformers")) or (
            system == "flax" and _missing("flax")
        ):
            continue
        available.append((system, variant))
    bandwidth = memory_bandwidth(args.threads)

    raw = []
    for round_index in range(args.rounds):
        for system, variant in available:
            for task in TASKS:
                result = run_one(system, variant, task, folder, args.reps, args.threads)
                print(
                    f"round {round_index} {system:12s} {variant:5s} {task:14s} {result}", flush=True
                )
                raw.append(
                    {
                        "round": round_index,
                        "system": system,
                        "variant": variant,
                        "task": task,
                        **(result or {}),
                    }
                )
    report = render(raw, available, folder, bandwidth, args)
    if not args.quick:
        args.out.write_text(report)
        (args.out.with_suffix(".json")).write_text(json.dumps(raw, indent=1))
    print(report)


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def render(raw: list[dict], systems, folder: Path, bandwidth: float, args) -> str:
    def median(system, variant, task, key="seconds"):
        values = [
            r[key]
            for r in raw
            if (r["system"], r["variant"], r["task"]) == (system, variant, task) and key in r
        ]
        return statistics.median(values) if values else None

    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    lines = [
        "| system | load → first forward (s) | prefill 1×128 (ms) | prefill 8×128 (ms) | decode b1 (tok/s) "
        "| b1 ceiling (tok/s) | % of ceiling | decode b8 (tok/s) | peak RSS decode b1 (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system, variant in systems:
        load = median(system, variant, "load")
        p1, p8 = median(system, variant, "prefill-1x128"), median(system, variant, "prefill-8x128")
        d1, d8 = median(system, variant, "decode-1"), median(system, variant, "decode-8")
        tps1 = NEW_TOKENS / d1 if d1 else None
        tps8 = 8 * NEW_TOKENS / d8 if d8 else None
        ceiling = bandwidth * 1e9 / weight_bytes(folder, variant)
        rss = median(system, variant, "decode-1", "peak_rss_mb")
        lines.append(
            f"| {system} {variant} | {fmt(load, '.2f')} "
            f"| {fmt(p1 and p1 * 1e3, '.0f')} | {fmt(p8 and p8 * 1e3, '.0f')} "
            f"| {fmt(tps1, '.1f')} | {ceiling:.1f} | {fmt(tps1 and 100 * tps1 / ceiling, '.0f')} | {fmt(tps8, '.1f')} "
            f"| {fmt(rss, '.0f')} |"
        )
    compile_rows = []
    for system, variant in systems:
        for task in TASKS[1:]:
            value = median(system, variant, task, "compile_seconds")
            if value is not None:
                compile_rows.append(f"{system} {variant} {task}: {value:.1f} s")
    if compile_rows:
        note = "JAX compile time (first call minus a compiled call; not in the table): "
        lines += ["", note + "; ".join(compile_rows)]
    versions = _versions()
    header = [
        "# Benchmark results",
        "",
        f"Command: `python benchmarks/bench.py --shape {args.shape} --rounds {args.rounds} --reps {args.reps} "
        f"--threads {args.threads}`",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; "
        f"measured read bandwidth {bandwidth:.1f} GB/s",
        f"Versions: {versions}",
        f"Shape: {args.shape} ({SHAPES[args.shape]}), random weights; medians over {args.rounds} rounds, "
        f"each a fresh process per (system, task) timing {args.reps} repetitions after a warm-up.",
        "Raw per-run numbers: `RESULTS.json` beside this file.",
        "",
    ]
    return "\n".join(header + lines) + "\n"


def _versions() -> str:
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "bloomlm", "transformers", "ctranslate2", "jax", "flax"):
        try:
            parts.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(parts)


if __name__ == "__main__":
    main()

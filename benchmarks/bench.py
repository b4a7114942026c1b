"""CPU inference benchmark: every bloomlm mode against transformers 4.37.2 and CTranslate2, one run.

    python benchmarks/bench.py                # bloom-560m shape, 3 rounds: RESULTS.md/.json, README
    python benchmarks/bench.py --quick        # tiny shape, 1 round (what the test suite runs)
    python benchmarks/bench.py --only bloomlm-int8,ctranslate2 --rounds 5   # a partial rerun
    python benchmarks/bench.py --render       # RESULTS.md and README again from RESULTS.json

Systems (rows): bloomlm fp32 eager, fp32 compiled (`from_pretrained(compile=True)`), fp16, int8
(W8A8), int8-weight-only (`quantize=` each) and bf16; transformers 4.37 fp32; CTranslate2 fp32 and
int8 (converted from the same checkpoint); bloomlm's Flax model in fp32. Every figure but load comes
from the call a user makes, greedy: `generate` (bloomlm, transformers, Flax) or CTranslate2's
`Generator.generate_batch` / `generate_tokens`. Tasks:
  load          from_pretrained (CTranslate2: Generator) plus one forward of one token, after
                imports; the peak RSS is that process's
  prefill-BxT   generate(B x T prompt, max_new_tokens=1): the prompt's forward and the first token
  ttft-1x128    time to first token: generate(1 x 128 prompt, max_new_tokens=8) with a streamer,
                from the call to the streamer's receiving the first new token (CTranslate2: the
                first step `generate_tokens` yields); Flax's generate has no streamer: not measured
  decode-B      generate(B x 32 prompt, 32 new tokens, min_new_tokens=32); tokens/s = B * 32 over
                the whole call, prefill included
Each process makes one untimed warm-up call per task first (its seconds are kept as
`warmup_seconds`); the compiled row compiles its decode step in that call (the engine's logged
compile seconds are kept as `compile_seconds`), Flax compiles its jitted generate there. Load runs
in a fresh process per (system, round), and so does each timed task (`--process-per system` runs
the timed tasks of a round after load in that process, resetting the peak-RSS mark between tasks;
--quick does). Figures are medians over rounds of each process's median over `--reps` calls.

Every child process gets the same OpenMP environment (thread count, wait policy, binding), set
explicitly and checked in each child after its run; the table states it. bloomlm.torch would
otherwise set OMP_WAIT_POLICY=PASSIVE for its own process only (src/bloomlm/torch/__init__.py).
The machine's read bandwidth is measured in a child too: bandwidth / the bytes of weights one
batch-1 step reads is a ceiling on batch-1 tokens/s, shown as "% of b1 ceiling".
Needs the test extra (transformers) and ctranslate2; missing systems are skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
FIXTURE_TOKENIZER = HERE.parent / "tests" / "fixtures" / "bloom-style-tokenizer"
SHAPES = {
    "560m": dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "tiny": dict(vocab_size=1024, hidden_size=64, n_layer=2, n_head=4),
}
# name -> (family, variant); the order is the table's.
SYSTEMS = {
    "bloomlm-fp32": ("bloomlm", "fp32"),
    "bloomlm-fp32-compiled": ("bloomlm", "fp32-compiled"),
    "bloomlm-fp16": ("bloomlm", "fp16"),
    "bloomlm-int8": ("bloomlm", "int8"),
    "bloomlm-int8-weight-only": ("bloomlm", "int8-weight-only"),
    "bloomlm-bf16": ("bloomlm", "bf16"),
    "transformers-fp32": ("transformers", "fp32"),
    "ctranslate2-fp32": ("ctranslate2", "fp32"),
    "ctranslate2-int8": ("ctranslate2", "int8"),
    "flax-fp32": ("flax", "fp32"),
}
# task -> (batch, prompt length, new tokens)
TASKS = {
    "load": (1, 1, 0),
    "prefill-1x128": (1, 128, 1),
    "prefill-8x128": (8, 128, 1),
    "ttft-1x128": (1, 128, 8),
    "decode-1": (1, 32, 32),
    "decode-8": (8, 32, 32),
}
BYTES_PER_WEIGHT = {"fp32": 4, "fp32-compiled": 4, "bf16": 2, "fp16": 2, "int8": 1,
                    "int8-weight-only": 1}  # fmt: skip
CT2_COMPUTE = {"fp32": "float32", "int8": "int8"}
PAD = 3
RESULT = "RESULT "
NOTES_START, NOTES_END = "<!-- why-not:start -->", "<!-- why-not:end -->"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
FORMAT = 2  # RESULTS.json layout; older files are not merged into

# The issue's targets (560m shape, same run, through generate). `faster`: reference seconds /
# system seconds >= needed; `at-most`: system value / reference value <= needed.
BLOOMLM_MODES = [name for name in SYSTEMS if name.startswith("bloomlm-")]
TARGETS = [
    ("int8-decode-b1", "bloomlm-int8", "decode-1", "ctranslate2-int8", "faster", 1.2),
    ("int8-decode-b8", "bloomlm-int8", "decode-8", "ctranslate2-int8", "faster", 1.2),
    ("int8-prefill-1x128", "bloomlm-int8", "prefill-1x128", "ctranslate2-int8", "faster", 1.0),
    ("int8-prefill-8x128", "bloomlm-int8", "prefill-8x128", "ctranslate2-int8", "faster", 1.0),
    ("fp32-compiled-decode-b1", "bloomlm-fp32-compiled", "decode-1", "ctranslate2-fp32", "faster",
     1.0),
    ("fp32-compiled-decode-b8-vs-transformers", "bloomlm-fp32-compiled", "decode-8",
     "transformers-fp32", "faster", 2.0),
    ("fp32-compiled-decode-b8-vs-ct2", "bloomlm-fp32-compiled", "decode-8", "ctranslate2-fp32",
     "faster", 1.1),
    ("ttft-1x128", "bloomlm-fp32", "ttft-1x128", "transformers-fp32", "at-most", 0.6),
    *[(f"load-{n[8:]}", n, "load", "transformers-fp32", "faster", 3.0) for n in BLOOMLM_MODES],
    *[(f"rss-{n[8:]}", n, "load", "transformers-fp32", "at-most", 0.6) for n in BLOOMLM_MODES],
]  # fmt: skip
OTHER_TARGETS = [
    ("int8-greedy-agreement", "int8 greedy agreement with fp32 >= 90% on the trained embedded "
     "model: measured by benchmarks/quality.py, see benchmarks/QUALITY.md"),
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Setup: checkpoint, conversions, machine
# --------------------------------------------------------------------------------------------------


def make_checkpoint(shape: str, folder: Path) -> None:
    """A random BLOOM of a real shape, saved by bloomlm (transformers reads it), and a tokenizer."""
    import torch

    from bloomlm import BloomConfig, BloomForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    config = BloomConfig(**SHAPES[shape], pad_token_id=PAD)
    model = BloomForCausalLM(config)  # initialised as transformers does: N(0, 0.02), zero biases
    model.save_pretrained(folder)
    for item in FIXTURE_TOKENIZER.iterdir():  # CTranslate2's converter wants a tokenizer
        shutil.copy(item, folder / item.name)


def convert_ctranslate2(folder: Path, variant: str) -> bool:
    out = _ct2_dir(folder, variant)
    if out.exists():
        return True
    converter = shutil.which("ct2-transformers-converter", path=str(Path(sys.executable).parent))
    if converter is None:
        return False
    cmd = [converter, "--model", str(folder), "--output_dir", str(out),
           "--quantization", CT2_COMPUTE[variant]]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        print(f"CTranslate2 conversion failed: {err.stderr[-500:]}", file=sys.stderr)
        return False
    return True


def _ct2_dir(folder: Path, variant: str) -> Path:
    return folder.parent / f"{folder.name}-ct2-{variant}"


def cpu_info() -> dict:
    """What kind of CPU this is: torch's kernel capability and the flags that pick kernels."""
    import torch

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    wanted = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "avx2", "fma")  # fmt: skip
    kind = next((k for f, k in [("amx_tile", "AMX"), ("avx512f", "AVX512"), ("avx2", "AVX2")]
                 if f in flags), platform.machine())  # fmt: skip
    return {
        "model": model.group(1).strip() if model else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "kind": kind,
        "flags": [f for f in wanted if f in flags],
    }


def openmp_settings(threads: int, wait_policy: str, proc_bind: str) -> dict[str, str]:
    """The OpenMP environment every child gets (torch, MKL and CTranslate2 all use GNU libgomp)."""
    settings = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "OMP_WAIT_POLICY": wait_policy, "OMP_PROC_BIND": proc_bind}  # fmt: skip
    if proc_bind != "false":
        settings["OMP_PLACES"] = "cores"
    return settings


def child_env(settings: dict[str, str]) -> dict[str, str]:
    # Inherited OpenMP/MKL variables are dropped so that no child sees more than `settings`.
    prefixes = ("OMP_", "GOMP_", "KMP_", "MKL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return {**env, **settings}


def memory_bandwidth() -> float:
    """Read bandwidth in GB/s over 1 GiB: the best of a plain sum and of a matrix-vector product
    (the operation batch-1 decoding is made of), several tries each."""
    import torch

    data = torch.ones(2**28, dtype=torch.float32)
    matrix, vector = data.view(2**14, 2**14), torch.ones(2**14)
    best = float("inf")
    for read in (data.sum, lambda: torch.mv(matrix, vector)):
        for _ in range(5):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


# --------------------------------------------------------------------------------------------------
# Workers: one system per process, one or more tasks
# --------------------------------------------------------------------------------------------------


def _prompt(batch: int, length: int, vocab: int = 1024):
    import numpy as np

    return np.random.default_rng(0).integers(4, vocab, size=(batch, length))


class _FirstTokenClock:
    """A streamer (transformers' put/end protocol) that notes when the first new token arrives:
    `generate` puts the prompt first, then each new token."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class TorchRunner:
    """bloomlm (every mode) and transformers, through their `generate`."""

    streams = True

    def __init__(self, family: str, variant: str, folder: Path, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.family, self.variant, self.folder, self.model = family, variant, folder, None

    def load(self) -> None:
        import torch

        if self.family == "transformers":
            from transformers import BloomForCausalLM

            self.model = BloomForCausalLM.from_pretrained(self.folder, torch_dtype=torch.float32)
            return
        from bloomlm import BloomForCausalLM

        options = {
            "fp32": dict(torch_dtype=torch.float32),
            "fp32-compiled": dict(torch_dtype=torch.float32, compile=True),
            "bf16": dict(torch_dtype=torch.bfloat16),
        }.get(self.variant, dict(quantize=self.variant))
        self.model = BloomForCausalLM.from_pretrained(self.folder, **options)

    def forward_one(self) -> None:
        import torch

        with torch.no_grad():
            self.model(torch.tensor([[5]]))

    def _generate(self, prompt, new: int, streamer=None):
        import torch

        ids = torch.from_numpy(prompt)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=PAD,
                                  streamer=streamer)  # fmt: skip
        if tuple(out.shape) != (prompt.shape[0], prompt.shape[1] + new):
            raise RuntimeError(f"generate returned {tuple(out.shape)}; expected {new} new tokens")

    def generate(self, prompt, new: int) -> float:
        start = time.perf_counter()
        self._generate(prompt, new)
        return time.perf_counter() - start

    def ttft(self, prompt, new: int) -> float:
        clock, start = _FirstTokenClock(), time.perf_counter()
        self._generate(prompt, new, streamer=clock)
        return clock.first - start

    def extra(self) -> dict:
        if self.variant != "fp32-compiled":
            return {}
        import torch

        # Proof that the compiled step ran: the graphs dynamo built in this process.
        return {"compiled_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}


class CTranslate2Runner:
    """CTranslate2's Generator on the converted checkpoint, greedy (sampling_topk=1)."""

    streams = True

    def __init__(self, family: str, variant: str, folder: Path, threads: int):
        self.variant, self.folder, self.threads, self.generator = variant, folder, threads, None

    def load(self) -> None:
        import ctranslate2

        model_dir = _ct2_dir(self.folder, self.variant)
        self.generator = ctranslate2.Generator(str(model_dir), device="cpu",
                                               compute_type=CT2_COMPUTE[self.variant],
                                               intra_threads=self.threads)  # fmt: skip
        self.vocabulary = _ct2_vocabulary(model_dir)

    def _tokens(self, prompt) -> list[list[str]]:
        return [[self.vocabulary[i] for i in row] for row in prompt.tolist()]

    def forward_one(self) -> None:
        self.generator.forward_batch([[self.vocabulary[5]]])

    def generate(self, prompt, new: int) -> float:
        tokens = self._tokens(prompt)
        start = time.perf_counter()
        out = self.generator.generate_batch(
            tokens, max_length=new, min_length=new, sampling_topk=1, include_prompt_in_result=False
        )
        seconds = time.perf_counter() - start
        if not all(len(r.sequences_ids[0]) == new for r in out):
            raise RuntimeError(f"generate_batch did not return {new} new tokens per row")
        return seconds

    def ttft(self, prompt, new: int) -> float:
        (tokens,) = self._tokens(prompt)
        start, first, steps = time.perf_counter(), None, 0
        for _ in self.generator.generate_tokens(tokens, max_length=new, min_length=new,
                                                sampling_topk=1):  # fmt: skip
            first = first or time.perf_counter()
            steps += 1
        if steps != new:
            raise RuntimeError(f"generate_tokens yielded {steps} tokens; expected {new}")
        return first - start

    def extra(self) -> dict:
        return {}


class FlaxRunner:
    """bloomlm's Flax model through its jitted `generate` (no streamer: no TTFT)."""

    streams = False

    def __init__(self, family: str, variant: str, folder: Path, threads: int):
        self.folder, self.model = folder, None

    def load(self) -> None:
        from bloomlm import FlaxBloomForCausalLM

        self.model = FlaxBloomForCausalLM.from_pretrained(self.folder)

    def forward_one(self) -> None:
        import jax.numpy as jnp

        self.model(jnp.asarray([[5]])).logits.block_until_ready()

    def generate(self, prompt, new: int) -> float:
        import jax.numpy as jnp

        ids = jnp.asarray(prompt)
        start = time.perf_counter()
        out = self.model.generate(ids, max_new_tokens=new, eos_token_id=None, pad_token_id=PAD)
        shape = out.sequences.block_until_ready().shape
        seconds = time.perf_counter() - start
        if tuple(shape) != (prompt.shape[0], prompt.shape[1] + new):
            raise RuntimeError(f"generate returned {tuple(shape)}; expected {new} new tokens")
        return seconds

    def extra(self) -> dict:
        return {}


RUNNERS = {"bloomlm": TorchRunner, "transformers": TorchRunner,
           "ctranslate2": CTranslate2Runner, "flax": FlaxRunner}  # fmt: skip


def _ct2_vocabulary(model_dir: Path) -> list[str]:
    for name in ("vocabulary.json", "vocabulary.txt"):
        path = model_dir / name
        if path.exists():
            text = path.read_text(encoding="utf-8")
            return json.loads(text) if name.endswith(".json") else text.splitlines()
    raise FileNotFoundError(f"no vocabulary in {model_dir}")


def _peak_rss_mb() -> float:
    # VmHWM is this process image's own high-water mark; getrusage's ru_maxrss would also count the
    # parent's peak, which a child inherits across fork and exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Lower VmHWM to the current RSS (Linux >= 4.0), so a task's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _CompileLog(logging.Handler):
    """Collects the engine's "compiled the decode step ... in %.1f s" records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("compiled the decode step"):
            self.seconds.append(float(record.args[-1]))


def _time_task(runner, task: str, reps: int) -> dict:
    batch, length, new = TASKS[task]
    prompt = _prompt(batch, length)
    if task.startswith("ttft"):
        if not runner.streams:
            return {"skipped": "no streamer in this system's generate"}

        def run() -> float:
            return runner.ttft(prompt, new)

    else:

        def run() -> float:
            return runner.generate(prompt, new)

    compile_log = _CompileLog()
    engine_logger = logging.getLogger("bloomlm.torch.engine")
    engine_logger.addHandler(compile_log)
    engine_logger.setLevel(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        run()  # warm-up: compiles where a system compiles
        warmup = time.perf_counter() - start
    engine_logger.removeHandler(compile_log)
    times = [run() for _ in range(reps)]
    result = {"seconds": statistics.median(times), "all": times, "warmup_seconds": warmup}
    if compile_log.seconds:
        result["compile_seconds"] = sum(compile_log.seconds)
    failed = [str(w.message) for w in caught if "compiled decode step is unavailable" in
              str(w.message)]  # fmt: skip
    if failed:
        result["compile_failed"] = failed[0]
    return result


def worker(system: str, tasks: list[str], folder: Path, reps: int, threads: int) -> None:
    """Runs `tasks` of `system` in this process and prints one RESULT line per task."""
    if system == "bandwidth":
        print(RESULT + json.dumps({"task": "bandwidth", "gbs": memory_bandwidth()}), flush=True)
        return
    family, variant = SYSTEMS[system]
    runner = RUNNERS[family](family, variant, folder, threads)
    loaded = False
    for index, task in enumerate(tasks):
        reset = index > 0 and _reset_peak_rss()
        if task == "load":
            if loaded:
                raise ValueError("load must be the first task of its process")
            start = time.perf_counter()
            runner.load()
            runner.forward_one()
            result = {"seconds": time.perf_counter() - start}
            loaded = True
        else:
            if not loaded:
                runner.load()
                loaded = True
            result = _time_task(runner, task, reps)
        result.update(runner.extra())
        result.update(task=task, peak_rss_mb=_peak_rss_mb(), peak_rss_reset=reset,
                      omp={k: os.environ.get(k) for k in sorted(os.environ)
                           if k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_"))})  # fmt: skip
        if family == "flax" and "warmup_seconds" in result:  # jit compiles in the warm-up call
            result["compile_seconds"] = result["warmup_seconds"] - result["seconds"]
        print(RESULT + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_worker(system: str, tasks: list[str], folder: Path, args, env: dict) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", system, ",".join(tasks), str(folder),
           str(args.reps), str(args.threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    results = [json.loads(line[len(RESULT) :]) for line in proc.stdout.splitlines()
               if line.startswith(RESULT)]  # fmt: skip
    if proc.returncode != 0 or len(results) < len(tasks):
        done = {r["task"] for r in results}
        print(f"  {system} {[t for t in tasks if t not in done]}: failed\n{proc.stderr[-2000:]}",
              file=sys.stderr)  # fmt: skip
    return results


def select_systems(only: str | None) -> list[str]:
    """`--only` names: a system (bloomlm-int8) or a family (ctranslate2: all of its rows)."""
    if not only:
        return list(SYSTEMS)
    chosen = []
    for name in (n.strip() for n in only.split(",") if n.strip()):
        matches = [s for s in SYSTEMS if s == name or SYSTEMS[s][0] == name]
        if not matches:
            allowed = ", ".join([*SYSTEMS, "bloomlm", "transformers", "ctranslate2", "flax"])
            raise SystemExit(f"--only: unknown system {name!r}; allowed: {allowed}")
        chosen += [s for s in matches if s not in chosen]
    return [s for s in SYSTEMS if s in chosen]


def select_tasks(tasks: str | None) -> list[str]:
    if not tasks:
        return list(TASKS)
    chosen = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; allowed: {', '.join(TASKS)}")
    return [t for t in TASKS if t in chosen]


def available(systems: list[str], folder: Path) -> list[str]:
    import importlib.util

    kept = []
    for system in systems:
        family, variant = SYSTEMS[system]
        module = {"transformers": "transformers", "flax": "flax", "ctranslate2": "ctranslate2"}
        if family in module and importlib.util.find_spec(module[family]) is None:
            print(f"skipping {system}: {module[family]} is not installed", file=sys.stderr)
            continue
        if family == "ctranslate2" and not convert_ctranslate2(folder, variant):
            print(f"skipping {system}: no CTranslate2 conversion", file=sys.stderr)
            continue
        kept.append(system)
    return kept


def measure(args, systems: list[str], tasks: list[str], folder: Path) -> tuple[dict, list[dict]]:
    settings = openmp_settings(args.threads, args.omp_wait_policy, args.omp_proc_bind)
    env = child_env(settings)
    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = {
        "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
        "started": run_id,
        "loadavg_start": list(os.getloadavg()),
        "cpu": cpu_info(),
        "openmp": settings,
        "threads": args.threads,
        "rounds": args.rounds,
        "reps": args.reps,
        "process_per": args.process_per,
        "versions": _versions(),
    }
    bandwidth = run_worker("bandwidth", ["bandwidth"], folder, args, env)
    meta["bandwidth_gbs"] = bandwidth[0]["gbs"] if bandwidth else None
    # Load is always the first task of a fresh process; with --process-per system the timed tasks
    # follow it in the same process.
    groups = [tasks] if args.process_per == "system" else [[t] for t in tasks]
    records, failed = [], []
    started = time.perf_counter()
    for round_index in range(args.rounds):
        for system in systems:
            for group in groups:
                results = run_worker(system, group, folder, args, env)
                done = {r["task"] for r in results}
                failed += [f"{system} {t} round {round_index}" for t in group if t not in done]
                for result in results:
                    record = {"run": run_id, "round": round_index, "system": system, **result}
                    if record.get("omp") != settings:
                        record["omp_mismatch"] = True
                    records.append(record)
                    print(f"round {round_index} {system:24s} {_brief(result)}", flush=True)
    meta["loadavg_end"] = list(os.getloadavg())
    meta["wall_seconds"] = time.perf_counter() - started
    meta["failed"] = failed
    return meta, records


def _brief(result: dict) -> str:
    keys = ("seconds", "warmup_seconds", "compile_seconds", "peak_rss_mb", "skipped")
    parts = [f"{k}={result[k]:.3f}" if isinstance(result[k], float) else f"{k}={result[k]}"
             for k in keys if k in result]  # fmt: skip
    return f"{result['task']:14s} " + " ".join(parts)


def merge(previous: dict | None, shape: str, meta: dict, records: list[dict], partial: bool):
    """This run's records, plus (on a partial rerun) the earlier records of other (system, task)."""
    data = {"format": FORMAT, "shape": shape, "runs": {}, "records": []}
    if partial and previous and previous.get("format") == FORMAT and previous["shape"] == shape:
        rerun = {(r["system"], r["task"]) for r in records}
        data["records"] = [r for r in previous["records"] if (r["system"], r["task"]) not in rerun]
        data["runs"] = previous["runs"]
    data["records"] += records
    data["runs"][meta["started"]] = meta
    used = {r["run"] for r in data["records"]} | {meta["started"]}
    data["runs"] = {k: v for k, v in data["runs"].items() if k in used}
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny shape, one round, one repetition, one process per system "
                        "(results under the work dir unless --out-dir)")  # fmt: skip
    parser.add_argument("--shape", choices=sorted(SHAPES), default="560m")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per figure")
    parser.add_argument("--reps", type=int, default=1, help="timed calls inside each process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"], default="PASSIVE")
    parser.add_argument("--omp-proc-bind", choices=["false", "close", "spread"], default="false")
    parser.add_argument("--process-per", choices=["task", "system"], default="task")
    parser.add_argument(
        "--only", help="systems or families, comma-separated: " + ", ".join(SYSTEMS)
    )
    parser.add_argument("--tasks", help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bloomlm-bench"))
    parser.add_argument("--out-dir", type=Path, help="RESULTS.md/.json (default: benchmarks/)")
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: RESULTS.md and README from RESULTS.json",
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        system, tasks, folder, reps, threads = args.worker
        worker(system, tasks.split(","), Path(folder), int(reps), int(threads))
        return
    if args.quick:
        args.shape, args.rounds, args.reps, args.process_per = "tiny", 1, 1, "system"
    out_dir = args.out_dir or (args.work_dir / "quick" if args.quick else HERE)
    json_path = out_dir / "RESULTS.json"
    previous = json.loads(json_path.read_text()) if json_path.exists() else None
    if args.render:
        if not previous or previous.get("format") != FORMAT:
            raise SystemExit(f"--render: {json_path} holds no results of this script's format")
        write(previous, out_dir)
        return
    if args.rounds < 1 or args.reps < 1:
        raise SystemExit("--rounds and --reps must be at least 1")
    systems, tasks = select_systems(args.only), select_tasks(args.tasks)
    folder = args.work_dir / f"bloom-{args.shape}"
    make_checkpoint(args.shape, folder)
    meta, records = measure(args, available(systems, folder), tasks, folder)
    partial = bool(args.only or args.tasks)
    write(merge(previous, args.shape, meta, records, partial), out_dir)
    if meta["failed"]:  # written and shown, but a run with failed tasks is not a success
        raise SystemExit(f"failed (stderr above): {'; '.join(meta['failed'])}")


def write(data: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "RESULTS.json").write_text(json.dumps(data, indent=1) + "\n")
    md_path = out_dir / "RESULTS.md"
    notes = _notes_section(md_path.read_text() if md_path.exists() else "")
    report, readme_block = render(data, notes)
    md_path.write_text(report)
    if out_dir.resolve() == HERE:
        replace_readme_block(MARK_START, MARK_END, readme_block)
    print(report)


def replace_readme_block(start: str, end: str, block: str) -> None:
    """README.md with `block` between its `start` and `end` markers (left alone without them)."""
    text = README.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        README.write_text(f"{head}{start}\n{block}{end}{rest.split(end, 1)[1]}")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _notes_section(text: str) -> str:
    """The hand-written why-not notes of RESULTS.md, kept when the file is rewritten."""
    if NOTES_START in text and NOTES_END in text:
        return text.split(NOTES_START, 1)[1].split(NOTES_END, 1)[0].strip("\n")
    return (
        "One line per missed target, ``- `target-id`: what was tried, what the profile showed, "
        "where the time goes``,\nfilled in after a run from its measurements; "
        "`python benchmarks/bench.py --render` copies each\ninto the targets table. This section "
        "is kept when the script rewrites the file."
    )


def _why_not(notes: str) -> dict[str, str]:
    return dict(re.findall(r"^- `([\w.-]+)`: (.+)$", notes, re.M))


def _median(records: list[dict], system: str, task: str, key: str = "seconds") -> float | None:
    values = [r[key] for r in records if (r["system"], r["task"]) == (system, task) and key in r]
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _tokens_per_s(seconds: float | None, task: str) -> float | None:
    batch, _, new = TASKS[task]
    return batch * new / seconds if seconds else None


def weight_bytes(shape: str, system: str) -> int:
    """Bytes batch-1 decode reads per token: every weight once (the tied LM head is the
    embedding)."""
    dims = SHAPES[shape]
    h, v, n = dims["hidden_size"], dims["vocab_size"], dims["n_layer"]
    per_weight = BYTES_PER_WEIGHT[SYSTEMS[system][1]]
    matrices = n * 12 * h * h + v * h  # qkv 3h*h, dense h*h, mlp 8h*h; embedding = LM head
    small = n * (13 * h) + 4 * h  # biases and LayerNorms, kept in float32
    return matrices * per_weight + small * 4


def render(data: dict, notes: str) -> tuple[str, str]:
    """RESULTS.md, and the block that goes between README's bench markers."""
    records, runs, shape = data["records"], data["runs"], data["shape"]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in records)]
    latest = runs[max(runs)]
    header = _header(data, systems)
    main_table = _main_table(records, systems, shape, latest.get("bandwidth_gbs"))
    targets = _targets_table(records, systems, _why_not(notes))
    compile_lines = _compile_lines(records, systems)
    ratios = []
    for reference in ("transformers-fp32", "ctranslate2-fp32", "ctranslate2-int8"):
        if reference in systems:
            ratios += ["", *_ratio_table(records, systems, reference)]
    report = [
        "# Benchmark results", "", *header, "", *main_table, "", *compile_lines,
        "", "## Ratios (same run)", "",
        "Speed: the reference's seconds / the row's (> 1: faster than the reference); peak RSS of"
        " the load process: the row's / the reference's (< 1: smaller).", *ratios,
        "", "## Targets (issue 10)", "", *targets,
        "", "## Why not: notes from the measurements", "", NOTES_START, notes, NOTES_END, "",
        "Raw per-process numbers: `RESULTS.json` beside this file.",
    ]  # fmt: skip
    block = [*header, "", *main_table, "", *compile_lines, "", *targets]
    return "\n".join(report) + "\n", "\n".join(block) + "\n"


def _header(data: dict, systems: list[str]) -> list[str]:
    runs, shape = data["runs"], data["shape"]
    latest = runs[max(runs)]
    cpu, omp = latest["cpu"], latest["openmp"]
    flags = " ".join(cpu["flags"]) or "none of AMX/AVX512/AVX2"
    omp_text = ", ".join(f"{k}={v}" for k, v in omp.items())
    lines = [
        f"Shape: {shape} ({SHAPES[shape]}), random weights. Command: `{latest['command']}`.",
        f"CPU: {cpu['model']}, {cpu['cpus']} CPUs, kind {cpu['kind']} (torch CPU capability "
        f"{cpu['torch_capability']}; flags: {flags}); read bandwidth "
        f"{_fmt(latest.get('bandwidth_gbs'), '.1f')} GB/s; load average at start "
        + " / ".join(f"{x:.2f}" for x in latest["loadavg_start"])
        + " (1 / 5 / 15 min), at end "
        + " / ".join(f"{x:.2f}" for x in latest.get("loadavg_end", []))
        + ".",
        f"OpenMP, the same in every system's process (set explicitly, checked after each run): "
        f"{omp_text}; torch.set_num_threads({latest['threads']}), CTranslate2 intra_threads="
        f"{latest['threads']}; Flax runs on XLA's own thread pool, which OpenMP does not govern.",
        f"Method: every timing is the call a user makes (`generate`; CTranslate2 `generate_batch`,"
        f" TTFT from `generate_tokens`), greedy, prefill included; medians of {latest['rounds']} "
        f"round(s) (a fresh process per {latest['process_per']} and round, {latest['reps']} timed "
        "call(s) each after one untimed warm-up call, whose time and any compile time are kept "
        "apart below). Prefill B×128: `max_new_tokens=1`. TTFT 1×128: time to the streamer's "
        "first new token of an 8-token `generate`. Decode bB: B×32 prompt, 32 new tokens, "
        "tokens/s = B·32 / the whole call. Load: from_pretrained + a one-token forward, after "
        "imports.",
        f"Versions: {latest['versions']}.",
    ]
    if any(r.get("omp_mismatch") for r in data["records"]):
        bad = sorted({r["system"] for r in data["records"] if r.get("omp_mismatch")})
        lines.append(f"**OpenMP settings differed from the above in: {', '.join(bad)}.**")
    failed = [f for run in runs.values() for f in run.get("failed", [])]
    if failed:
        lines.append(f"**Failed (no figure): {'; '.join(failed)}.**")
    if len(runs) > 1:
        by_run = {}
        for r in data["records"]:
            by_run.setdefault(r["run"], set()).add(r["system"])
        parts = [f"{run}: {', '.join(s for s in systems if s in by_run[run])}" for run in runs]
        lines.append("**Rows from more than one run** (ratios across runs are not same-run): "
                     + "; ".join(parts) + ".")  # fmt: skip
    return [f"- {line}" for line in lines]  # one bullet each: markdown joins bare lines


def _main_table(records: list[dict], systems: list[str], shape: str, bandwidth) -> list[str]:
    lines = [
        "| system | load (s) | load peak RSS (MB) | prefill 1×128 (ms) | prefill 8×128 (ms) "
        "| TTFT 1×128 (ms) | decode b1 (tok/s) | decode b8 (tok/s) | b1 % of ceiling "
        "| decode b1 peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system in systems:

        def ms(task: str, system: str = system) -> str:
            value = _median(records, system, task)
            if value is None and any(r["system"] == system and r["task"] == task and
                                     "skipped" in r for r in records):  # fmt: skip
                return "n/a"
            return _fmt(value and value * 1e3, ".0f")

        tps1 = _tokens_per_s(_median(records, system, "decode-1"), "decode-1")
        tps8 = _tokens_per_s(_median(records, system, "decode-8"), "decode-8")
        ceiling = None  # tokens/s as a share of bandwidth / the bytes one step reads
        if bandwidth and tps1:
            ceiling = 100 * tps1 / (bandwidth * 1e9 / weight_bytes(shape, system))
        compiled = " (compile failed: eager)" if any(
            r["system"] == system and "compile_failed" in r for r in records) else ""  # fmt: skip
        lines.append(
            f"| {system}{compiled} | {_fmt(_median(records, system, 'load'), '.2f')} "
            f"| {_fmt(_median(records, system, 'load', 'peak_rss_mb'), '.0f')} "
            f"| {ms('prefill-1x128')} | {ms('prefill-8x128')} | {ms('ttft-1x128')} "
            f"| {_fmt(tps1, '.1f')} | {_fmt(tps8, '.1f')} | {_fmt(ceiling, '.0f')} "
            f"| {_fmt(_median(records, system, 'decode-1', 'peak_rss_mb'), '.0f')} |"
        )
    return lines


def _compile_lines(records: list[dict], systems: list[str]) -> list[str]:
    """Compile and warm-up seconds, kept out of the timings: per task, by round."""
    lines = []
    for system in systems:
        parts = []
        for task in TASKS:
            rows = sorted((r for r in records if (r["system"], r["task"]) == (system, task)
                           and "compile_seconds" in r), key=lambda r: r["round"])  # fmt: skip
            if rows:
                graphs = [r.get("compiled_graphs") for r in rows]
                graph_text = f", graphs {graphs}" if any(g is not None for g in graphs) else ""
                seconds = ", ".join(f"{r['compile_seconds']:.1f}" for r in rows)
                parts.append(f"{task} {seconds} s{graph_text}")
        if parts:
            lines.append(
                f"- {system}: compile (warm-up call, untimed; by round) " + "; ".join(parts)
            )
    warm = []
    for system in systems:
        values = [r["warmup_seconds"] for r in records if r["system"] == system and
                  r["task"] == "decode-1" and "warmup_seconds" in r]  # fmt: skip
        if values:
            warm.append(f"{system} {statistics.median(values):.2f} s")
    if warm:
        lines.append("- Warm-up call of decode b1 (untimed, median): " + ", ".join(warm))
    return ["Compile and warm-up, not in the timings above:", "", *lines] if lines else []


def _ratio(records: list[dict], system: str, reference: str, task: str, kind: str, key: str):
    ours, theirs = _median(records, system, task, key), _median(records, reference, task, key)
    if not ours or not theirs:
        return None
    return theirs / ours if kind == "faster" else ours / theirs


def _ratio_table(records: list[dict], systems: list[str], reference: str) -> list[str]:
    speed_tasks = list(TASKS)
    lines = [
        f"vs {reference}:",
        "",
        "| system | " + " | ".join(speed_tasks) + " | load peak RSS |",
        "| --- |" + " ---: |" * (len(speed_tasks) + 1),
    ]
    for system in systems:
        if system == reference:
            continue
        cells = [_fmt(_ratio(records, system, reference, t, "faster", "seconds"), ".2f")
                 for t in speed_tasks]  # fmt: skip
        rss = _ratio(records, system, reference, "load", "at-most", "peak_rss_mb")
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {_fmt(rss, '.2f')} |")
    return lines


def _targets_table(records: list[dict], systems: list[str], why: dict[str, str]) -> list[str]:
    lines = [
        "| target | measured | needed | result | why not |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for target_id, system, task, reference, kind, needed in TARGETS:
        key = "peak_rss_mb" if target_id.startswith("rss-") else "seconds"
        value = _ratio(records, system, reference, task, kind, key)
        what = "peak RSS" if key == "peak_rss_mb" else task
        name = f"`{target_id}`: {system} {what} vs {reference}"
        if value is None:
            result, note = "not measured", "a system or task is missing from this run"
        else:
            met = value >= needed if kind == "faster" else value <= needed
            result = "met" if met else "**missed**"
            note = "" if met else why.get(target_id, "not analysed yet (add a note below)")
        sign = "≥" if kind == "faster" else "≤"
        lines.append(f"| {name} | {_fmt(value, '.2f')}× | {sign} {needed}× | {result} | {note} |")
    for target_id, text in OTHER_TARGETS:
        lines.append(f"| `{target_id}`: {text} | | | not in this script | |")
    return lines


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

"""The whole `bloomlm generate` command on an int8 folder against the float32 one it came from
(issue 12, item 30): process start to exit, as a user runs it.

    python benchmarks/cli_int8.py                 # bloom-560m shape, 3 rounds: CLI_INT8.md/.json
                                                  # and the table in README.md
    python benchmarks/cli_int8.py --quick --work-dir DIR   # tiny shape, 1 round (the test suite)

The int8 folder is what `bloomlm convert SRC DST --quantize int8` writes (model.int8.safetensors:
int8 weights and scales, loaded without re-quantizing). Commands, each a fresh process:

    fp32                  generate --model SRC
    int8                  generate --model DST              (the CLI picks the int8 kernel)
    int8 --quantize int8  generate --model DST --quantize int8              (W8A8 always)
    int8 weight-only      generate --model DST --quantize int8-weight-only
    fp32 --quantize int8  generate --model SRC --quantize int8   (quantized and packed at load)

each with `--seed 0 --ignore-eos --max-new-tokens N` (every run makes its N tokens) and the CLI's
own sampling defaults; one prompt, or 8 from a file (`--batch-size 8`). The commands of a round
run one after another for each run length, rounds repeat that, and each figure is the median over
rounds, so a machine that drifts slows every column alike. The OpenMP variables the caller has are
dropped: the CLI sets its own. Peak RSS is the child's `ru_maxrss` (the benchmark process that
forks it holds ~60 MB, below every figure here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench

HERE = Path(__file__).resolve().parent
README_MARKS = ("<!-- cli-int8:start -->", "<!-- cli-int8:end -->")
PROMPT = "Once upon a time, in a village by the sea,"
COMMANDS = {
    "fp32": ("fp32", []),
    "int8": ("int8", []),
    "int8 --quantize int8": ("int8", ["--quantize", "int8"]),
    "int8 weight-only": ("int8", ["--quantize", "int8-weight-only"]),
    "fp32 --quantize int8": ("fp32", ["--quantize", "int8"]),
}
# run name -> (prompts, new tokens)
RUNS = {"1 x 8": (1, 8), "1 x 40 (default)": (1, 40), "1 x 200": (1, 200), "8 x 40": (8, 40)}
QUICK_RUNS = {"1 x 8": (1, 8), "8 x 40": (8, 40)}


def folders(shape: str, work: Path) -> dict[str, Path]:
    """The float32 checkpoint (bench.py's random one of `shape`) and its `convert --quantize int8`
    copy, made once."""
    fp32, int8 = work / f"bloom-{shape}", work / f"bloom-{shape}-int8"
    bench.make_checkpoint(shape, fp32)
    if not (int8 / "config.json").exists():
        convert = [sys.executable, "-m", "bloomlm", "convert", str(fp32), str(int8)]
        subprocess.run([*convert, "--quantize", "int8"], check=True, capture_output=True)
    return {"fp32": fp32, "int8": int8}


def run_once(command: list[str], env: dict[str, str]) -> dict:
    """Wall seconds from start to exit, CPU seconds and peak RSS of one command."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert process.stderr is not None
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()[-2000:]}")
    notes = [line for line in stderr.decode().splitlines() if "int8 weights run" in line]
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "kernel_note": notes[0] if notes else None,
    }


def generate_command(folder: Path, extra: list[str], prompts: int, tokens: int, file: Path) -> list:
    command = [sys.executable, "-m", "bloomlm", "generate", "--model", str(folder), *extra]
    command += ["--seed", "0", "--ignore-eos", "--verbose", "--max-new-tokens", str(tokens)]
    if prompts == 1:
        return [*command, "--only-new", PROMPT]
    return [*command, "--batch-size", str(prompts), "--file", str(file)]


def measure(paths: dict[str, Path], runs: dict, rounds: int, work: Path) -> list[dict]:
    prompts_file = work / "prompts.txt"
    prompts_file.write_text("".join(f"{PROMPT} ({i})\n" for i in range(8)), encoding="utf-8")
    env = bench.child_env({})  # no inherited OpenMP/MKL variables: the CLI sets its own
    records = []
    for round_ in range(rounds):
        for run, (prompts, tokens) in runs.items():
            for name, (source, extra) in COMMANDS.items():
                command = generate_command(paths[source], extra, prompts, tokens, prompts_file)
                record = run_once(command, env)
                records.append({"round": round_, "run": run, "command": name, **record})
                print(f"round {round_} {run:<18} {name:<22} {record['seconds']:6.2f} s", flush=True)
    return records


def table(records: list[dict], runs: dict) -> str:
    """Median seconds per (run, command) and each command's ratio to fp32 (below 1: faster)."""

    def median(run: str, name: str, key: str = "seconds") -> float:
        return statistics.median(r[key] for r in records if (r["run"], r["command"]) == (run, name))

    head = "| run (prompts x new tokens) | " + " | ".join(COMMANDS) + " |"
    lines = [head, "| --- |" + " ---: |" * len(COMMANDS)]
    for run in runs:
        base = median(run, "fp32")
        cells = [f"{base:.2f} s"] + [
            f"{median(run, name):.2f} s ({median(run, name) / base:.2f}x)"
            for name in list(COMMANDS)[1:]
        ]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    peaks = [f"{median(run, n, 'peak_rss_mb'):.0f}" for run in list(runs)[:1] for n in COMMANDS]
    lines.append(f"| peak RSS, {list(runs)[0]} (MB) | " + " | ".join(peaks) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bloomlm-bench"))
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    shape, runs = ("tiny", QUICK_RUNS) if args.quick else ("560m", RUNS)
    rounds = 1 if args.quick else args.rounds
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = uptime()
    paths = folders(shape, args.work_dir)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as scratch:
        records = measure(paths, runs, rounds, Path(scratch))
    meta = {"shape": shape, "rounds": rounds, "cpu": bench.cpu_info(), "uptime_start": started,
            "uptime_end": uptime(), "python": platform.python_version()}  # fmt: skip
    out = args.out_dir / ("CLI_INT8-quick" if args.quick else "CLI_INT8")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    cpu = meta["cpu"]
    notes = sorted({f"- {r['run']}: {r['kernel_note']}" for r in records
                    if r["command"] == "int8" and r["kernel_note"]})  # fmt: skip
    out.with_suffix(".md").write_text(
        f"# `bloomlm generate`, int8 folder vs float32 ({shape} shape)\n\n"
        f"Written by `benchmarks/cli_int8.py` (its docstring says how). CPU: {cpu['model']}, "
        f"{cpu['cpus']} CPUs, kind {cpu['kind']} (torch capability {cpu['torch_capability']}). "
        f"Medians of {rounds} round(s), wall seconds from process start to exit, each command "
        f"against the fp32 command of the same run.\nLoad at start: {meta['uptime_start']}; at "
        f"end: {meta['uptime_end']}.\n\n{table(records, runs)}\n\nThe kernel the CLI chose for "
        "the int8 folder (`--verbose`):\n" + "\n".join(notes) + "\n"
    )
    print(out.with_suffix(".md").read_text())
    if not args.quick:
        bench.replace_readme_block(*README_MARKS, table(records, runs) + "\n")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()

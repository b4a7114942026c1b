"""How fast the `bloomlm` command starts (issue 12, item 29): median seconds of several runs.

    python scripts/startup_time.py [--runs 9] [--src DIR ...]

Measures `bloomlm --help` (process start to exit) and `bloomlm generate` on the embedded model
(process start to the first generated text on stdout: `--only-new`, greedy), and, as the floor
no command that uses torch can beat, `python -c "import torch"`. With several `--src`
folders (bloomlm source trees, e.g. before and after a change) the runs alternate between them, so
a machine shared with other work slows each the same. Prints `uptime` first and last. Not a test:
the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

GENERATE = ["generate", "--only-new", "--temperature", "0", "--max-new-tokens", "8", "Once upon a"]
ENTRY_POINT = "import sys; from bloomlm.cli import main; sys.exit(main())"


def first_output_seconds(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds from starting `command` to its first byte on stdout (or its exit), and the CPU
    seconds (user + system) the whole process used: on a machine shared with other work the
    CPU time varies much less than the wall clock."""
    start = time.perf_counter()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    ) as process:
        assert process.stdout is not None
        process.stdout.read(1)
        elapsed = time.perf_counter() - start
        process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed")
    return elapsed, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--src", action="append", help="a bloomlm source tree (repeatable)")
    args = parser.parse_args()
    sources = args.src or [""]
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{uptime}\npython {sys.version.split()[0]}")
    bloomlm = [sys.executable, "-c", ENTRY_POINT]
    # Bytecode caches allowed, as after `pip install` (which writes them): with
    # PYTHONDONTWRITEBYTECODE set, every edited module would be compiled again on each start.
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    environments = {src: {**base, "PYTHONPATH": src} if src else base for src in sources}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    floor = [sys.executable, "-c", "import torch; print(1)"]  # what no torch-using command beats
    for run in range(args.runs + 1):
        seconds = first_output_seconds(floor, base)
        if run:
            times.setdefault(("python -c 'import torch'", ""), []).append(seconds)
        for src, env in environments.items():
            for name, command in (("--help", ["--help"]), ("generate", GENERATE)):
                seconds = first_output_seconds(bloomlm + command, env)
                if run:  # the first round only warms the file cache
                    times.setdefault((src, name), []).append(seconds)
    for (src, name), values in times.items():
        what = f"{src or 'installed'} bloomlm {name}" if name else src
        wall, cpu = zip(*values)
        print(f"{what:<48} first output: median {statistics.median(wall):.3f} s"
              f" (min {min(wall):.3f}); CPU: median {statistics.median(cpu):.3f} s"
              f" ({len(values)} runs)")  # fmt: skip
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

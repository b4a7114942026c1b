"""The long kill campaign behind "a save is all or nothing": hundreds of SIGKILLs per writer.

    PYTHONPATH=src python benchmarks/kill_campaign.py               # 300 random kills per writer
    PYTHONPATH=src python benchmarks/kill_campaign.py --kills 20    # a quick look

For each writer of tests/kill_trials.py (PyTorch safetensors and .bin, single file and sharded, the
two-rename fallback, Flax msgpack, convert, finetune's best model and training state, the
tokenizer), one trial is stopped at every crash point of its save, then `--kills` trials are killed
by the parent after a random delay shorter than most saves take (tests/kill_trials.random_trials;
a kill that comes after the save finished counts as tried, not as SIGKILLed). After each kill the
folder
is loaded with bloomlm's loaders and every tensor compared: it must be exactly the old checkpoint or
exactly the new one (convert: no folder, or the new one); the same save then runs to the end, which
must give the new checkpoint and leave no bloomlm leftover. Trials fork this process, so each costs
milliseconds.

Trials save under `--dir` (default: a fresh folder in /dev/shm, else the system's temporary folder):
a SIGKILL leaves the page cache intact, so a RAM file system proves the same as a disk, without
the ~100 ms of fsyncs per save (the fsyncs are for power loss, which no process kill can test).
Writes benchmarks/KILL_CAMPAIGN.md (the printed table) and benchmarks/KILL_CAMPAIGN.json (every
trial).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import pathlib
import platform
import random
import shutil
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"


def _load_kill_trials():
    """tests/kill_trials.py, imported by its path (the tests folder is not a package)."""
    spec = importlib.util.spec_from_file_location("kill_trials", TESTS / "kill_trials.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_trials"] = module
    spec.loader.exec_module(module)
    return module


def _scratch(where: str | None) -> pathlib.Path:
    if where:
        path = pathlib.Path(where)
        path.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(tempfile.mkdtemp(prefix="bloomlm-kills-", dir=path))
    shm = pathlib.Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return pathlib.Path(tempfile.mkdtemp(prefix="bloomlm-kills-", dir=base))


def _summary(results) -> dict:
    loaded = collections.Counter(
        "failed" if r.loaded_as.startswith("FAILED") else r.loaded_as for r in results
    )
    return {
        "trials": len(results),
        "killed": sum(r.killed for r in results),
        "old": loaded["old"],
        "new": loaded["new"],
        "none": loaded["none"],
        "failed": loaded["failed"],
        "not_cleaned": sum(not r.leftovers_cleaned for r in results),
    }


def _table(rows: dict[str, dict]) -> str:
    header = (
        "| writer | crash points | random kills | SIGKILLed | loaded old | loaded new | no folder "
        "| mixed or broken | leftovers kept | seconds |"
    )
    lines = [header, "|" + " --- |" * 10]
    for name, row in rows.items():
        points, rand = row["points"], row["random"]
        killed = points["killed"] + rand["killed"]
        cells = [
            name, points["trials"], rand["trials"], killed,
            points["old"] + rand["old"], points["new"] + rand["new"],
            points["none"] + rand["none"], points["failed"] + rand["failed"],
            points["not_cleaned"] + rand["not_cleaned"], f"{row['seconds']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _json_text(raw: dict, trials: list[dict]) -> str:
    """`raw` indented, then "trials": one compact object per line (thousands of them)."""
    head = json.dumps(raw, indent=1)[:-2]  # without the closing "\n}"
    lines = ",\n".join("  " + json.dumps(trial, separators=(",", ":")) for trial in trials)
    return f'{head},\n "trials": [\n{lines}\n ]\n}}\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=300, help="random kills per writer")
    parser.add_argument("--dir", default=None, help="where trials save (default: /dev/shm)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--writers", nargs="*", default=None, help="a subset of the writers")
    parser.add_argument("--out", default=str(HERE / "KILL_CAMPAIGN"), help="output path stem")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # tiny models: threads only cost, and forks are cheaper without them
    kill_trials = _load_kill_trials()
    scratch = _scratch(args.dir)
    rng = random.Random(args.seed)
    rows, trials = {}, []
    start = time.perf_counter()
    try:
        ckpts = kill_trials.Checkpoints(scratch / "checkpoints")
        for name in args.writers or list(kill_trials.WRITERS):
            writer = kill_trials.WRITERS[name](ckpts)
            began = time.perf_counter()
            points = kill_trials.point_trials(writer, scratch)
            randoms = kill_trials.random_trials(writer, scratch, args.kills, rng)
            seconds = time.perf_counter() - began
            rows[name] = {
                "points": _summary(points),
                "random": _summary(randoms),
                "seconds": seconds,
            }
            trials += [vars(r) | {"seconds": round(r.seconds, 5)} for r in points + randoms]
            print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    total = time.perf_counter() - start
    table = _table(rows)
    broken = sum(row[kind]["failed"] + row[kind]["not_cleaned"] for row in rows.values()
                 for kind in ("points", "random"))  # fmt: skip
    verdict = (
        "every folder loaded as exactly the old or exactly the new checkpoint, and the next save "
        "left no leftover"
        if broken == 0
        else f"{broken} trial(s) broke the promise: see the JSON"
    )
    where = "RAM (/dev/shm)" if str(scratch).startswith("/dev/shm") else str(scratch.parent)
    text = (
        f"# Kill campaign\n\n`python benchmarks/kill_campaign.py --kills {args.kills}` on "
        f"{platform.platform()}, {os.cpu_count()} CPUs, trials saved in {where}; "
        f"{total / 60:.1f} min.\n\n{table}\n\nResult: {verdict}.\n"
    )
    print(text)
    pathlib.Path(args.out + ".md").write_text(text, encoding="utf-8")
    raw = {"kills_per_writer": args.kills, "seed": args.seed, "where": where, "seconds": total,
           "writers": rows}  # fmt: skip
    pathlib.Path(args.out + ".json").write_text(_json_text(raw, trials), encoding="utf-8")
    return 0 if broken == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

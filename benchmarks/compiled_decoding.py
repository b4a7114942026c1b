"""Eager vs compiled decoding through the public `generate` (the measurements behind the engine's
default compile mode and the CLI's `--compile auto`; README, "Compiled decoding").

    python benchmarks/compiled_decoding.py FOLDER [--modes eager,default,max-autotune-no-cudagraphs]
        [--batches 1,8] [--prompt 32] [--new 32] [--rounds 5] [--step-capacities 64,1024]

All modes run in one process and their timed rounds are interleaved (round r of every mode, then
round r + 1), so a busy machine's load falls on all of them alike. Each (mode, batch) is first
called once untimed: that call compiles (its seconds are reported as `first_call_s`, and the
engine logs the compile time on stderr). Prints one JSON line per (mode, batch): the median and
every round's seconds of `generate` (greedy, prefill included), tokens/s (new tokens over the
whole call), the machine's load average during the rounds, and a checksum of the generated ids
(equal across modes means equal ids). Then the prefill of a 1 x 128 prompt through `generate`,
and with `--step-capacities` the median compiled step (batch 1) at each cache capacity: a step
that copied the cache would grow with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch

from bloomlm import BloomForCausalLM


def _generate(
    model, ids: torch.Tensor, new: int, compile: bool | str
) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=3, compile=compile)  # fmt: skip
    return time.perf_counter() - start, out


def _step_seconds(model, mode: str, capacity: int, steps: int = 8) -> float:
    """Median seconds of one compiled step (batch 1) with the cache at `capacity` columns."""
    decoder = model.make_decoder(1, capacity, compile=mode)
    decoder.prefill(torch.randint(4, 1000, (1, capacity // 2 + 1)))
    token = torch.tensor([[5]])
    decoder.step(token)  # compiles for this capacity
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        decoder.step(token)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--modes", default="eager,default,max-autotune-no-cudagraphs")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step-capacities", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bloomlm.torch.engine").setLevel(logging.INFO)  # compile times, on stderr
    model = BloomForCausalLM.from_pretrained(args.folder)
    cases = [(mode, int(b)) for b in args.batches.split(",") for mode in args.modes.split(",")]
    prompts = {b: torch.randint(4, 1000, (b, args.prompt),
                                generator=torch.Generator().manual_seed(b))
               for _, b in cases}  # fmt: skip
    first, checksum, times = {}, {}, {case: [] for case in cases}
    for mode, b in cases:
        first[mode, b], out = _generate(model, prompts[b], args.new, mode != "eager" and mode)
        checksum[mode, b] = int(out.sum())
    load = []
    for _ in range(args.rounds):
        for mode, b in cases:
            times[mode, b].append(
                _generate(model, prompts[b], args.new, mode != "eager" and mode)[0]
            )
        load.append(os.getloadavg()[0])
    for mode, b in cases:
        median = statistics.median(times[mode, b])
        print(json.dumps({
            "mode": mode, "batch": b, "first_call_s": round(first[mode, b], 2),
            "median_s": round(median, 3), "rounds_s": [round(t, 3) for t in times[mode, b]],
            "tokens_per_s": round(b * args.new / median, 2), "ids_checksum": checksum[mode, b],
            "load_1min": [round(x, 1) for x in load], "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }), flush=True)  # fmt: skip
    long_prompt = torch.randint(4, 1000, (1, 128), generator=torch.Generator().manual_seed(1))
    prefill = [_generate(model, long_prompt, 1, False)[0] for _ in range(args.rounds)]
    print(json.dumps({"prefill_1x128_s": round(statistics.median(prefill), 3),
                      "rounds_s": [round(t, 3) for t in prefill]}), flush=True)  # fmt: skip
    for mode in args.modes.split(","):
        if mode != "eager" and args.step_capacities:
            steps = {c: round(_step_seconds(model, mode, int(c)), 4)
                     for c in args.step_capacities.split(",")}  # fmt: skip
            print(json.dumps({"mode": mode, "step_s_by_capacity": steps}), flush=True)


if __name__ == "__main__":
    main()

"""`bloomlm serve` under load: the continuous-batching server against one request at a time and
against one static `generate` batch (the issue's serving targets).

    python benchmarks/serve_bench.py                  # the full run: ~20-40 min on 2 cores
    python benchmarks/serve_bench.py --quick          # seconds: checks the script, not the targets
    python benchmarks/serve_bench.py --device cuda --dtypes bfloat16 --shape 1b7 \
        --out SERVING_CUDA_1B7                        # on a GPU: its own table, README untouched

--quick runs a tiny shape (2 layers, hidden 64, the tokenizer's 4096 ids) at 1 and 4 clients,
writing under --work-dir (default benchmarks/.cache) and leaving README.md and benchmarks/ alone.

Model: the bloom-560m shape (24 layers, hidden 1024, 16 heads, vocabulary 250880; `--shape 1b7`:
hidden 2048) with random weights, saved once under --work-dir with bloomlm-tiny's tokenizer
(prompts are token ids; generated ids outside its vocabulary decode to nothing, which changes no
count). Each dtype (float32; int8: `--quantize int8`, W8A8 on x86 CPUs; bfloat16 / float16 on a
GPU) gets its own `bloomlm serve` subprocess on 127.0.0.1 (`--device`: where the server and the
in-process references run; timers synchronise the device).

Load: closed loop. For each concurrency level C (1, 4, 16, 64) there are max(8, 2C) requests
with prompts of 16-256 random token ids and 32-128 new tokens (ignore_eos: exact counts); C
clients each stream one request at a time (`stream: true`) until none are left. Client k starts
k/C of a mean one-at-a-time request time in (the spread arrivals of the loop's steady state;
all C at once would measure C queued prefills, not the server). Per level: aggregate generated
tokens/s (all tokens over the level's wall time), time to first token p50/p99, inter-token
latency p50/p99 (gaps between a stream's chunks), the server's peak RSS (VmHWM, since it
started), and p99 over requests of TTFT divided by that prompt's prefill time alone (measured in
this process on the same weights, one prompt at a time, while the server is idle).

Baselines: (a) one request at a time: the same server at C = 1; (b) the best case: the first C
of the C = 16 level's prompts as one static left-padded `model.generate` batch of C rows in this
process, max_new_tokens = the longest request's, every row generating that many (tokens/s =
rows x max_new_tokens / seconds: more tokens than the requests asked for, so an upper bound).
Targets at C = 16: throughput >= 5x (a) and >= 0.8x (b); p99(TTFT / prefill alone) <= 3.

Writes benchmarks/SERVING.json (every number) and benchmarks/SERVING.md (the table), and puts the
table into README.md between the serve-bench markers (with `--out NAME`: benchmarks/NAME.json and
NAME.md only). Only loopback traffic; every loop bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import platform
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import bench
import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
SHAPES = {
    "560m": {"vocab_size": 250880, "hidden_size": 1024, "n_layer": 24, "n_head": 16},
    "1b7": {"vocab_size": 250880, "hidden_size": 2048, "n_layer": 24, "n_head": 16},
    "quick": {"vocab_size": 4096, "hidden_size": 64, "n_layer": 2, "n_head": 4},
}
MARK_START, MARK_END = "<!-- serve-bench:start -->", "<!-- serve-bench:end -->"
# Everything from this line on in SERVING.md is written by hand and kept when the file is rewritten.
NOTES_MARK = "<!-- notes: kept when serve_bench.py rewrites this file -->"
# The anchor row: `transformers serve` (continuous batching) needs transformers 5.x, which
# cannot share a venv with the 4.37.2 the tests check against.
TRANSFORMERS_SERVE = (
    "not run: `transformers serve` needs transformers 5.x, which cannot share this venv with the "
    "transformers 4.37.2 the tests use as their reference"
)


# --------------------------------------------------------------------------------------------------
# The model folder
# --------------------------------------------------------------------------------------------------


def model_folder(work_dir: pathlib.Path, shape: str, layers: int) -> pathlib.Path:
    """`shape` with random weights (`layers` of them), saved once under `work_dir`."""
    folder = work_dir / f"bloom-{shape}-shape-{layers}l-random"
    if (folder / "config.json").is_file():
        return folder
    import bloomlm

    torch.manual_seed(0)
    config = bloomlm.BloomConfig(**{**SHAPES[shape], "n_layer": layers}, bos_token_id=1,
                                 eos_token_id=2, pad_token_id=3)  # fmt: skip
    model = bloomlm.BloomForCausalLM(config).eval()
    model.save_pretrained(folder)
    tiny = pathlib.Path(bloomlm.__file__).parent / "assets" / "bloomlm-tiny"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny / name, folder / name)
    return folder


# --------------------------------------------------------------------------------------------------
# The server and its clients
# --------------------------------------------------------------------------------------------------


class Server:
    def __init__(self, folder: pathlib.Path, dtype: str, args: argparse.Namespace):
        command = [sys.executable, "-m", "bloomlm", "serve", "--model", str(folder), "--port",
                   "0", "--threads", str(args.threads), "--max-model-len",
                   str(args.max_model_len), "--log-level", "warning",
                   "--max-waiting", "1024"]  # fmt: skip
        command += ["--quantize", "int8"] if dtype == "int8" else ["--dtype", dtype]
        if args.device != "cpu":  # on the CPU, the command exactly as a user types it
            command += ["--device", args.device]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
        self.log = args.work_dir / f"server-{dtype}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if found:
                self.port = int(found[1])
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start:\n{self.log.read_text()}")

    def plan(self) -> str:
        found = re.search(r"KV cache: .*", self.log.read_text())
        return found[0] if found else ""

    def peak_rss(self) -> int:
        status = pathlib.Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def stream(port: int, prompt: list[int], new: int, timeout: float) -> dict:
    """One streaming request: send time, chunk arrival times, token count."""
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    sent = time.perf_counter()
    arrivals = []
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        for _ in range(20 * new + 100):  # bounded: a few lines per token
            line = response.readline()
            if not line or line.strip() == b"data: [DONE]":
                break
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                arrivals += [time.perf_counter()] * len(event["choices"])
    finally:
        connection.close()
    if len(arrivals) != new:
        raise RuntimeError(f"{len(arrivals)} tokens streamed, {new} asked for")
    return {"sent": sent, "arrivals": arrivals, "prompt_tokens": len(prompt), "new": new}


def run_level(port: int, requests: list[tuple[list[int], int]], clients: int,
              timeout: float, ramp: float = 0.0) -> dict:  # fmt: skip
    """Closed loop: `clients` threads each stream requests until none are left; client k starts
    k / clients x `ramp` seconds in (arrivals spread as in the loop's steady state)."""
    work: queue.Queue = queue.Queue()
    for index, request in enumerate(requests):
        work.put((index, request))
    results: list = [None] * len(requests)
    errors: list = []

    def client(delay: float) -> None:
        time.sleep(delay)
        while True:
            try:
                index, (prompt, new) = work.get_nowait()
            except queue.Empty:
                return
            try:
                results[index] = stream(port, prompt, new, timeout)
            except Exception as error:
                errors.append(repr(error))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k / clients * ramp,))
               for k in range(clients)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    seconds = time.perf_counter() - started
    if errors or any(r is None for r in results):
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:3]}")
    return {"seconds": seconds, "results": results}


# --------------------------------------------------------------------------------------------------
# In-process references: prefill alone, static batch
# --------------------------------------------------------------------------------------------------


def load_model(folder: pathlib.Path, dtype: str, device: str):
    """The weights as the server loads them (`bloomlm serve --quantize int8` / `--dtype`)."""
    import bloomlm

    kwargs: dict = {"torch_dtype": "float32", "quantize": "int8"} if dtype == "int8" else {
        "torch_dtype": dtype}  # fmt: skip
    if device != "cpu":
        kwargs["device_map"] = device
    return bloomlm.BloomForCausalLM.from_pretrained(str(folder), **kwargs).eval()


def synchronize(device: str) -> None:
    """Wait for the device's queued work, so a timer measures it (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def prefill_seconds(model, prompt: list[int], device: str, repeats: int = 2) -> float:
    """The fastest of `repeats` prefills of `prompt` alone."""
    best = float("inf")
    for _ in range(repeats):
        decoder = model.make_decoder(1, len(prompt) + 1)
        ids = torch.tensor(prompt, device=model.device)
        synchronize(device)
        start = time.perf_counter()
        decoder.fill(0, ids)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def static_batch(model, requests: list[tuple[list[int], int]], device: str) -> dict:
    width = max(len(p) for p, _ in requests)
    new = max(n for _, n in requests)
    ids = torch.full((len(requests), width), 3)
    mask = torch.zeros_like(ids)
    for row, (prompt, _) in enumerate(requests):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    model.generate(
        ids[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False, pad_token_id=3
    )  # warm-up: first-call allocations stay out of the timing
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=3)  # fmt: skip
    synchronize(device)
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - width) * len(requests)
    asked = sum(n for _, n in requests)
    return {"seconds": seconds, "rows": len(requests), "max_new_tokens": new,
            "tokens_per_s": generated / seconds, "asked_tokens_per_s": asked / seconds}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(level: dict, clients: int, prefill: dict[int, float] | None) -> dict:
    results = level["results"]
    tokens = sum(r["new"] for r in results)
    ttft = [r["arrivals"][0] - r["sent"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    row = {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": level["seconds"],
        "tokens_per_s": tokens / level["seconds"],
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
    }
    if prefill is not None:
        ratios = [t / prefill[i] for i, t in enumerate(ttft)]
        row["ttft_over_prefill_p50"] = percentile(ratios, 50)
        row["ttft_over_prefill_p99"] = percentile(ratios, 99)
    return row


def workload(count: int, rng: random.Random, lengths: tuple, new: tuple) -> list:
    return [([rng.randrange(4, 4096) for _ in range(rng.randint(*lengths))], rng.randint(*new))
            for _ in range(count)]  # fmt: skip


def bench_dtype(args: argparse.Namespace, folder: pathlib.Path, dtype: str) -> dict:
    rng = random.Random(f"serve-bench-{dtype}")
    levels = {c: workload(max(args.min_requests, 2 * c), rng, args.prompt_tokens,
                          args.new_tokens) for c in args.levels}  # fmt: skip
    target = 16 if 16 in levels else max(levels)
    server = Server(folder, dtype, args)
    rows, plan = [], server.plan()
    try:
        run_level(server.port, workload(2, rng, (8, 8), (4, 4)), 1, args.timeout)  # warm-up
        ramp = 0.0  # the mean request time one at a time, once measured
        for clients, requests in levels.items():
            print(f"[{dtype}] {clients} clients, {len(requests)} requests", flush=True)
            level = run_level(server.port, requests, clients, args.timeout, ramp)
            rows.append((clients, level, server.peak_rss()))
            if clients == 1:
                ramp = level["seconds"] / len(requests)
    finally:
        server.stop()
    torch.set_num_threads(args.threads)
    model = load_model(folder, dtype, args.device)
    prefill = [prefill_seconds(model, prompt, args.device) for prompt, _ in levels[target]]
    static = static_batch(model, levels[target][:target], args.device)  # rows = clients
    del model
    table = []
    for clients, level, rss in rows:
        summary = summarize(level, clients, prefill if clients == target else None)
        summary["peak_rss_bytes"] = rss
        table.append(summary)
    one = next(r for r in table if r["clients"] == min(levels))
    at = next(r for r in table if r["clients"] == target)
    targets = {
        "clients": target,
        "vs_one_at_a_time": at["tokens_per_s"] / one["tokens_per_s"],
        "vs_static_batch": at["tokens_per_s"] / static["tokens_per_s"],
        "ttft_over_prefill_p99": at.get("ttft_over_prefill_p99"),
    }
    targets["met"] = {
        "vs_one_at_a_time >= 5": targets["vs_one_at_a_time"] >= 5,
        "vs_static_batch >= 0.8": targets["vs_static_batch"] >= 0.8,
        "ttft_over_prefill_p99 <= 3": (targets["ttft_over_prefill_p99"] or 99) <= 3,
    }
    return {"dtype": dtype, "memory_plan": plan, "levels": table, "static_batch": static,
            "targets": targets}  # fmt: skip


def markdown(report: dict) -> str:
    lines = [
        f"Serving benchmark ({report['model']}, {report['threads']} threads, "
        f"{report['machine']}; `{report['command']}`):",
        "",
        "| dtype | clients | requests | tokens/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | "
        "peak RSS (GiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in report["results"]:
        for r in result["levels"]:
            lines.append(
                f"| {result['dtype']} | {r['clients']} | {r['requests']} | "
                f"{r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                f"{1000 * r['itl_p50_s']:.0f} / {1000 * r['itl_p99_s']:.0f} | "
                f"{r['peak_rss_bytes'] / 2**30:.2f} |"
            )
        static = result["static_batch"]
        lines.append(
            f"| {result['dtype']} | static batch of {static['rows']} | {static['rows']} | "
            f"{static['tokens_per_s']:.1f} | | | |"
        )
    lines += [
        "",
        "| dtype | at clients | vs one at a time (>= 5x) | vs static batch (>= 0.8x) "
        "| p99 TTFT / prefill alone (<= 3) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for result in report["results"]:
        t = result["targets"]
        met = t["met"]

        def mark(ok: bool) -> str:
            return "met" if ok else "not met"

        lines.append(
            f"| {result['dtype']} | {t['clients']} | {t['vs_one_at_a_time']:.2f}x "
            f"({mark(met['vs_one_at_a_time >= 5'])}) | {t['vs_static_batch']:.2f}x "
            f"({mark(met['vs_static_batch >= 0.8'])}) | {t['ttft_over_prefill_p99']:.2f} "
            f"({mark(met['ttft_over_prefill_p99 <= 3'])}) |"
        )
    lines += ["", *(f"- {r['dtype']}: {r['memory_plan']}" for r in report["results"])]
    lines.append(f"- transformers serve (anchor row): {report['transformers_serve']}")
    return "\n".join(lines) + "\n"


def write(report: dict, out: pathlib.Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    md = out / f"{name}.md"
    previous = md.read_text() if md.exists() else ""
    notes = "\n" + previous[previous.index(NOTES_MARK) :] if NOTES_MARK in previous else ""
    md.write_text("# Serving benchmark\n\n" + table + notes)
    if out == HERE and name == "SERVING":
        bench.replace_readme_block(MARK_START, MARK_END, table)
    print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny shape, levels 1 and 4, 4 requests, short prompts: checks the script in "
        "seconds (written under --work-dir/quick; README and benchmarks/ untouched)",
    )
    parser.add_argument("--dtypes", default="float32,int8", help="float32, int8, bfloat16, ...")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--shape", choices=("560m", "1b7"), default="560m")
    parser.add_argument("--layers", type=int, help="default: the shape's (24)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (server and refs)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per level")
    parser.add_argument(
        "--work-dir", type=pathlib.Path, default=CACHE, help="model folders and server logs"
    )
    parser.add_argument(
        "--out", default="SERVING", help="benchmarks/OUT.json and .md (README: only SERVING)"
    )
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.levels.split(",")]
    args.prompt_tokens, args.new_tokens = (16, 256), (32, 128)
    out = HERE
    shape = args.shape
    if args.quick:
        shape, args.levels, args.min_requests = "quick", [1, 4], 4
        args.prompt_tokens, args.new_tokens = (16, 48), (8, 16)
        out = args.work_dir / "quick"
    layers = args.layers or SHAPES[shape]["n_layer"]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.work_dir, shape, layers)
    report = {
        "model": f"bloom-{shape} shape, {layers} layers, random weights, {args.device}",
        "command": " ".join(["python benchmarks/serve_bench.py", *(argv or sys.argv[1:])]),
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "quick": args.quick,
        "load": "closed loop, streaming, prompts {}-{} tokens, {}-{} new tokens".format(
            *args.prompt_tokens, *args.new_tokens
        ),
        "transformers_serve": TRANSFORMERS_SERVE,
        "results": [bench_dtype(args, folder, d) for d in args.dtypes.split(",")],
    }
    write(report, out, args.out)


if __name__ == "__main__":
    main()

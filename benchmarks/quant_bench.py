"""Speed of the `quantize=` modes on the bloom-560m shape: kernels, load, decoding, and whether
weights left memory-mapped from the checkpoint compute slower than copied ones.

    python benchmarks/quant_bench.py kernels        # one linear at the 560m shapes, per kernel
    python benchmarks/quant_bench.py load           # cold-process from_pretrained, every mode
    python benchmarks/quant_bench.py decode         # generate: prefill and decode per mode (+ CT2)
    python benchmarks/quant_bench.py mapping        # mapped vs copied weights: matmul and load time
    python benchmarks/quant_bench.py all --out benchmarks/QUANT_BENCH.md

Every timing is a median over interleaved rounds (the machine is shared); `uptime` is printed with
each table. The checkpoint is the benchmark's random 560m (`bench.py` makes it when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOLDER = Path("/tmp/bloomlm-bench/bloom-560m")
# (out_features, in_features) of bloom-560m's linears, and its tied LM head
SHAPES = {
    "qkv 3072x1024": (3072, 1024),
    "dense 1024x1024": (1024, 1024),
    "h_to_4h 4096x1024": (4096, 1024),
    "4h_to_h 1024x4096": (1024, 4096),
    "lm_head 250880x1024": (250880, 1024),
}


def machine_line() -> str:
    import torch

    load = os.getloadavg()
    return (
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, load average {load[0]:.2f} / {load[1]:.2f} (1 / 5 min)"
    )


def median_ms(run, calls: int, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return times


# -- kernels -----------------------------------------------------------------------------------


def kernel_ops(x, weight, bias, q, scale, w8a8, fp16) -> dict:
    """The kernels compared, each as a no-argument call on input `x`."""
    import torch
    import torch.nn.functional as F

    from bloomlm.torch.quantize import int8_linear

    scaled = x / x.abs().amax(-1, keepdim=True)
    static = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    return {
        "fp32": lambda: F.linear(x, weight, bias),
        "wo": lambda: int8_linear(x, q, scale) + bias,
        "dynamic": lambda: torch.ops.quantized.linear_dynamic(x, w8a8._packed[0]),
        "static": lambda: static(scaled, w8a8._input_scale, w8a8._zero_point, w8a8._packed[0]),
        "row": lambda: w8a8(x),
        "fp16": lambda: fp16(x),
    }


def kernels(rounds: int) -> list[str]:
    """Each kernel for one linear of each shape; rounds interleave the kernels."""
    import torch

    from bloomlm.torch.quantize import Fp16Linear, Int8Linear, quantize_rows

    torch.manual_seed(0)
    lines = [
        "## One linear at the 560m shapes (ms per call, median)",
        "",
        f"{machine_line()}. `dynamic` is fbgemm's `linear_dynamic` (one activation scale per call, "
        "not row-invariant); `W8A8 per row` is `Int8Linear` (bloomlm's int8: per-row absmax, "
        "fbgemm's static-scale op, rescale + bias); `static op` is that op alone (the per-row "
        "division and rescaling excluded), so `W8A8 per row - static op` is the cost of keeping "
        "rows independent.",
        "",
        "| shape | rows | fp32 (MKL) | int8-weight-only | dynamic | static op | W8A8 per row | "
        "fp16 (fbgemm) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (n, k) in SHAPES.items():
        weight, bias = torch.randn(n, k) * 0.02, torch.randn(n) * 0.01
        q, scale = quantize_rows(weight)
        w8a8, fp16 = Int8Linear(q, scale, bias), Fp16Linear(weight.half(), bias)
        w8a8.pack_()
        fp16.pack_()
        for rows in (1, 8, 128):
            x = torch.randn(rows, k)
            ops = kernel_ops(x, weight, bias, q, scale, w8a8, fp16)
            big = n * k * rows > 2e9
            calls = 1 if big else max(1, int(2e8 / (n * k)) // (1 if rows < 128 else 8))
            times = {key: [] for key in ops}
            for _ in range(rounds):
                for key, op in ops.items():
                    op()
                    times[key] += median_ms(op, calls, 1)
            cells = " | ".join(f"{statistics.median(times[key]):.3f}" for key in ops)
            lines.append(f"| {name} | {rows} | {cells} |")
            print(lines[-1], flush=True)
    return lines


# -- load --------------------------------------------------------------------------------------

LOAD_SCRIPT = """
import sys, time, json
start = time.perf_counter()
import torch
system, folder, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if "torch_dtype" in kwargs:
    kwargs["torch_dtype"] = getattr(torch, kwargs["torch_dtype"])
if system == "transformers":
    from transformers import BloomForCausalLM
else:
    from bloomlm import BloomForCausalLM
imported = time.perf_counter()
model = BloomForCausalLM.from_pretrained(folder, **kwargs)
loaded = time.perf_counter()
with torch.no_grad():
    model(torch.tensor([[5, 6, 7]]))
forward = time.perf_counter()
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024
print("RESULT " + json.dumps({"import": imported - start, "from_pretrained": loaded - imported,
                              "first_forward": forward - loaded, "peak_mb": peak}))
"""


def quantized_copies(folder: Path) -> dict[str, Path]:
    """The 560m saved as int8 and fp16 by bloomlm (made once, beside the float checkpoint)."""
    from bloomlm import BloomForCausalLM

    copies = {}
    for mode in ("int8", "fp16"):
        out = folder.parent / f"{folder.name}-{mode}"
        if not (out / "config.json").exists():
            kind = "int8-weight-only" if mode == "int8" else mode  # the same file, no packing
            BloomForCausalLM.from_pretrained(folder, quantize=kind).save_pretrained(out)
        copies[mode] = out
    return copies


def run_load(system: str, folder: Path, kwargs: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", LOAD_SCRIPT, system, str(folder), json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{system} {kwargs} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def load(rounds: int, threads: int) -> list[str]:
    copies = quantized_copies(FOLDER)
    cases = {
        "transformers fp32": ("transformers", FOLDER, {}),
        "bloomlm fp32": ("bloomlm", FOLDER, {}),
        "bloomlm bf16": ("bloomlm", FOLDER, {"torch_dtype": "bfloat16"}),
        "bloomlm int8 (quantized at load)": ("bloomlm", FOLDER, {"quantize": "int8"}),
        "bloomlm int8 (model.int8.safetensors)": ("bloomlm", copies["int8"], {}),
        "bloomlm int8-weight-only (quantized at load)": (
            "bloomlm", FOLDER, {"quantize": "int8-weight-only"},
        ),
        "bloomlm int8-weight-only (model.int8.safetensors)": (
            "bloomlm", copies["int8"], {"quantize": "int8-weight-only"},
        ),
        "bloomlm fp16 (converted at load)": ("bloomlm", FOLDER, {"quantize": "fp16"}),
        "bloomlm fp16 (model.fp16.safetensors)": ("bloomlm", copies["fp16"], {}),
    }  # fmt: skip
    results = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (system, folder, kwargs) in cases.items():
            results[name].append(run_load(system, folder, kwargs, threads))
    lines = [
        "## Cold-process load of the 560m shape (s, median)",
        "",
        f"{machine_line()}; {rounds} rounds, each case in a fresh process, checkpoint files in the "
        "page cache. `from_pretrained` includes quantizing/packing; `vs transformers` is "
        "transformers' from_pretrained time over this row's.",
        "",
        "| case | import | from_pretrained | vs transformers | first forward | peak RSS (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = statistics.median(r["from_pretrained"] for r in results["transformers fp32"])
    for name, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        lines.append(
            f"| {name} | {med['import']:.2f} | {med['from_pretrained']:.2f} | "
            f"{base / med['from_pretrained']:.1f}x | {med['first_forward']:.3f} | "
            f"{med['peak_mb']:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


# -- decode ------------------------------------------------------------------------------------

# Times each of a script's `tasks` (one warm-up call, then the median of `reps`) and prints them
# as one RESULT line: the tail of every timing script below.
_TIME_TASKS = """out = {}
for name, task in tasks.items():
    task()
    times = []
    for _ in range(reps):
        start = time.perf_counter(); task(); times.append(time.perf_counter() - start)
    out[name] = statistics.median(times)
print("RESULT " + json.dumps(out))
"""

DECODE_SCRIPT = (
    """
import sys, time, json, statistics
import torch
from bloomlm import BloomForCausalLM
folder, kwargs, reps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = BloomForCausalLM.from_pretrained(folder, **kwargs)
def prompt(b, n):
    return torch.randint(4, 1024, (b, n), generator=torch.Generator().manual_seed(0))
ids, long = {b: prompt(b, 32) for b in (1, 8)}, {b: prompt(b, 128) for b in (1, 8)}
def gen(x, n):
    return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=3)
tasks = {"prefill-1x128": lambda: gen(long[1], 1), "prefill-8x128": lambda: gen(long[8], 1),
         "decode-1": lambda: gen(ids[1], 32), "decode-8": lambda: gen(ids[8], 32),
         "first-1": lambda: gen(ids[1], 1), "first-8": lambda: gen(ids[8], 1)}
"""
    + _TIME_TASKS
)

CT2_SCRIPT = (
    """
import sys, time, json, statistics
import ctranslate2
import numpy as np
model_dir, reps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
generator = ctranslate2.Generator(model_dir, device="cpu", compute_type="int8",
                                  intra_threads=threads)
vocabulary = json.load(open(model_dir + "/vocabulary.json"))
def prompt(b, n):
    ids = np.random.default_rng(0).integers(4, 1024, size=(b, n))
    return [[vocabulary[i] for i in row] for row in ids.tolist()]
def gen(p, n):
    generator.generate_batch(p, max_length=n, min_length=n, sampling_topk=1,
                             include_prompt_in_result=False)
p32 = {b: prompt(b, 32) for b in (1, 8)}
p128 = {b: prompt(b, 128) for b in (1, 8)}
tasks = {"prefill-1x128": lambda: gen(p128[1], 1), "prefill-8x128": lambda: gen(p128[8], 1),
         "decode-1": lambda: gen(p32[1], 32), "decode-8": lambda: gen(p32[8], 32),
         "first-1": lambda: gen(p32[1], 1), "first-8": lambda: gen(p32[8], 1)}
"""
    + _TIME_TASKS
)


def run_script(script: str, args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def decode(rounds: int, reps: int, threads: int) -> list[str]:
    sys.path.insert(0, str(HERE))
    import bench

    modes = {
        "bloomlm fp32": {},
        "bloomlm fp16": {"quantize": "fp16"},
        "bloomlm int8 (W8A8)": {"quantize": "int8"},
        "bloomlm int8-weight-only": {"quantize": "int8-weight-only"},
        "bloomlm bf16": {"torch_dtype": "bfloat16"},
    }
    ct2_dir = FOLDER.parent / f"{FOLDER.name}-ct2-int8"
    has_ct2 = bench.convert_ctranslate2(FOLDER, ct2_dir, "int8")
    results: dict[str, list[dict]] = {name: [] for name in modes}
    if has_ct2:
        results["ctranslate2 int8"] = []
    for _ in range(rounds):
        for name, kwargs in modes.items():
            if "torch_dtype" in kwargs:
                kwargs = {"torch_dtype": "bfloat16"}
            args = [str(FOLDER), json.dumps(kwargs), str(reps)]
            script = DECODE_SCRIPT.replace(
                "model = BloomForCausalLM",
                "kwargs = {k: getattr(torch, v) if k == 'torch_dtype' else v "
                "for k, v in kwargs.items()}\nmodel = BloomForCausalLM",
            )
            results[name].append(run_script(script, args, threads))
        if has_ct2:
            results["ctranslate2 int8"].append(
                run_script(CT2_SCRIPT, [str(ct2_dir), str(reps), str(threads)], threads)
            )
    lines = [
        "## Through `generate` on the 560m shape (median)",
        "",
        f"{machine_line()}; {rounds} rounds x {reps} repetitions, each system in a fresh process. "
        "Prefill = `generate(128-token prompt, max_new_tokens=1)`; decode tok/s = 31 new tokens / "
        "(time for 32 new tokens - time for 1), prompt 32 tokens.",
        "",
        "| system | prefill 1x128 (ms) | prefill 8x128 (ms) | decode b1 (tok/s) "
        "| decode b8 (tok/s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        b1 = 31 / (med["decode-1"] - med["first-1"])
        b8 = 8 * 31 / (med["decode-8"] - med["first-8"])
        lines.append(
            f"| {name} | {med['prefill-1x128'] * 1e3:.0f} | {med['prefill-8x128'] * 1e3:.0f} "
            f"| {b1:.1f} | {b8:.1f} |"
        )
        print(lines[-1], flush=True)
    return lines


# -- mapping -----------------------------------------------------------------------------------


def smaps_kb(path_suffix: str, field: str) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            head = line.split()[0] if line.strip() else ""
            if not head.endswith(":"):
                inside = line.rstrip().endswith(path_suffix)
            elif inside and head == field + ":":
                total += int(line.split()[1])
    return total


def _offset_copy(tensor):
    """A copy of `tensor` that starts 16 bytes past a 64-byte boundary, like the mapped ones."""
    import torch

    buffer = torch.empty(tensor.numel() + 4, dtype=tensor.dtype)
    return buffer[4:].view(tensor.shape).copy_(tensor)


def mapping(rounds: int) -> list[str]:
    """Matmuls on weights mapped from model.safetensors vs the same weights copied to anonymous
    memory (4 KiB pages unless THP applies), and on a 64-byte-aligned vs a 16-byte-offset copy
    (safetensors places tensors 8-byte aligned)."""
    import safetensors
    import torch
    import torch.nn.functional as F

    path = FOLDER / "model.safetensors"
    with safetensors.safe_open(str(path), framework="pt") as reader:
        mapped = {k: reader.get_tensor(k) for k in reader.keys()}
    layers = [t for k, t in mapped.items() if ".h." in k and k.endswith("weight") and t.dim() == 2]
    head = mapped["transformer.word_embeddings.weight"]
    for tensor in [*layers, head]:
        tensor.sum()  # fault every page in
    copied = [t.clone() for t in layers]
    head_copy = head.clone()
    offset = [_offset_copy(t) for t in layers]  # aligned as in the file, but anonymous memory
    xs = {rows: {k: torch.randn(rows, k) for k in (1024, 4096)} for rows in (1, 8)}

    def step(weights, rows):
        for w in weights:
            F.linear(xs[rows][w.shape[1]], w)

    cases = {
        "mapped": lambda rows: step(layers, rows),
        "copied": lambda rows: step(copied, rows),
        "offset": lambda rows: step(offset, rows),
        "head mapped": lambda rows: F.linear(xs[rows][1024], head),
        "head copied": lambda rows: F.linear(xs[rows][1024], head_copy),
    }
    times = {(key, rows): [] for key in cases for rows in (1, 8)}
    for _ in range(rounds):
        for (key, rows), values in times.items():
            values += median_ms(lambda: cases[key](rows), 2, 1)  # noqa: B023 (called at once)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    pmd = smaps_kb("model.safetensors", "FilePmdMapped")
    anon_huge = smaps_kb("", "AnonHugePages")
    start = time.perf_counter()
    head.clone()
    copy_gbs = head.numel() * 4 / (time.perf_counter() - start) / 1e9
    med = {key: statistics.median(value) for key, value in times.items()}
    return [
        "## Mapped vs copied weights (ms, median)",
        "",
        f"{machine_line()}; THP `{thp.read_text().strip() if thp.exists() else 'n/a'}`, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; of the mapping, "
        f"{pmd / 1024:.0f} MB are mapped with 2 MB pages (FilePmdMapped); anonymous huge pages "
        f"{anon_huge / 1024:.0f} MB; mapped tensors start {layers[0].data_ptr() % 64} bytes past "
        f"a 64-byte boundary, copies at 0. Copying the LM head into fresh memory ran at "
        f"{copy_gbs:.1f} GB/s (page faults included). MKL_ENABLE_INSTRUCTIONS="
        f"{os.environ.get('MKL_ENABLE_INSTRUCTIONS', 'unset')}.",
        "",
        "| weights | 96 layer matmuls, 1 row | 8 rows | LM head 250880x1024, 1 row | 8 rows |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| mapped from model.safetensors | {med['mapped', 1]:.2f} | {med['mapped', 8]:.2f} "
        f"| {med['head mapped', 1]:.2f} | {med['head mapped', 8]:.2f} |",
        f"| copied (anonymous memory) | {med['copied', 1]:.2f} | {med['copied', 8]:.2f} "
        f"| {med['head copied', 1]:.2f} | {med['head copied', 8]:.2f} |",
        f"| copied, 16 bytes past 64 as in the file | {med['offset', 1]:.2f} "
        f"| {med['offset', 8]:.2f} | | |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["kernels", "load", "decode", "mapping", "all"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not (FOLDER / "config.json").exists():
        sys.path.insert(0, str(HERE))
        import bench

        bench.make_checkpoint("560m", FOLDER)
    lines: list[str] = []
    if args.what in ("kernels", "all"):
        lines += kernels(args.rounds) + [""]
    if args.what in ("load", "all"):
        lines += load(args.rounds, args.threads) + [""]
    if args.what in ("decode", "all"):
        lines += decode(args.rounds, args.reps, args.threads) + [""]
    if args.what in ("mapping", "all"):
        lines += mapping(args.rounds) + [""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()

"""Tensor parallelism on this machine, and what the plan predicts for the 176B model on GPUs.

    python benchmarks/tp_bench.py            # 560m shape; writes benchmarks/TP.md and TP.json
    python benchmarks/tp_bench.py --quick    # tiny shape, prints the table only
    python benchmarks/tp_bench.py --cuda     # on a CUDA GPU: adds the 7b1 bf16 row to TP.md/.json

Measured (random weights of the shape, fp32, greedy, batch 1, a 32-token prompt):
  torch   1 process (no tensor parallelism), then 2 and 4 gloo processes under torchrun
          (tp_plan="auto"); per process: load seconds, decode ms per token, peak RSS (VmHWM)
  jax     one process with 1, 2, 4, 8 simulated CPU devices (XLA_FLAGS), a 1 x N mesh; decode
          ms per token (jitted generate, compile excluded), the process's peak RSS, and the
          parameter bytes on one device
decode ms per token = (time of generate with K + 1 new tokens - time with 1) / K, after warm-up,
so the prompt is not counted; eos cannot stop it (no eos id). On a 2-core machine more processes
than cores only add communication: tensor parallelism is expected to be slower here.

Computed from the 176B config (tests/fixtures/bloom-176b), bf16, batch 1, 8 and 16 GPUs: bytes
per device, bytes each rank sends per token in the all-reduces (ring: 2 (N-1)/N of the message),
and a bandwidth-bound latency per token = weights per device / HBM bandwidth + bytes sent / link
bandwidth + collectives x per-collective latency (the assumptions are printed with the table),
next to the published DeepSpeed-Inference and text-generation-inference figures.

`--cuda` (one prepared run, where a GPU is lent): the TP = 1 path of the 7b1 shape in bf16 on one
CUDA GPU (random weights made on the GPU, no checkpoint written), decode ms per token as above
and the peak GPU memory; the row is added to the committed TP.json and TP.md, the rest is kept.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BLOOM_176B = ROOT / "tests" / "fixtures" / "bloom-176b"
SHAPES = {
    "560m": dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "tiny": dict(vocab_size=1024, hidden_size=64, n_layer=2, n_head=8),
    "7b1": dict(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32),  # --cuda only
}
PROMPT, NEW_TOKENS = 32, 32
TORCH_RANKS, JAX_DEVICES = (1, 2, 4), (1, 2, 4, 8)
# GPU figures for the computed rows (vendor data sheets): HBM bandwidth per GPU, and NVLink 3
# (A100) 600 GB/s per GPU both directions together, so 300 GB/s each way.
A100_80GB_HBM, A100_40GB_HBM, NVLINK_ONE_WAY = 2.039e12, 1.555e12, 300e9
COLLECTIVE_LATENCY = 10e-6  # assumed: one small NCCL all-reduce inside an NVLink node, seconds
PUBLISHED = {  # ms per token, batch 1, as quoted in the issue
    8: ("DeepSpeed-Inference, 8 x A100-80GB", 44.0, A100_80GB_HBM),
    16: ("text-generation-inference, 16 x A100-40GB", 71.0, A100_40GB_HBM),
}


def peak_rss_mb(field: str = "VmHWM") -> float:
    """This process image's peak RSS (VmHWM; getrusage's ru_maxrss would count the parent's), or
    with `field="VmRSS"` the current one."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_checkpoint(shape: str, folder: Path) -> None:
    """A random BLOOM of the shape in safetensors (tensor parallelism reads slices of them)."""
    import torch

    from bloomlm import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(**SHAPES[shape], pad_token_id=3)).save_pretrained(folder)


def per_token_ms(generate, repeats: int = 3) -> float:
    """(generate(K + 1) - generate(1)) / K in ms: the best of `repeats` timings of each, after a
    warm-up call (which compiles, for JAX)."""
    times = {}
    for new in (1, NEW_TOKENS + 1):
        generate(new)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(new)
            runs.append(time.perf_counter() - start)
        times[new] = min(runs)
    return 1000 * (times[NEW_TOKENS + 1] - times[1]) / NEW_TOKENS


# -- the measured roles ----------------------------------------------------------------------------


def torch_rank(folder: str, out: str) -> None:
    """One process of the torch run (under torchrun when tensor-parallel)."""
    import torch

    from bloomlm import BloomForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, 2 // world))  # 2 cores shared by the processes
    kwargs = {"tp_plan": "auto"} if world > 1 else {}
    if world > 1:  # start the process group first: its imports are not loading
        from bloomlm.torch.tensor_parallel import resolve_mesh

        resolve_mesh("auto", None)
    before, start = peak_rss_mb("VmRSS"), time.perf_counter()
    model = BloomForCausalLM.from_pretrained(folder, **kwargs)
    load_s, load_mb = time.perf_counter() - start, peak_rss_mb() - before
    ids = torch.randint(4, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))

    def generate(new: int):
        model.generate(ids, max_new_tokens=new, eos_token_id=None, pad_token_id=3)

    result = {"rank": int(os.environ.get("RANK", "0")), "load_s": load_s, "load_mb": load_mb,
              "ms_per_token": per_token_ms(generate), "peak_rss_mb": peak_rss_mb()}  # fmt: skip
    Path(f"{out}.{result['rank']}").write_text(json.dumps(result))


def jax_process(folder: str, out: str, devices: int) -> None:
    """The JAX run with `devices` simulated devices (XLA_FLAGS set by the parent)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from bloomlm import FlaxBloomForCausalLM
    from bloomlm.flax.sharding import bytes_per_device

    assert jax.device_count() == devices, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(1, devices), ("data", "model"))
    start = time.perf_counter()
    model = FlaxBloomForCausalLM.from_pretrained(folder, mesh=mesh)
    load_s = time.perf_counter() - start
    ids = np.random.default_rng(0).integers(4, 1000, (1, PROMPT)).astype(np.int32)

    def generate(new: int):
        model.generate(ids, max_new_tokens=new, eos_token_id=None, pad_token_id=3).sequences \
            .block_until_ready()  # fmt: skip

    ms = per_token_ms(generate)
    per_device = max(bytes_per_device(model.params).values()) / 2**20
    result = {"devices": devices, "load_s": load_s, "ms_per_token": ms,
              "peak_rss_mb": peak_rss_mb(), "param_mb_per_device": per_device}  # fmt: skip
    Path(out).write_text(json.dumps(result))


def single_device_row(shape: str = "7b1", device: str = "cuda") -> dict:
    """No tensor parallelism, one accelerator: the shape's random weights made on `device` in
    bf16, decode ms per token (batch 1, greedy) and the peak memory the device allocated."""
    import torch

    from bloomlm import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16: no float32 copy of 7B weights
    try:
        with torch.device(device):
            model = BloomForCausalLM(BloomConfig(**SHAPES[shape], pad_token_id=3)).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    ids = torch.randint(4, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    cuda = torch.device(device).type == "cuda"

    def generate(new: int):
        model.generate(ids, max_new_tokens=new, eos_token_id=None, pad_token_id=3)
        if cuda:
            torch.cuda.synchronize()

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    name = torch.cuda.get_device_name() if cuda else platform.machine()
    ms = per_token_ms(generate)
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    return {"shape": shape, "device": name, "dtype": "bfloat16", "ms_per_token": ms,
            "weights_gb": weights / 1e9, "peak_gb": peak / 1e9}  # fmt: skip


# -- the driver ------------------------------------------------------------------------------------


def run_torch(folder: Path, work: Path, ranks: int) -> list[dict]:
    out = work / f"torch{ranks}"
    script = [str(Path(__file__).resolve()), "--role", "torch", str(folder), str(out)]
    if ranks == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(ranks), *script]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // ranks))}
    subprocess.run(command, check=True, env=env, capture_output=True, text=True, timeout=3600)
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(ranks)]


def run_jax(folder: Path, work: Path, devices: int) -> dict:
    out = work / f"jax{devices}.json"
    flags = f"--xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": flags}
    script = [str(Path(__file__).resolve()), "--role", "jax", str(folder), str(out), str(devices)]
    subprocess.run([sys.executable, *script], check=True, env=env, capture_output=True,
                   text=True, timeout=3600)  # fmt: skip
    return json.loads(out.read_text())


def computed_176b() -> list[dict]:
    """The plan's numbers for the 176B model on GPUs, bf16, batch 1."""
    from bloomlm.config import BloomConfig
    from bloomlm.sharding_plan import plan_summary

    config = BloomConfig.from_pretrained(BLOOM_176B)
    rows = []
    for ways, (setup, published_ms, hbm) in PUBLISHED.items():
        plan = plan_summary(config, ways, bytes_per_value=2, batch=1, length=2048)
        weights = plan["bytes_per_device"]["weights"]
        sent = plan["communication_per_token"]
        bound = weights / hbm + sent["total"] / NVLINK_ONE_WAY
        bound += sent["collectives"] * COLLECTIVE_LATENCY
        rows.append({"setup": setup, "ways": ways, "weights_gb_per_device": weights / 1e9,
                     "sent_mb_per_token": sent["total"] / 1e6,
                     "collectives_per_token": sent["collectives"],
                     "bound_ms": 1000 * bound, "published_ms": published_ms})  # fmt: skip
    return rows


def table(results: dict) -> str:
    shape, lines = results["shape"], []
    lines.append(f"Command: `python benchmarks/tp_bench.py{' --quick' if shape == 'tiny' else ''}`")
    lines.append(f"Machine: {results['machine']}; load average at start {results['load']:.1f}")
    lines.append(f"Shape: {shape} {SHAPES[shape]}, random weights, fp32, batch 1, prompt {PROMPT}, "
                 f"{NEW_TOKENS} new tokens (greedy). Raw numbers: `TP.json`.\n")  # fmt: skip
    lines += ["| torch processes | load (s) | memory taken by loading, per process (MB) "
              "| decode (ms/token) | peak RSS per process (MB) |",
              "| ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for ranks, per_rank in results["torch"].items():
        load = max(r["load_s"] for r in per_rank)
        load_mb = " / ".join(f"{r['load_mb']:.0f}" for r in per_rank)
        ms = statistics.median(r["ms_per_token"] for r in per_rank)
        rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in per_rank)
        lines.append(f"| {ranks} | {load:.2f} | {load_mb} | {ms:.1f} | {rss} |")
    if "gpu" in results:
        lines += ["", gpu_line(results["gpu"])]
    lines += ["", "| JAX devices (1 process) | load (s) | decode (ms/token) "
              "| process peak RSS (MB) | parameters per device (MB) |",
              "| ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for devices, run in results["jax"].items():
        lines.append(f"| {devices} | {run['load_s']:.2f} | {run['ms_per_token']:.1f} | "
                     f"{run['peak_rss_mb']:.0f} | {run['param_mb_per_device']:.0f} |")  # fmt: skip
    lines += ["", "176B (bigscience/bloom config), bf16, batch 1, computed from the plan:", "",
              "| setup | GB of weights per GPU | MB sent per token | collectives per token "
              "| bandwidth bound (ms/token) | published (ms/token) |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for row in results["computed_176b"]:
        lines.append(f"| {row['setup']} | {row['weights_gb_per_device']:.1f} | "
                     f"{row['sent_mb_per_token']:.2f} | {row['collectives_per_token']} | "
                     f"{row['bound_ms']:.1f} | {row['published_ms']:.0f} |")  # fmt: skip
    lines.append(f"\nAssumptions of the bound: HBM {A100_80GB_HBM / 1e12:.3f} TB/s (A100-80GB) and "
                 f"{A100_40GB_HBM / 1e12:.3f} TB/s (A100-40GB), NVLink {NVLINK_ONE_WAY / 1e9:.0f} "
                 f"GB/s each way, {COLLECTIVE_LATENCY * 1e6:.0f} us per all-reduce; every weight "
                 "read once per token, the KV cache and attention ignored (small at batch 1). An "
                 "A100 node holds 8 GPUs, so 16 are two nodes, and part of the traffic behind the "
                 "published 16-GPU figure crosses the slower network between them.")  # fmt: skip
    lines.append(NOTES.replace(NO_GPU, "") if "gpu" in results else NOTES)
    return "\n".join(lines) + "\n"


def gpu_line(gpu: dict) -> str:
    return (
        f"One GPU, no tensor parallelism ({gpu['device']}), the {gpu['shape']} shape in "
        f"{gpu['dtype']}, batch 1, greedy: {gpu['ms_per_token']:.1f} ms/token, "
        f"{gpu['weights_gb']:.1f} GB of weights, peak GPU memory {gpu['peak_gb']:.1f} GB."
    )


NO_GPU = " No GPU was lent to the run that produced TP.md, so it has no measured GPU row."


NOTES = """
Reading the numbers: one process maps the safetensors file and its pages count only once they are
touched, so its load takes almost nothing and its peak (after decoding has read every weight) is
the whole model. A tensor-parallel process reads its slices into its own memory: its load takes
its share of the weights plus, while one tensor is being read, that tensor's slice a second time
(the file's pages it touched; the largest is the vocab-parallel embedding's share), so about
1/N of the weights plus one tensor. Decoding with more processes than the 2 cores is slower, as
expected: every token waits on 2 all-reduces per layer between processes that share the cores,
and DTensor adds its dispatch to every split layer. The JAX devices are simulated on the same
2 cores, so their timings show the cost of the split, not a speed-up; the parameters per device
fall as 1/N. No GPU was lent to the run that produced TP.md, so it has no measured GPU row.
"""


def add_gpu_row() -> None:
    """`--cuda`: measure the 7b1 row on this machine's GPU, add it to the committed run."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--cuda needs a CUDA GPU; none is visible to torch")
    results = json.loads((HERE / "TP.json").read_text())
    results["gpu"] = single_device_row("7b1", "cuda")
    text = table(results)
    print(text)
    (HERE / "TP.md").write_text("# Tensor parallelism benchmark\n\n" + text)
    (HERE / "TP.json").write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape; print only")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier run")
    parser.add_argument(
        "--cuda", action="store_true", help="on a CUDA GPU: add the 7b1 bf16 row to TP.md/.json"
    )
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)  # a child process's job
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())), end="")
        return
    if args.cuda:
        add_gpu_row()
        return
    if args.role:
        role, *rest = args.role
        if role == "torch":
            torch_rank(*rest)
        else:
            jax_process(rest[0], rest[1], int(rest[2]))
        return
    shape = "tiny" if args.quick else "560m"
    results = {"shape": shape, "load": os.getloadavg()[0],
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"python {platform.python_version()}"}  # fmt: skip
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        folder = work / "model"
        make_checkpoint(shape, folder)
        results["torch"] = {n: run_torch(folder, work, n) for n in TORCH_RANKS}
        results["jax"] = {n: run_jax(folder, work, n) for n in JAX_DEVICES}
    results["computed_176b"] = computed_176b()
    text = table(results)
    print(text)
    if not args.quick:
        (HERE / "TP.md").write_text("# Tensor parallelism benchmark\n\n" + text)
        (HERE / "TP.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Where int8 (W8A8) spends its time at the 560m shape (the checkpoint bench.py makes): the load
(`from_pretrained(quantize="int8")` under cProfile, one thread), then torch.profiler over a
`generate` of decode b8, prefill 8x128 and decode b1, top ops by self CPU time.

    python benchmarks/int8_profile.py     # run alone; RESULTS.md cites its output
"""

import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bloomlm import BloomForCausalLM

FOLDER = "/tmp/bloomlm-bench/bloom-560m"
CASES = {"decode-8": (8, 32, 32), "prefill-8x128": (8, 128, 1), "decode-1": (1, 32, 32)}


def profile_load() -> None:
    torch.set_num_threads(1)
    profiler, start = cProfile.Profile(), time.perf_counter()
    profiler.runcall(BloomForCausalLM.from_pretrained, FOLDER, quantize="int8")
    print(f"== load (1 thread): {time.perf_counter() - start:.3f} s")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def main() -> None:
    profile_load()
    torch.set_num_threads(2)
    model = BloomForCausalLM.from_pretrained(FOLDER, quantize="int8")
    generator = torch.Generator().manual_seed(0)

    def run(batch: int, length: int, new: int) -> None:
        ids = torch.randint(4, 250000, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=3)  # fmt: skip

    for name, shape in CASES.items():
        run(*shape)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            run(*shape)
            seconds = time.perf_counter() - start
        print(f"== {name}: {seconds:.3f} s")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        print(table)


if __name__ == "__main__":
    main()

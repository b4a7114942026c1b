"""JAX compile time of the Flax model's forward and `generate`, with and without `scan_layers`.

    python benchmarks/flax_compile.py /tmp/bloomlm-bench/bloom-560m     # the benchmark's checkpoint

Compile time = first call minus a second, compiled call with the same shapes.
"""

from __future__ import annotations

import sys
import time

import jax.numpy as jnp
import numpy as np

from bloomlm import FlaxBloomForCausalLM


def first_minus_second(run) -> float:
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run()
    return first - (time.perf_counter() - start)


def main(folder: str) -> None:
    ids = jnp.asarray(np.random.default_rng(0).integers(4, 1000, size=(1, 32)))
    print("| layers | forward compile (s) | generate compile (s) |\n| --- | ---: | ---: |")
    for scan in (True, False):
        model = FlaxBloomForCausalLM.from_pretrained(folder, scan_layers=scan)
        forward = first_minus_second(lambda: model(ids).logits.block_until_ready())  # noqa: B023
        generate = first_minus_second(
            lambda: model.generate(ids, max_new_tokens=8).sequences.block_until_ready()  # noqa: B023
        )
        print(f"| {'scanned' if scan else 'unrolled'} | {forward:.1f} | {generate:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])

"""The KV-cache memory budget: how many sequences of `max_model_len` tokens may run at once.

A sequence's keys and values take 2 (key, value) x n_layer x hidden_size x the cache dtype's
bytes per token; a row of the engine's cache is sized for `max_model_len` tokens. The budget is
`--kv-cache-memory` when given, else a fraction (KV_MEMORY_FRACTION) of the memory available
after the model is loaded (the device's free memory on a GPU, MemAvailable on Linux). The engine
keeps one more row for the prompt being prefilled, so it runs budget // bytes_per_row - 1
sequences at most (and at most --max-batch). The cache grows with the load, in power-of-two
numbers of rows and columns, so an idle server holds little of its budget.

A model split over N processes (tensor parallelism) keeps H/N heads per rank, so a token takes
1/N of those bytes on each; the budget is per rank (per device), and on the CPU, where the N
processes share the machine's memory, the default is the fraction of the available memory / N.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI checks sizes without it
    import torch

KV_MEMORY_FRACTION = 0.5  # of the available memory, when --kv-cache-memory is not given
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512M', '1.5G', '1000000' -> bytes (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size: write a number of bytes, or like 512MiB, 2G")
    number, unit = float(match[1]), match[2].upper()
    return int(number * _UNITS[unit])


def human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n_bytes) < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"


def kv_bytes_per_token(config: Any, dtype: torch.dtype, tensor_parallel: int = 1) -> int:
    """Bytes of keys and values one token takes in every layer (on each of `tensor_parallel`
    ranks: their H/N heads)."""
    import torch

    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * config.hidden_size // tensor_parallel * element


def available_memory(device: torch.device) -> int:
    """Bytes free for the cache now: the GPU's free memory, else the system's available memory."""
    if device.type == "cuda":
        import torch  # here, not at the top: the CLI's size checks load this module without it

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclasses.dataclass
class MemoryPlan:
    """The budget and what it allows (`describe` is the line `bloomlm serve` prints)."""

    bytes_per_token: int
    max_model_len: int
    budget: int
    budget_source: str
    max_sequences: int
    limited_by: str
    tensor_parallel: int = 1

    @property
    def bytes_per_sequence(self) -> int:
        return self.bytes_per_token * self.max_model_len

    def describe(self) -> str:
        each = f" on each of {self.tensor_parallel} ranks" if self.tensor_parallel > 1 else ""
        return (
            f"KV cache: {human(self.bytes_per_token)} per token x {self.max_model_len} tokens "
            f"= {human(self.bytes_per_sequence)} per sequence{each}; budget {human(self.budget)} "
            f"({self.budget_source}): up to {self.max_sequences} concurrent sequences "
            f"({self.limited_by})"
        )


def plan_memory(
    config: Any,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    *,
    kv_cache_memory: int | None = None,
    max_batch: int | None = None,
    tensor_parallel: int = 1,
) -> MemoryPlan:
    """How many sequences fit (on each rank of a model split `tensor_parallel` ways); a
    ValueError when not even one does."""
    per_token = kv_bytes_per_token(config, dtype, tensor_parallel)
    if kv_cache_memory is not None:
        budget, source = kv_cache_memory, "--kv-cache-memory"
    else:
        free = available_memory(device)
        shared = tensor_parallel if device.type == "cpu" else 1  # the ranks share the RAM
        budget = int(free * KV_MEMORY_FRACTION) // shared
        source = f"{KV_MEMORY_FRACTION:.0%} of {human(free)} available"
        if shared > 1:
            source += f" / {shared} processes"
    rows = budget // (per_token * max_model_len) - 1  # one row prefills the next prompt
    if rows < 1:
        raise ValueError(
            f"the KV cache budget {human(budget)} ({source}) does not hold two sequences of "
            f"max_model_len={max_model_len} tokens ({human(per_token * max_model_len)} each): "
            "lower --max-model-len or raise --kv-cache-memory"
        )
    limited_by = "the memory budget"
    if max_batch is not None and max_batch < rows:
        rows, limited_by = max_batch, "--max-batch"
    return MemoryPlan(per_token, max_model_len, budget, source, rows, limited_by, tensor_parallel)


__all__ = ["MemoryPlan", "available_memory", "kv_bytes_per_token", "parse_bytes", "plan_memory"]

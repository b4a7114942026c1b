"""Reading each rank's slices straight from safetensors files (bloomlm.checkpoint.SliceReader):
the slices equal the whole tensors' (single file, shards, bfloat16), `.bin` is refused with the
way out, and a process that reads 1/N of a checkpoint peaks at about 1/N of it plus one tensor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from bloomlm.checkpoint import SliceReader, save_state_dict
from bloomlm.errors import CheckpointError
from bloomlm.sharding_plan import ParamShard


def tensors(dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (12, 8), "a.bias": (12,), "b.weight": (8, 12), "c": (5, 6, 4)}
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


@pytest.mark.parametrize("shard_size, dtype", [("5GB", torch.float32), (400, torch.bfloat16)])
def test_slices_equal_the_whole_tensors(tmp_path, shard_size, dtype):
    whole = tensors(dtype)
    written = save_state_dict(whole, tmp_path, max_shard_size=shard_size)
    assert (len(written) > 2) == (shard_size == 400)  # several shards and an index
    reader = SliceReader(tmp_path)
    assert reader.shapes == {n: tuple(t.shape) for n, t in whole.items()}
    assert set(reader.dtypes.values()) == {dtype}
    for name, tensor in whole.items():
        for dim in range(tensor.dim()):
            ways = 2 if tensor.shape[dim] % 2 == 0 else 1
            shard = ParamShard(name, tuple(tensor.shape), "column", dim, ways)
            for rank in range(ways):
                part = reader.read(name, shard.local_slices(rank))
                assert torch.equal(part, tensor[shard.local_slices(rank)])
                assert part.is_contiguous() and part.untyped_storage().nbytes() == part.nbytes
        assert torch.equal(reader.read(name), tensor)


def test_bin_checkpoints_are_refused_with_the_way_out(tmp_path):
    save_state_dict(tensors(), tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match="bloomlm convert SRC DST --to safetensors"):
        SliceReader(tmp_path)


def test_a_damaged_file_is_named(tmp_path):
    save_state_dict(tensors(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        SliceReader(tmp_path)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from bloomlm.checkpoint import SliceReader
    from bloomlm.sharding_plan import ParamShard

    def status_mib(field):  # VmHWM: peak RSS since exec (ru_maxrss counts the parent's at fork)
        status = open("/proc/self/status").read()
        return int(status.split(field + ":")[1].split()[0]) / 1024

    folder, ways = sys.argv[1], int(sys.argv[2])
    reader = SliceReader(folder)
    before = status_mib("VmRSS")
    kept = []
    for i, (name, shape) in enumerate(sorted(reader.shapes.items())):
        shard = ParamShard(name, shape, "split", i % 2, ways)  # rows, then columns, ...
        kept.append(reader.read(name, shard.local_slices(0)))
    peak = status_mib("VmHWM")
    kept_mib = sum(t.nbytes for t in kept) / 2**20
    print(json.dumps({"growth": max(0.0, peak - before), "kept": kept_mib}))
    """
)


def test_peak_memory_is_a_share_plus_one_tensor(tmp_path):
    """8 tensors of 8 MiB (64 MiB): reading rank 0's quarter keeps 16 MiB and peaks near
    16 + 8 MiB; reading everything (one rank) peaks at the whole 64 MiB (the control)."""
    gen = torch.Generator().manual_seed(0)
    big = {f"w{i}": torch.randn(1024, 2048, generator=gen) for i in range(8)}
    save_state_dict(big, tmp_path)
    del big
    measured = {}
    for ways in (4, 1):
        command = [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), str(ways)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
        measured[ways] = json.loads(done.stdout)
    assert measured[4]["kept"] == 16
    assert measured[4]["growth"] <= 16 + 8 + 12  # share + one tensor + allocator slack (28 seen)
    assert measured[1]["growth"] >= 60  # the measurement sees a whole copy when there is one

"""Flax weights (`flax_model.msgpack`, sharded or not) as a PyTorch state dict with transformers'
parameter names: what `from_pretrained(folder, from_flax=True)` and `bloomlm convert` read from a
Flax-only folder. jax and flax are needed to read the file (`pip install "bloomlm[flax]"`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from bloomlm.config import BloomConfig


def flax_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """PyTorch tensors (transformers' names) from a folder holding Flax msgpack weights."""
    from bloomlm.flax import files, weights

    config = BloomConfig.from_pretrained(folder)
    arrays = weights.flax_to_torch(files.read_msgpack(folder), config)
    tensors = {}
    for name, array in arrays.items():
        if array.dtype.name == "bfloat16":  # NumPy has no bfloat16; go through float32
            as_float32 = np.asarray(array, dtype=np.float32)
            tensors[name] = torch.from_numpy(as_float32).to(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(np.array(array))  # a writable copy, as torch wants
    return tensors

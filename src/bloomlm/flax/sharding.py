"""The Flax model on a `jax.sharding.Mesh`: partition rules, sharded parameters read slice by slice
from the checkpoint files, and the cache and input shardings (GSPMD does the rest).

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    model = FlaxBloomForCausalLM.from_pretrained(path, mesh=mesh)

One table, `PARTITION_RULES`, maps every parameter path to a `PartitionSpec`: the plan of
`bloomlm.sharding_plan` in Flax's [in, out] kernel layout (heads and the MLP's 4h axis over
"model", the vocabulary over "model", LayerNorms, row-parallel biases and the small heads
replicated). With `scan_layers=True` a stacked leaf gets a leading unsplit layer axis. The cache
[B, S, H, D] is split by heads over "model" and by rows over "data"; inputs by rows over "data"
(when the batch divides; else replicated). XLA's SPMD partitioner inserts the all-reduces.

Parameters are made with `jax.make_array_from_callback`: each device's callback reads only its
slice from the safetensors files (`bloomlm.checkpoint.SliceReader`), so no process holds the whole
checkpoint. Flax msgpack files cannot be read by slices: they are read whole and then placed;
PyTorch `.bin` files are refused with a ValueError saying to convert them (as in torch).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bloomlm.checkpoint import SliceReader, _to_numpy
from bloomlm.checkpoint_names import BASE_PREFIX, fit_base_prefix
from bloomlm.config import BloomConfig
from bloomlm.flax import weights
from bloomlm.sharding_plan import DATA_AXIS, TENSOR_PARALLEL_AXIS, check_tensor_parallel

MODEL = TENSOR_PARALLEL_AXIS
Rules = tuple[tuple[str, P], ...]

# (pattern on the "/"-joined path, spec of the unstacked leaf); the first match wins.
PARTITION_RULES: Rules = (
    (r"(.*/)?word_embeddings/embedding", P(MODEL, None)),  # [V, C]: vocab-parallel
    (r".*/self_attention/query_key_value/kernel", P(None, MODEL)),  # [C, 3C]: whole heads
    (r".*/self_attention/query_key_value/bias", P(MODEL)),
    (r".*/self_attention/dense/kernel", P(MODEL, None)),  # [C, C]: row-parallel
    (r".*/mlp/dense_h_to_4h/kernel", P(None, MODEL)),  # [C, 4C]
    (r".*/mlp/dense_h_to_4h/bias", P(MODEL)),
    (r".*/mlp/dense_4h_to_h/kernel", P(MODEL, None)),  # [4C, C]: row-parallel
    (r"lm_head/kernel", P(None, MODEL)),  # [C, V]: vocab-parallel (untied head)
    (r".*", P()),  # LayerNorms, row-parallel biases, score / classifier / qa_outputs
)
CACHE_RULES: Rules = (
    (r".*/cached_(key|value)", P(DATA_AXIS, None, MODEL, None)),  # [B, S, H, D]
    (r".*", P()),  # cache_index
)


def check_mesh(mesh: Any, config: BloomConfig) -> None:
    """ValueError unless `mesh` is a Mesh with a "model" axis whose size divides the heads."""
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if MODEL not in mesh.axis_names:
        raise ValueError(
            f"the mesh has axes {tuple(mesh.axis_names)} but no {MODEL!r} axis: tensor "
            f"parallelism runs over the axis named {MODEL!r} (the batch over {DATA_AXIS!r}); "
            f'make it with Mesh(devices, ("{DATA_AXIS}", "{MODEL}"))'
        )
    check_tensor_parallel(config.n_head, mesh.shape[MODEL])


def spec_for(
    path: str, shape: tuple[int, ...], mesh: Mesh | AbstractMesh, rules: Rules = PARTITION_RULES
) -> P:
    """The rule's spec for one leaf: a leading None for a stacked (scan_layers) leaf, and an axis
    dropped where its mesh size does not divide the dimension (an uneven vocabulary or batch),
    or where the mesh has no such axis (no "data" axis)."""
    spec = next(spec for pattern, spec in rules if re.fullmatch(pattern, path))
    spec = (None,) * (len(shape) - len(spec)) + tuple(spec) if len(spec) else ()
    fitted = []
    for axis, size in zip(spec, shape):
        usable = axis in mesh.axis_names and size % mesh.shape[axis] == 0
        fitted.append(axis if usable else None)
    return P(*fitted)


def shardings_for(tree: Mapping, mesh: Mesh | AbstractMesh, rules: Rules = PARTITION_RULES) -> dict:
    """A NamedSharding for every leaf (arrays or ShapeDtypeStructs) of a nested dict."""
    flat = flatten_dict(dict(tree), sep="/")
    return unflatten_dict(
        {path: NamedSharding(mesh, spec_for(path, tuple(leaf.shape), mesh, rules))
         for path, leaf in flat.items()},
        sep="/",
    )  # fmt: skip


def place(tree: Mapping, mesh: Mesh, rules: Rules = PARTITION_RULES) -> dict:
    """`tree`'s arrays put on the mesh by the rules (for arrays already in memory)."""
    return jax.device_put(dict(tree), shardings_for(tree, mesh, rules))


def batch_sharding(mesh: Mesh, batch: int) -> NamedSharding:
    """Rows over "data" when the mesh has that axis and it divides the batch; else replicated."""
    divides = DATA_AXIS in mesh.axis_names and batch % mesh.shape[DATA_AXIS] == 0
    return NamedSharding(mesh, P(DATA_AXIS if divides else None))


def constrain_cache(cache: Any, mesh: Mesh | None) -> Any:
    """Inside jit: keep the cache split by heads and rows across steps."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, shardings_for(cache, mesh, CACHE_RULES))


# -- reading parameters slice by slice -------------------------------------------------------------


class CheckpointSlice:
    """A parameter still in the safetensors files: its Flax shape, and any slice of it on demand."""

    def __init__(self, reader: SliceReader, name: str, transpose: bool):
        self.reader, self.name, self.transpose = reader, name, transpose
        shape = reader.shapes[name]
        self.shape = tuple(reversed(shape)) if transpose else shape
        self.dtype = _to_numpy(_empty(reader.dtypes[name])).dtype

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        """`array[index]` in Flax's layout (a transposed kernel is read as its torch slice)."""
        slices = tuple(reversed(index)) if self.transpose else tuple(index)
        array = _to_numpy(self.reader.read(self.name, slices))
        return np.ascontiguousarray(array.T) if self.transpose else array


def _empty(dtype):
    import torch

    return torch.empty(0, dtype=dtype)


def read_weight_slices(
    folder: str | os.PathLike,
    config: BloomConfig,
    expected: set[tuple[str, ...]],
    use_safetensors: bool | None,
    unused_prefix: str,
) -> dict[tuple[str, ...], CheckpointSlice]:
    """{Flax path: CheckpointSlice} for the PyTorch safetensors checkpoint in `folder`, for a
    model whose (unstacked) paths are `expected`; names no path takes come back under
    `unused_prefix`, as `files.read_weights` returns them."""
    reader = SliceReader(folder, use_safetensors=use_safetensors)
    with_prefix = any(path[0] == BASE_PREFIX for path in expected)
    table = weights.name_table(config, with_prefix)
    by_name = {name: (path, transpose) for name, path, transpose in table}
    state = {}
    for name in reader.shapes:
        key = fit_base_prefix(name, with_prefix)
        if key in by_name and by_name[key][0] in expected:
            path, transpose = by_name[key]
            state[path] = CheckpointSlice(reader, name, transpose)
        elif not (key == "lm_head.weight" and config.tie_word_embeddings):
            state[(unused_prefix, name)] = CheckpointSlice(reader, name, False)
    return state


def make_sharded_params(
    flat: Mapping[tuple[str, ...], Any],
    mesh: Mesh,
    n_layer: int,
    scan_layers: bool,
    param_dtype: Any = None,
) -> dict:
    """The parameter tree on the mesh from flat unstacked leaves: CheckpointSlices are read per
    device with `jax.make_array_from_callback`; arrays in memory are placed; with scan_layers
    the layers' leaves become one stacked array, still read slice by slice."""
    layers: dict[str, dict[int, Any]] = {}
    arrays = {}
    for path, leaf in flat.items():
        joined = "/".join(path)
        layer = re.search(r"(?:^|/)h/(\d+)/", joined)
        if scan_layers and layer:
            stacked = re.sub(r"(^|/)h/\d+/", r"\1h/", joined)
            layers.setdefault(stacked, {})[int(layer[1])] = leaf
        else:
            arrays[joined] = _array(joined, leaf, mesh, param_dtype)
    for path, by_layer in layers.items():
        leaves = [by_layer[i] for i in range(n_layer)]
        arrays[path] = _stacked_array(path, leaves, mesh, param_dtype)
    return unflatten_dict(arrays, sep="/")


def _cast(array: np.ndarray, param_dtype: Any) -> np.ndarray:
    if param_dtype is None or not np.issubdtype(array.dtype, np.floating):
        return array
    return array.astype(param_dtype)


def _array(path: str, leaf: Any, mesh: Mesh, param_dtype: Any) -> jax.Array:
    shape = tuple(leaf.shape)
    sharding = NamedSharding(mesh, spec_for(path, shape, mesh))
    if isinstance(leaf, CheckpointSlice):
        return jax.make_array_from_callback(
            shape, sharding, _memoized(lambda index: _cast(leaf.read(index), param_dtype))
        )
    return jax.device_put(_cast(np.asarray(leaf), param_dtype), sharding)


def _stacked_array(path: str, leaves: list, mesh: Mesh, param_dtype: Any) -> jax.Array:
    shape = (len(leaves), *leaves[0].shape)
    sharding = NamedSharding(mesh, spec_for(path, shape, mesh))

    def read(index: tuple[slice, ...]) -> np.ndarray:
        layers, rest = index[0], tuple(index[1:])
        parts = []
        for leaf in leaves[layers]:
            part = leaf.read(rest) if isinstance(leaf, CheckpointSlice) else np.asarray(leaf)[rest]
            parts.append(_cast(part, param_dtype))
        return np.stack(parts)

    return jax.make_array_from_callback(shape, sharding, _memoized(read))


def _memoized(read: Callable[[tuple], np.ndarray]) -> Callable[[tuple], np.ndarray]:
    """Devices holding the same slice (replicas along "data") share one read of the files."""
    seen: dict[tuple, np.ndarray] = {}

    def cached(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in seen:
            seen[key] = read(index)
        return seen[key]

    return cached


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """{device: bytes of the shards it holds} over every array of `tree`."""
    totals: dict[Any, int] = {}
    for array in jax.tree_util.tree_leaves(tree):
        for shard in array.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals

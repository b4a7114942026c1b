"""Flax weights in a model folder, as transformers' Flax models read and write them.

    flax_model.msgpack                  the nested parameter tree (flax.serialization msgpack)
    flax_model-00001-of-00003.msgpack   or shards, each a flat {"transformer/h/0/...": array},
    flax_model.msgpack.index.json       with {"metadata": {"total_size": bytes},
                                              "weight_map": {path: shard}}

A folder with PyTorch weights instead is read through `bloomlm.checkpoint` and
`weights.torch_to_flax`. Every reader returns flat `{path tuple: array}` in transformers'
(unstacked) layout. A save is one commit (`bloomlm.files.folder_save`): the old files until every
new one is written, then the new ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from bloomlm import files as bloomlm_files
from bloomlm.checkpoint_names import (
    BASE_PREFIX,
    FLAX_WEIGHT_FILES,
    FLAX_WEIGHTS_INDEX_NAME,
    FLAX_WEIGHTS_NAME,
    fit_base_prefix,
    is_shard_file_name,
    shard_file_name,
)
from bloomlm.checkpoint_names import PYTORCH_WEIGHT_FILES as PYTORCH_WEIGHT_NAMES
from bloomlm.config import BloomConfig
from bloomlm.errors import CheckpointError, CheckpointNotFoundError
from bloomlm.flax import weights

logger = logging.getLogger("bloomlm.flax")

UNUSED_PYTORCH = "<pytorch>"  # first path element of PyTorch tensors no Flax parameter takes


def read_weights(
    folder: Path,
    config: BloomConfig,
    expected: set[tuple[str, ...]],
    from_pt: bool,
    use_safetensors: bool | None,
) -> dict[tuple[str, ...], np.ndarray]:
    """The checkpoint in `folder` for a model whose parameter paths are `expected`.

    msgpack unless `from_pt` (or there is none); PyTorch weights are converted, logging that once
    when `from_pt` was not asked for. The `transformer` prefix is added or stripped to suit the
    model.
    """
    has_flax = any((folder / name).is_file() for name in FLAX_WEIGHT_FILES)
    has_torch = any((folder / name).is_file() for name in PYTORCH_WEIGHT_NAMES)
    if has_flax and not from_pt:
        model_is_head = any(path[0] == BASE_PREFIX for path in expected)
        state = read_msgpack(folder)
        return {_fit_path(path, model_is_head): array for path, array in state.items()}
    if not has_torch:
        looked = ", ".join([*FLAX_WEIGHT_FILES, *PYTORCH_WEIGHT_NAMES])
        raise CheckpointNotFoundError(f"no weights in {folder}: looked for {looked}")
    if not from_pt:
        logger.warning(
            "%s has PyTorch weights and no %s: converting them to Flax in memory",
            folder,
            FLAX_WEIGHTS_NAME,
        )
    from bloomlm.checkpoint import load_numpy_state_dict

    state_dict = load_numpy_state_dict(folder, use_safetensors=use_safetensors)
    params, unused = weights.torch_to_flax(state_dict, config, expected)
    for name in unused:  # the caller reports them as unexpected
        params[(UNUSED_PYTORCH, name)] = state_dict[name]
    return params


def _fit_path(path: tuple[str, ...], model_is_head: bool) -> tuple[str, ...]:
    """A checkpoint path with `transformer` added or stripped to suit the model."""
    return tuple(fit_base_prefix("/".join(path), model_is_head, sep="/").split("/"))


def read_msgpack(folder: Path) -> dict[tuple[str, ...], np.ndarray]:
    """`flax_model.msgpack`, or every shard its index lists, as flat {path: array}."""
    state = {}
    for path in _msgpack_files(folder):
        try:
            tree = serialization.msgpack_restore(path.read_bytes())
        except Exception as err:  # msgpack raises many exception types for damaged bytes
            reason = f"{type(err).__name__}: {err}"
            message = f"{path} is truncated or corrupt ({reason}); re-download or re-save"
            raise CheckpointError(message) from err
        if not isinstance(tree, dict):
            raise CheckpointError(f"{path} does not hold a parameter tree")
        for key, array in flatten_dict(tree, sep="/").items():
            state[tuple(key.split("/"))] = np.asarray(array)
    return state


def _msgpack_files(folder: Path) -> list[Path]:
    if (folder / FLAX_WEIGHTS_NAME).is_file():
        return [folder / FLAX_WEIGHTS_NAME]
    index_path = folder / FLAX_WEIGHTS_INDEX_NAME
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{index_path} is truncated or corrupt ({err}); re-download or re-save"
        ) from err
    files = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(
                f"{index_path} names shard {name!r}, which is not a plain file name"
            )
        if not (folder / name).is_file():
            raise CheckpointNotFoundError(
                f"shard {name} listed in {index_path} is missing from {folder}"
            )
        files.append(folder / name)
    return files


def write_msgpack(
    folder: Path, flat: dict[str, np.ndarray], max_shard_bytes: int, extra: dict[str, bytes]
) -> None:
    """Write flat {"a/b/c": array} params (sharded past `max_shard_bytes`) plus `extra` files
    ({name: bytes}), as one commit (`bloomlm.files.folder_save`): the folder's Flax weight files
    of an earlier save (other shards, an index) are replaced with them; its other files stay."""
    shards = _split_shards(flat, max_shard_bytes)

    def owns(name: str) -> bool:
        return name in extra or is_flax_weight_file_name(name)

    with bloomlm_files.folder_save(folder, owns) as staging:
        for name, data in extra.items():
            bloomlm_files.write_bytes(staging / name, data)
        if len(shards) == 1:
            data = serialization.msgpack_serialize(unflatten_dict(shards[0], sep="/"))
            bloomlm_files.write_bytes(staging / FLAX_WEIGHTS_NAME, data)
        else:
            _write_shards(staging, shards, sum(a.nbytes for a in flat.values()))


def _write_shards(staging: Path, shards: list[dict[str, np.ndarray]], total_size: int) -> None:
    """transformers' shard files, each serialised in turn (one shard's bytes in memory), then
    their index."""
    names = [shard_file_name(FLAX_WEIGHTS_NAME, i + 1, len(shards)) for i in range(len(shards))]
    for name, shard in zip(names, shards):
        bloomlm_files.write_bytes(staging / name, serialization.msgpack_serialize(shard))
    weight_map = {path: name for name, shard in zip(names, shards) for path in shard}
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    bloomlm_files.write_text(staging / FLAX_WEIGHTS_INDEX_NAME, index_text)


def is_flax_weight_file_name(name: str) -> bool:
    """Whether `name` is a Flax weight file (msgpack, index or shard): what a save replaces."""
    return name in FLAX_WEIGHT_FILES or is_shard_file_name(name, FLAX_WEIGHTS_NAME)


def _split_shards(flat: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """transformers' greedy split in key order: a new shard when the next array would pass the
    limit."""
    shards, current, size = [], {}, 0
    for path, array in flat.items():
        if current and size + array.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[path] = array
        size += array.nbytes
    return [*shards, current]

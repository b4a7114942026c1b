"""PyTorch weight files in and out of a folder, named and laid out exactly as transformers 4.37
does.

One file (`model.safetensors` / `pytorch_model.bin`) or shards plus a JSON index
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`, and the same for `.bin`):

    {"metadata": {"total_size": <bytes>}, "weight_map": {"<parameter name>": "<shard file>"}}

Reading never runs pickled code (`torch.load(weights_only=True)`), and a damaged file is reported by
name. A save is one commit (`bloomlm.files.folder_save`): the folder shows the old weights until
every new file is written and synced, then the new ones, never a mix; a failed save leaves it as it
was. This module knows files, not models: matching names to modules is the caller's job.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from bloomlm import files

# The file names live in bloomlm.checkpoint_names (the Flax side uses them); importable here too.
from bloomlm.checkpoint_names import (  # noqa: F401 (re-exported)
    FLAX_WEIGHTS_NAME,
    QUANTIZED_WEIGHTS_NAMES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TF_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    is_shard_file_name,
    shard_file_name,
)
from bloomlm.checkpoint_names import PYTORCH_WEIGHT_FILES as WEIGHT_FILE_CANDIDATES
from bloomlm.errors import CheckpointError, CheckpointNotFoundError
from bloomlm.files import atomic_path, atomic_write_text, parse_size  # noqa: F401 (re-exported)

# -- saving ----------------------------------------------------------------------------------------


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    *,
    safe_serialization: bool = True,
    max_shard_size: int | str = "5GB",
    weights_name: str | None = None,
) -> list[Path]:
    """Write `state_dict` into `folder` as transformers 4.37 `save_pretrained` does; return the
    files written.

    `weights_name` replaces the file name (a quantized save: `model.int8.safetensors`, its shards
    and index named after it as transformers names model.safetensors'); safetensors only.

    Shards are filled in key order and a new one starts when the next tensor would pass
    `max_shard_size` (a tensor larger than that gets a shard of its own). Tied duplicates should be
    removed by the caller; tensors that still share memory are copied so each is written in full.
    The save is one commit (`bloomlm.files.folder_save`): the folder's PyTorch weight files are
    replaced all at once, those of an earlier save that this one does not write included (they
    would disagree, and `model.safetensors` would shadow a fresh `.bin`); other files stay.
    """
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save weights into {target}: it is a file, a folder is needed")
    tensors = _standalone_tensors(state_dict)
    if weights_name is not None and not safe_serialization:
        raise ValueError(f"{weights_name} is written as safetensors only (safe_serialization=True)")
    default_name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    weights_name = weights_name or default_name
    shards = _split_into_shards(tensors, parse_size(max_shard_size), weights_name)
    index_name = weights_name + ".index.json"
    names = [*shards, index_name] if len(shards) > 1 else list(shards)
    with files.folder_save(target, is_weight_file_name) as staging:
        for name, shard in shards.items():
            _write_weight_file(shard, staging / name, safe_serialization)
        if len(shards) > 1:
            index_text = json.dumps(_build_index(shards), indent=2, sort_keys=True) + "\n"
            files.write_text(staging / index_name, index_text)
    return [target / name for name in names]


def _standalone_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor contiguous and owning exactly its own storage, copying only those that do not.

    safetensors refuses tensors that share memory or are not contiguous, and torch.save would write
    a view's whole base storage (or one storage twice when shards split it).
    """
    seen_storages: set[tuple[torch.device, int]] = set()
    tensors = {}
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"state_dict must map str names to tensors; got {name!r}: {type(tensor).__name__}"
            )
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        owns_storage = (
            tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and storage.nbytes() == tensor.numel() * tensor.element_size()
        )
        key = (tensor.device, storage.data_ptr())
        if not owns_storage or (key in seen_storages and storage.nbytes() > 0):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen_storages.add((tensor.device, tensor.untyped_storage().data_ptr()))
        tensors[name] = tensor
    return tensors


def _split_into_shards(
    tensors: dict[str, torch.Tensor], max_shard_bytes: int, weights_name: str
) -> dict[str, dict[str, torch.Tensor]]:
    """{file name: tensors}; one file named `weights_name`,
    or transformers' numbered shard names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shard_bytes + size > max_shard_bytes and shards[-1]:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    if len(shards) == 1:
        return {weights_name: shards[0]}
    names = [shard_file_name(weights_name, i, len(shards)) for i in range(1, len(shards) + 1)]
    return dict(zip(names, shards))


def _build_index(shards: dict[str, dict[str, torch.Tensor]]) -> dict:
    total_size = sum(
        t.numel() * t.element_size() for shard in shards.values() for t in shard.values()
    )
    weight_map = {name: file_name for file_name, shard in shards.items() for name in shard}
    return {"metadata": {"total_size": total_size}, "weight_map": weight_map}


def _write_weight_file(
    tensors: dict[str, torch.Tensor], path: Path, safe_serialization: bool
) -> None:
    if safe_serialization:
        # transformers refuses safetensors files without format metadata.
        safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
        files.wrote(path)
    else:
        # Through a file object, torch's write errors are OSErrors (with a path, a RuntimeError
        # without the cause); folder_save finds a full disk behind torch's own cleanup error.
        with files.new_file(path) as file:
            torch.save(tensors, file)


def is_weight_file_name(name: str) -> bool:
    """Whether `name` is a PyTorch weight file of a transformers folder (single file, index or
    shard, safetensors or .bin): the files a weights save replaces."""
    singles = (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, *QUANTIZED_WEIGHTS_NAMES.values())
    shard = any(is_shard_file_name(name, weights) for weights in singles)
    return name in singles or name in [single + ".index.json" for single in singles] or shard


# -- finding ---------------------------------------------------------------------------------------


def find_weight_files(
    folder: str | os.PathLike, use_safetensors: bool | None = None, weights_name: str | None = None
) -> list[Path]:
    """The weight files to read from `folder`: one file, or the shards its index lists.

    Search order is transformers': model.safetensors, its index, pytorch_model.bin, its index.
    `use_safetensors=True` accepts only safetensors, `False` only `.bin`. `weights_name` looks for
    that file and its index instead (a quantized checkpoint: `model.int8.safetensors`).
    """
    files, _ = _locate_weights(Path(folder), use_safetensors, weights_name)
    return files


def read_index(index_path: str | os.PathLike) -> dict[str, str]:
    """The `weight_map` ({parameter name: shard file}) of a sharded checkpoint's index JSON."""
    path = Path(index_path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"index file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"index file {path} is truncated or corrupt ({err}); re-download or re-save"
        ) from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"index file {path} has no valid 'weight_map' ({{parameter name: shard file}}); "
            "re-download or re-save"
        )
    return weight_map


def _candidate_names(use_safetensors: bool | None, weights_name: str | None) -> tuple[str, ...]:
    if weights_name is not None:
        return () if use_safetensors is False else (weights_name, weights_name + ".index.json")
    if use_safetensors is None:
        return WEIGHT_FILE_CANDIDATES
    return WEIGHT_FILE_CANDIDATES[:2] if use_safetensors else WEIGHT_FILE_CANDIDATES[2:]


def _locate_weights(
    folder: Path, use_safetensors: bool | None, weights_name: str | None = None
) -> tuple[list[Path], dict[str, str] | None]:
    """(files to read, weight_map if sharded) for the first candidate present."""
    if not folder.is_dir():
        kind = (
            "a file, not a folder (use load_state_dict_file)" if folder.exists() else "not a folder"
        )
        raise CheckpointNotFoundError(
            f"{folder} is {kind}; looked for {', '.join(WEIGHT_FILE_CANDIDATES)}"
        )
    candidates = _candidate_names(use_safetensors, weights_name)
    if not candidates:
        raise CheckpointNotFoundError(
            f"{weights_name} in {folder} is safetensors, but use_safetensors=False was asked for"
        )
    for name in candidates:
        path = folder / name
        if path.is_file():
            if not name.endswith(".index.json"):
                return [path], None
            weight_map = read_index(path)
            return _shard_paths(path, weight_map), weight_map
        if path.is_symlink() or path.exists():  # a device, a folder, a dangling link: say which
            link = f", a link to {os.readlink(path)}" if path.is_symlink() else ""
            raise CheckpointError(f"weight file {path} is not a regular file{link}")
    raise CheckpointNotFoundError(_nothing_found_message(folder, candidates, use_safetensors))


def _shard_paths(index_path: Path, weight_map: dict[str, str]) -> list[Path]:
    shard_names = sorted(set(weight_map.values()))
    if not shard_names:
        raise CheckpointError(f"index file {index_path} lists no shards; re-download or re-save")
    paths = []
    for name in shard_names:
        # Shards sit beside their index; a path in the index must not reach elsewhere on the disk.
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(
                f"index file {index_path} names shard {name!r}, which is not a plain file name"
            )
        path = index_path.parent / name
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"shard {name} listed in {index_path} is missing from {index_path.parent}; "
                "the download is incomplete (re-download it)"
            )
        paths.append(path)
    return paths


def _nothing_found_message(
    folder: Path, candidates: tuple[str, ...], use_safetensors: bool | None
) -> str:
    message = f"no weights in {folder}: looked for {', '.join(candidates)}"
    if use_safetensors is not None:
        message += f" (use_safetensors={use_safetensors})"
    others = [name for name in (FLAX_WEIGHTS_NAME, TF_WEIGHTS_NAME) if (folder / name).is_file()]
    if FLAX_WEIGHTS_NAME in others:
        message += (
            f"; only Flax weights found ({FLAX_WEIGHTS_NAME}): load them with the Flax classes"
        )
    elif others:
        message += (
            f"; only TensorFlow weights found ({TF_WEIGHTS_NAME}), which bloomlm does not read"
        )
    elif any((folder / name).is_file() for name in QUANTIZED_WEIGHTS_NAMES.values()):
        message += (
            "; only quantized weights found (model.int8/fp16.safetensors), but config.json has no "
            "'quantization' entry naming their format: restore the config bloomlm saved with them"
        )
    elif use_safetensors is not None and any(
        (folder / n).is_file() for n in WEIGHT_FILE_CANDIDATES
    ):
        message += "; weights of the other format are present"
    return message


# -- loading ---------------------------------------------------------------------------------------


def load_state_dict(
    folder: str | os.PathLike,
    *,
    use_safetensors: bool | None = None,
    device: str | torch.device = "cpu",
    weights_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `folder` (one file or every shard), by parameter name."""
    files, weight_map = _locate_weights(Path(folder), use_safetensors, weights_name)
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        state_dict.update(load_state_dict_file(path, device=device))
    if weight_map is not None:
        _check_index_covered(weight_map, state_dict, files[0].parent)
    return state_dict


def load_state_dict_file(
    path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of one `.safetensors` or `torch.save`d `.bin` file (memory-mapped when
    possible)."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointNotFoundError(f"weight file {file} does not exist")
    target_device = torch.device(
        device
    )  # a bad device name fails here, not as "corrupt file" below
    if file.suffix == ".safetensors":
        tensors = _read_safetensors(file)
    else:
        tensors = _read_torch_pickle(file)
    if target_device.type != "cpu":
        tensors = {name: tensor.to(target_device) for name, tensor in tensors.items()}
    return tensors


def iter_state_dict(
    folder: str | os.PathLike,
    *,
    use_safetensors: bool | None = None,
    weights_name: str | None = None,
) -> Iterator[tuple[str, torch.Tensor | StreamedTensor]]:
    """The checkpoint's tensors one at a time, for loaders that transform each as it arrives
    (quantizing, casting), so memory never holds the float checkpoint.

    `load_state_dict` maps whole files, and every page of a mapping that was read stays resident
    until the file is closed: a loader that converts each tensor would still peak at the full float
    size. Here a safetensors entry comes as a `StreamedTensor`, read in blocks of rows with plain
    reads into one small reused buffer (no stream of large allocations to fragment the heap either).
    `.bin` entries come as tensors. `row_blocks` walks either kind. A StreamedTensor is valid until
    the next item is taken.
    """
    files, weight_map = _locate_weights(Path(folder), use_safetensors, weights_name)
    seen: set[str] = set()
    for path in files:
        if path.suffix != ".safetensors":
            tensors = load_state_dict_file(path)
            seen.update(tensors)
            yield from tensors.items()
            continue
        for name, tensor in _stream_safetensors(path):
            seen.add(name)
            yield name, tensor
    if weight_map is not None:
        _check_index_covered(weight_map, dict.fromkeys(seen), files[0].parent)


def row_blocks(
    tensor: torch.Tensor | StreamedTensor, max_bytes: int = 32 * 2**20
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block of rows) pairs covering `tensor`,
    each block at most `max_bytes` (at least a row)."""
    if isinstance(tensor, StreamedTensor):
        yield from tensor.row_blocks(max_bytes)
        return
    rows = tensor.shape[0] if tensor.dim() else 1
    row_bytes = max(
        1, tensor[0].numel() * tensor.element_size() if tensor.dim() else tensor.element_size()
    )
    step = max(1, max_bytes // row_bytes)
    for start in range(0, rows, step):
        yield start, (tensor[start : start + step] if tensor.dim() else tensor)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class StreamedTensor:
    """One safetensors entry not yet read: its shape and dtype, and its rows on demand."""

    def __init__(
        self,
        path: Path,
        file,
        offset: int,
        shape: list[int],
        dtype: torch.dtype,
        buffer: torch.Tensor,
    ):
        self.path, self._file, self._offset = path, file, offset
        self.shape, self.dtype, self._buffer = tuple(shape), dtype, buffer

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def row_blocks(self, max_bytes: int) -> Iterator[tuple[int, torch.Tensor]]:
        rows = self.shape[0] if self.shape else 1
        row_shape = self.shape[1:]
        row_bytes = math.prod(row_shape) * self.dtype.itemsize
        step = max(1, min(max_bytes, self._buffer.numel()) // max(1, row_bytes))
        for start in range(0, rows, step):
            count = min(step, rows - start)
            nbytes = count * row_bytes
            view = self._buffer[:nbytes]
            try:
                self._file.seek(self._offset + start * row_bytes)
                if self._file.readinto(view.numpy()) != nbytes:
                    raise ValueError(f"the file ends inside a tensor of shape {list(self.shape)}")
            except (OSError, ValueError) as err:
                raise CheckpointError(_corrupt_message(self.path, err)) from err
            block = view.view(self.dtype)
            yield start, block.view(count, *row_shape) if self.shape else block.view(())


# Over 40 lines: the header checks and the block reads of one file, in file order.
def _stream_safetensors(
    path: Path, buffer_bytes: int = 32 * 2**20
) -> Iterator[tuple[str, StreamedTensor]]:
    # The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    # data_offsets}}, then the raw bytes, offsets counted from the end of the header.
    try:
        file = open(path, "rb")
    except OSError as err:
        raise CheckpointError(_corrupt_message(path, err)) from err
    with file:
        try:
            (header_length,) = struct.unpack("<Q", file.read(8))
            if header_length > path.stat().st_size - 8:  # checked before reading that many bytes
                raise ValueError(f"its header length {header_length} passes the end of the file")
            header = json.loads(file.read(header_length))
            entries = {name: info for name, info in header.items() if name != "__metadata__"}
            for name, info in entries.items():
                begin, end = info["data_offsets"]
                expected = math.prod(info["shape"]) * _SAFETENSORS_DTYPES[info["dtype"]].itemsize
                if end - begin != expected or 8 + header_length + end > path.stat().st_size:
                    raise ValueError(
                        f"tensor {name} does not fit the file (offsets {begin}..{end})"
                    )
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            raise CheckpointError(_corrupt_message(path, err)) from err
        # Blocks are whole rows, so the buffer must hold at least the widest row.
        widest_row = max((math.prod(i["shape"][1:]) * _SAFETENSORS_DTYPES[i["dtype"]].itemsize
                          for i in entries.values()), default=0)  # fmt: skip
        largest = max(
            (i["data_offsets"][1] - i["data_offsets"][0] for i in entries.values()), default=0
        )
        buffer = torch.empty(min(largest, max(buffer_bytes, widest_row)), dtype=torch.uint8)
        for name, info in entries.items():
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            yield (
                name,
                StreamedTensor(
                    path,
                    file,
                    8 + header_length + info["data_offsets"][0],
                    info["shape"],
                    dtype,
                    buffer,
                ),
            )


class SliceReader:
    """Parts of a safetensors checkpoint's tensors, read without the rest (tensor parallelism).

    `shapes` gives every tensor's whole shape from the file headers; `read(name, slices)` reads
    only `tensor[slices]`: each rank (each JAX device) of an N-way split asks for its own part, so
    a process never holds the whole checkpoint. Sharded checkpoints work the same (each name is
    read from its shard). A file is opened per read and its mapping dropped with it, so the pages
    a read touched are not kept either: peak memory is what was kept plus one tensor's pages
    (all of them when the slice cuts every row, as a row-parallel weight's does).

    `.bin` checkpoints are pickles that can only be read whole: a ValueError says to convert them.
    """

    def __init__(self, folder: str | os.PathLike, *, use_safetensors: bool | None = None):
        files, weight_map = _locate_weights(Path(folder), use_safetensors)
        if any(path.suffix != ".safetensors" for path in files):
            raise ValueError(
                f"{folder} holds PyTorch .bin weights, which can only be read whole, not one "
                "slice per rank; convert them once with `bloomlm convert SRC DST --to "
                "safetensors` and load DST"
            )
        self._files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in files:
            for name, (shape, dtype) in _safetensors_header(path).items():
                self._files[name] = path
                self.shapes[name], self.dtypes[name] = shape, dtype
        if weight_map is not None:
            _check_index_covered(weight_map, self.shapes, files[0].parent)

    def read(self, name: str, slices: tuple[slice, ...] | None = None) -> torch.Tensor:
        """`tensor[slices]` (the whole tensor without `slices`), a new contiguous tensor."""
        path = self._files[name]
        try:
            with safetensors.safe_open(str(path), framework="pt") as reader:
                part = reader.get_slice(name)[slices] if slices else reader.get_tensor(name)
                # A view of the file's mapping: copy the part so the mapping goes with the view.
                return part.clone(memory_format=torch.contiguous_format)
        except Exception as err:  # SafetensorError, OSError, ...: the file is unusable
            raise CheckpointError(_corrupt_message(path, err)) from err


def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of a safetensors file, from its header alone."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as reader:
            entries = {}
            for name in reader.keys():
                part = reader.get_slice(name)
                entries[name] = (tuple(part.get_shape()), _SAFETENSORS_DTYPES[part.get_dtype()])
            return entries
    except Exception as err:
        raise CheckpointError(_corrupt_message(path, err)) from err


def load_numpy_state_dict(
    folder: str | os.PathLike, *, use_safetensors: bool | None = None
) -> dict[str, np.ndarray]:
    """Like `load_state_dict`, as NumPy arrays (for the Flax side).

    Read through torch, which is always installed: `.numpy()` shares memory with the mapped file (no
    copy), and it also serves `.bin` files and bfloat16, which NumPy lacks: bfloat16 comes back as
    `ml_dtypes.bfloat16` when that package (a jax dependency) is installed, else as float32 (exact).
    """
    return {
        name: _to_numpy(tensor)
        for name, tensor in load_state_dict(folder, use_safetensors=use_safetensors).items()
    }


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    try:
        import ml_dtypes
    except ImportError:
        return tensor.float().numpy()
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        # safe_open maps the file; tensors are read from the mapping without an extra full-file
        # buffer.
        with safetensors.safe_open(str(path), framework="pt") as reader:
            return {name: reader.get_tensor(name) for name in reader.keys()}
    except (
        Exception
    ) as err:  # SafetensorError, OSError, ...: whatever the cause, the file is unusable
        raise CheckpointError(_corrupt_message(path, err)) from err


def _read_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: the unpickler only rebuilds tensors and plain containers, so no code in the
    # file ever runs. Zip-format files (torch >= 1.6) are memory-mapped; older ones cannot be and
    # are read whole.
    mmap = _starts_like_zip(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Detected pickle protocol"
            )  # noise on foreign pickles
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} was refused by the safe (weights_only) unpickler: {_unpickler_reason(err)}. "
            "It is truncated or corrupt, or holds objects other than tensors, which bloomlm never "
            "executes; re-download it, or re-save it as a plain state dict or as safetensors"
        ) from err
    except Exception as err:  # RuntimeError from the zip reader, EOFError, OSError, ...
        raise CheckpointError(_corrupt_message(path, err)) from err
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise CheckpointError(
            f"{path} holds a {type(loaded).__name__}, not a state dict "
            "(a dict of parameter names to tensors)"
        )
    return loaded


def _starts_like_zip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"PK\x03\x04"


def _unpickler_reason(err: Exception) -> str:
    """The specific part of torch's long weights_only error (e.g. 'Unsupported global: ...
    posix.system')."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    boilerplate = (
        "Weights only load failed",
        "Check the documentation",
        "Please file an issue",
        "(1)",
        "(2)",
    )
    lines = [line.strip() for line in text.splitlines()]
    details = [line for line in lines if line and not line.startswith(boilerplate)]
    # Drop torch's advice to allow-list globals: bloomlm offers no way to do that, by design.
    return details[0].split(". Please use", 1)[0].rstrip(".") if details else type(err).__name__


def _corrupt_message(path: Path, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"weight file {path} is truncated or corrupt ({reason}); re-download it or save it again"


def _check_index_covered(
    weight_map: dict[str, str], state_dict: dict[str, torch.Tensor], folder: Path
) -> None:
    missing = [name for name in weight_map if name not in state_dict]
    if missing:
        shown = ", ".join(f"{name} (in {weight_map[name]})" for name in missing[:5])
        raise CheckpointError(
            f"the index in {folder} lists {len(missing)} tensor(s) its shards do not hold: "
            f"{shown}; the shards and the index come from different saves (re-download or re-save)"
        )

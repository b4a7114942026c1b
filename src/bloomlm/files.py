"""File helpers, framework-free: atomic writes (config, tokenizer and weight saving all use them) and
sizes such as max_shard_size="5GB".

Each file goes to a temporary name in the same folder and is renamed into place: readers see the old
file or the new one, never half of one, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object stored in `path`; ValueError naming the file when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(content).__name__}")
    return content


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.

    The temporary file lives in the same folder so `os.replace` is an atomic rename on one file system:
    readers see the old file or the new one, never half of one.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        _flush_to_disk(temporary)
        # Some writers (safetensors) create private 0600 files; give the file the mode a plain open()
        # would, as transformers' files have.
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _flush_to_disk(path: Path) -> None:
    # Without fsync a crash right after the rename can leave an empty file under the final name.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return  # missing (os.replace will say so) or not openable for fsync; the rename stays atomic
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


_SIZE_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or digits plus a unit, read as transformers' `convert_file_size_to_int`.

    KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024; a lowercase final "b" ("5Gb") means bits.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got {size}")
        return size
    if isinstance(size, str):
        text = size.strip()
        for unit, factor in _SIZE_UNITS.items():
            number = text[: -len(unit)]
            if text.upper().endswith(unit) and number.isdigit() and int(number) > 0:
                # Only the decimal units take the bits reading, as in transformers.
                is_bits = not unit.endswith("IB") and text.endswith("b")
                return int(number) * factor // 8 if is_bits else int(number) * factor
    raise ValueError(
        f"size {size!r} is not understood; use a positive int of bytes or digits and a unit, "
        "e.g. '5GB', '200MB', '10KiB' (KB/MB/GB = 1000-based, KiB/MiB/GiB = 1024-based)"
    )


# -- staging folders: build a whole folder aside, then rename it into place ------------------------
# Moved as they were from finetune.py; the crash-safe saves issue replaces them with a commit step.


def staging_dir(parent: Path, name: str) -> Path:
    """A new hidden folder `parent/.name.tmp-XXXX` to build `name` in before renaming it into place.

    On the same file system as the target, so the rename is atomic; mode 0755 like a folder made by
    mkdir (mkdtemp's 0700 would make the renamed model folder private).
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    staging.chmod(0o755)
    return staging


def _swap_into_place(new_dir: Path, target: Path) -> None:
    """Replace `target` by the complete folder `new_dir`.

    Two renames (target -> a hidden `.old-PID` name, new_dir -> target); the old folder is removed
    afterwards.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(new_dir, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

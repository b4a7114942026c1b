"""Atomic file writes, framework-free (config, tokenizer and weight saving all use them).

Each file goes to a temporary name in the same folder and is renamed into place: readers see the old
file or the new one, never half of one, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


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

"""File helpers, framework-free: the one commit point every save goes through (`folder_save`), the
loaders' guard against reading a folder while it is committed (`consistent_load`), single-file
atomic writes, JSON objects, and sizes such as max_shard_size="5GB".

Saving a folder is all or nothing
---------------------------------
Every writer saves through `folder_save(folder, owns)`: PyTorch and Flax `save_pretrained` (sharded
or not), the config, tokenizer and generation config, `bloomlm convert`, and finetune's best model
and training state. `owns(name)` says which entries of the folder the writer replaces; every other
entry (the tokenizer's files when a model saves, a user's own files) is kept as it was.

1. Lock. An exclusive `fcntl.flock` on `.<name>.bloomlm-lock` beside the folder serialises the
   writers of one folder (threads too: each save opens its own descriptor). A second writer waits up
   to BLOOMLM_SAVE_LOCK_TIMEOUT seconds (default 600) and then raises TimeoutError naming the folder
   and the process holding it. The kernel drops the lock of a killed process.
2. Journal. The lock file is also the save's journal: the name of each folder the save is about to
   make is appended and fsynced first. The next save to the folder (under the lock) removes the
   listed folders that still exist and carry bloomlm's name pattern
   (`.<name>.bloomlm-staging-<16 hex>`, `.<name>.bloomlm-old-<16 hex>`): the leftovers of an
   interrupted save, and never anything else.
3. Stage. A sibling folder `.<name>.bloomlm-staging-<hex>` (so on the same file system) receives
   hard links to the entries the writer does not own (copies where a link is impossible; folders
   are linked file by file), then the writer's new files. Each file is fsynced once written, then
   the staging folder's directories.
4. Commit, one step. `renameat2(RENAME_EXCHANGE)` swaps the staging folder and the folder (a plain
   rename when there was no folder), and the parent is fsynced. Before that step the folder is the
   old checkpoint, after it the new one; nothing in between is visible.
5. The staging name now holds the old folder: it is removed, the journal emptied and the lock file
   deleted (a waiting writer notices and locks the next lock file, so deleting it is safe).

The folder is a new directory after a save: a process working inside it is moved into the new one
(this process; `save_pretrained(".")` works), files another program opened there keep their data
(hard links share it), but a file another program creates in the folder while a save runs is not
carried over.

An error before the commit (a full disk says "no space left on device") removes the staging folder:
the folder is as it was. Fallbacks:
- No RENAME_EXCHANGE (not Linux/glibc, or a file system without it): two renames, the folder to
  `.<name>.bloomlm-old-<hex>` (journalled first), then staging to the folder. The second rename is
  the commit point. A crash between the two leaves no folder; the next save, and the next load
  (which finds the folder missing and its lock file present), renames the old folder back under
  the lock: the old checkpoint again.
- The folder is a mount point, or its parent is read-only: no sibling can be made. The staging
  folder is made inside the folder (`.bloomlm-staging-<hex>`, journal in `.bloomlm-lock` there) and
  its entries are renamed into place one by one: each file is replaced atomically, the save as a
  whole is not. A warning says so.
- No file locks (Windows has no fcntl; some network file systems refuse flock, with a warning):
  each save still commits in one step, but two writers of one folder are not kept apart.

Loading. Loaders decorated with `consistent_load` read the folder by path and compare its identity
(device, inode, ctime, mtime) before and after: a commit in between changes it, and the load is done
again (up to 5 times), so a load overlapping a save returns exactly the old or exactly the new
checkpoint. Memory-mapped weights stay valid after their old folder is removed. (Reading through one
directory descriptor was the alternative; it needs every reader to take the descriptor and still
fails once the old folder's files are removed, so the check-and-retry is simpler and as strict.)

Nested saves: a writer called on a folder that is, or lies inside, the staging folder of a save in
progress in this process (the model that convert or finetune saves) writes there directly, after
removing the entries it owns; the outer save commits everything at once.

`crash_point(label)` marks every step (after each file written, each fsync, each rename); the tests
and benchmarks/kill_campaign.py stop the process at the N-th one (`set_crash_plan`, or
BLOOMLM_CRASH_AT=N) or inject a full disk there, to prove the promise.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import random
import re
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from bloomlm.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: writers are not serialised there (see folder_save)
    fcntl = None

logger = logging.getLogger("bloomlm")

LOCK_SUFFIX = ".bloomlm-lock"
_TOKEN = r"[0-9a-f]{16}"
_LOCK_TIMEOUT_ENV = "BLOOMLM_SAVE_LOCK_TIMEOUT"
_DEFAULT_LOCK_TIMEOUT = 600.0
_LOAD_ATTEMPTS = 12  # reads of a folder that keeps being replaced, before giving up
_RENAME_EXCHANGE = 2  # linux/fs.h
# Tests set this to exercise the two-rename fallback on a system that has RENAME_EXCHANGE.
_use_exchange = os.environ.get("BLOOMLM_SAVE_NO_EXCHANGE", "") in ("", "0")


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object stored in `path`; ValueError naming the file when it is not valid JSON or
    not an object."""
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
_FILE_MODE = 0o666 & ~_UMASK


# -- crash points (test hook) ------------------------------------------------------------------


class CrashPlan:
    """Where a save stops: at the `at`-th crash point (from 1), by SIGKILL (`action="kill"`) or by
    raising OSError(ENOSPC) as a full disk would (`action="enospc"`). `seen` lists the labels
    passed, in order; with `at=None` nothing stops and the labels are only recorded."""

    def __init__(self, at: int | None = None, action: str = "kill") -> None:
        if action not in ("kill", "enospc"):
            raise ValueError(f"action must be 'kill' or 'enospc', got {action!r}")
        self.at, self.action, self.seen = at, action, []


_crash_plan: CrashPlan | None = None


def set_crash_plan(plan: CrashPlan | None) -> CrashPlan | None:
    """Install `plan` for this process (None removes it); the plan, for its `seen` list."""
    global _crash_plan
    _crash_plan = plan
    return plan


def crash_point(label: str) -> None:
    """A step of a save where a test may stop this process (see CrashPlan); free without a plan."""
    plan = _crash_plan
    if plan is None:
        return
    plan.seen.append(label)
    if plan.at is not None and len(plan.seen) == plan.at:
        if plan.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {label})")


if os.environ.get("BLOOMLM_CRASH_AT", "").isdigit():  # for subprocesses (the CLI) in tests
    set_crash_plan(CrashPlan(int(os.environ["BLOOMLM_CRASH_AT"])))


# -- writing files inside a save ---------------------------------------------------------------


def wrote(path: str | os.PathLike) -> None:
    """Tell the save that `path` is complete: plain-file permissions, fsync, crash point.

    Some writers (safetensors) create private 0600 files; transformers' files have the mode a
    plain open() gives.
    """
    os.chmod(path, _FILE_MODE)
    crash_point(f"wrote {Path(path).name}")
    _fsync(path)
    crash_point(f"fsync {Path(path).name}")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Create `path` (it must not exist) holding `data`, inside a save."""
    with open(path, "xb") as file:
        file.write(data)
    wrote(path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Create `path` (it must not exist) holding `text` as UTF-8, inside a save."""
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def new_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A new binary file to fill (e.g. with torch.save, whose errors stay OSErrors through a file
    object), completed with `wrote` on success."""
    with open(path, "xb") as file:
        yield file
    wrote(path)


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    except OSError as err:
        # Some file systems refuse fsync on a directory; the data is still written by then.
        if not directory or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


# -- one commit point per save -----------------------------------------------------------------


def owns_names(*names: str) -> Callable[[str], bool]:
    """An `owns` predicate for a writer of exactly these file names."""
    owned = frozenset(names)
    return owned.__contains__


def owns_everything(name: str) -> bool:
    """The `owns` predicate of a writer that replaces the whole folder."""
    return True


_active_staging: set[str] = set()  # staging folders of saves in progress in this process
_active_lock = threading.Lock()


@contextlib.contextmanager
def folder_save(
    folder: str | os.PathLike, owns: Callable[[str], bool], *, require_empty: bool = False
) -> Iterator[Path]:
    """Yield a folder to write a save's new files into; on success they replace `folder`'s entries
    that `owns(name)` is true for, all in one step (see the module docstring). Files are created
    there with `write_bytes`/`write_text`/`new_file` or reported with `wrote`.

    On an error nothing changes in `folder`; a full disk raises OSError(ENOSPC) saying "no space
    left on device". `require_empty`: FileExistsError if `folder` holds anything once locked.
    """
    target = _save_target(folder)
    if _inside_active_staging(target):
        target.mkdir(parents=True, exist_ok=True)
        _remove_entries(target, owns)
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    save = _FolderSave(target, owns, beside=_can_stage_beside(target))
    with save.locked():
        if require_empty and target.exists():
            if any(not _is_bloomlm_artefact(name) for name in os.listdir(target)):
                raise FileExistsError(f"{target} already exists and is not empty")
        try:
            staging = save.stage()
            with _registered(staging):
                yield staging
            save.commit()
        except BaseException:
            save.abandon()
            raise


def _save_target(folder: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(folder))
    if target.is_symlink():  # keep the user's link; replace the folder it points to
        target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save into {target}: it is a file, a folder is needed")
    return target


def _inside_active_staging(target: Path) -> bool:
    with _active_lock:
        return any(str(path) in _active_staging for path in (target, *target.parents))


@contextlib.contextmanager
def _registered(staging: Path) -> Iterator[None]:
    with _active_lock:
        _active_staging.add(str(staging))
    try:
        yield
    finally:
        with _active_lock:
            _active_staging.discard(str(staging))


def _can_stage_beside(target: Path) -> bool:
    """Whether a sibling folder can be made and renamed over `target` (not a mount point, and
    the parent is writable)."""
    if target.exists() and os.path.ismount(target):
        return False
    return os.access(target.parent, os.W_OK | os.X_OK)


def _remove_entries(folder: Path, owns: Callable[[str], bool]) -> None:
    for entry in list(os.scandir(folder)):
        if owns(entry.name) and not _is_bloomlm_artefact(entry.name):
            _remove(Path(entry.path))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _is_bloomlm_artefact(name: str) -> bool:
    return re.search(rf"(^|\.)bloomlm-(lock|staging-{_TOKEN}|old-{_TOKEN})$", name) is not None


class _FolderSave:
    """The steps of one `folder_save` at top level; `beside` says whether the staging folder is a
    sibling of the target (one-step commit) or inside it (the degraded mode)."""

    def __init__(self, target: Path, owns: Callable[[str], bool], beside: bool) -> None:
        self.target, self.owns, self.beside = target, owns, beside
        home = target.parent if beside else target
        self.prefix = f".{target.name}." if beside else "."
        if not beside:
            target.mkdir(parents=True, exist_ok=True)
            logger.warning(
                "%s is a mount point or its parent is not writable: its files are replaced one "
                "by one, each atomically, but the save as a whole is not all-or-nothing",
                target,
            )
        self.home = home
        self.lock = _Journal(home / f"{self.prefix}bloomlm-lock")
        self.staging: Path | None = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.lock.acquire(_lock_timeout(), self.target)
        try:
            self.recover()
            self.lock.start()
            yield
        except Exception as err:
            if _is_disk_full(err):
                raise _disk_full(self.target, err) from err
            raise
        finally:
            self.lock.release()

    def leftover_name(self, kind: str) -> str:
        return f"{self.prefix}bloomlm-{kind}-{os.urandom(8).hex()}"

    def is_leftover(self, name: str) -> bool:
        return (
            re.fullmatch(rf"{re.escape(self.prefix)}bloomlm-(staging|old)-{_TOKEN}", name)
            is not None
        )

    def recover(self) -> None:
        """Undo an interrupted save: put a journalled old folder back if the folder is missing (the
        two-rename fallback stopped between its renames), then remove the journalled leftovers."""
        entries = [(k, n) for k, n in self.lock.entries() if self.is_leftover(n)]
        for kind, name in entries:
            if kind == "old" and self.beside and not self.target.exists():
                if (self.home / name).is_dir():
                    os.rename(self.home / name, self.target)
                    _fsync(self.home, directory=True)
        for _, name in entries:
            if (self.home / name).exists():
                _remove(self.home / name)
                crash_point("removed leftover")

    def stage(self) -> Path:
        staging = self.home / self.leftover_name("staging")
        self.staging = staging
        self.lock.record("staging", staging.name)
        staging.mkdir()
        crash_point("made staging")
        if self.beside and self.target.exists():
            os.chmod(staging, stat.S_IMODE(self.target.stat().st_mode))
            _link_entries(self.target, staging, self.owns)
            crash_point("linked")
        return staging

    def abandon(self) -> None:
        """After an error: remove the staging folder (new files, or the old folder once
        exchanged); the journal is emptied only when that worked."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            if not self.staging.exists():
                self.lock.finish()

    def commit(self) -> None:
        staging = self.staging
        _sync_tree(staging)
        cwd = _working_folder_inside(self.target) if self.beside else None
        try:
            if not self.beside:
                self._replace_one_by_one(staging)
            elif not self.target.exists():
                os.rename(staging, self.target)
                crash_point("renamed")
                staging = None
            elif _exchange(self.home, staging.name, self.target.name):
                crash_point("exchanged")
            else:
                self._two_renames(staging)
                staging = None
            _fsync(self.home, directory=True)
            crash_point("fsync parent")
        except BaseException:
            self.recover()
            raise
        if cwd is not None:  # this process worked in the old folder: move it into the new one
            os.chdir(cwd if os.path.isdir(cwd) else self.target)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)  # the old folder, or an emptied staging
            crash_point("removed old")
        self.lock.finish()

    def _two_renames(self, staging: Path) -> None:
        old = self.home / self.leftover_name("old")
        self.lock.record("old", old.name)
        os.rename(self.target, old)
        crash_point("renamed folder aside")
        os.rename(staging, self.target)
        crash_point("renamed staging")
        _fsync(self.home, directory=True)
        shutil.rmtree(old, ignore_errors=True)
        crash_point("removed old")

    def _replace_one_by_one(self, staging: Path) -> None:
        new_names = set(os.listdir(staging))
        for name in sorted(new_names):
            destination = self.target / name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(staging / name, destination)
            crash_point(f"replaced {name}")
        for entry in list(os.scandir(self.target)):
            if entry.name not in new_names and self.owns(entry.name):
                if not _is_bloomlm_artefact(entry.name):
                    _remove(Path(entry.path))
        staging.rmdir()


def _working_folder_inside(target: Path) -> str | None:
    """This process's working folder when it is `target` or lies inside it (it would be left in
    the old folder, which is then deleted: `save_pretrained(".")` twice would fail)."""
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    inside = cwd == str(target) or cwd.startswith(str(target) + os.sep)
    return cwd if inside else None


def _link_entries(source: Path, destination: Path, owns: Callable[[str], bool]) -> None:
    """Hard-link (copy where impossible) the entries of `source` that `owns` rejects into
    `destination`; folders are recreated and their contents linked."""
    for entry in os.scandir(source):
        if not owns(entry.name) or _is_bloomlm_artefact(entry.name):
            _link_entry(Path(entry.path), destination / entry.name)


def _link_entry(source: Path, destination: Path) -> None:
    if source.is_dir() and not source.is_symlink():
        destination.mkdir()
        os.chmod(destination, stat.S_IMODE(source.stat().st_mode))
        for entry in os.scandir(source):
            _link_entry(Path(entry.path), destination / entry.name)
        return
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:  # no hard links here (some network and FUSE file systems): copy
        shutil.copy2(source, destination, follow_symlinks=False)


def _sync_tree(folder: Path) -> None:
    """fsync what `folder` holds, then its directories, deepest first.

    The writers' files were synced as they were completed (`wrote`); syncing a clean file again
    costs nothing, and it covers copies made where links were impossible. Hard links to the old
    folder's files (more than one link) are on disk already.
    """
    for root, _, names in sorted(os.walk(folder), key=lambda item: -len(item[0])):
        for name in names:
            path = os.path.join(root, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                _fsync(path)
        _fsync(root, directory=True)
        crash_point("fsync folder")


def _exchange(parent: Path, first: str, second: str) -> bool:
    """Swap `parent/first` and `parent/second` atomically; False when the system cannot."""
    if not _use_exchange:
        return False
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return False
    descriptor = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = (os.fsencode(first), os.fsencode(second))
        if renameat2(descriptor, names[0], descriptor, names[1], _RENAME_EXCHANGE) == 0:
            return True
        code = ctypes.get_errno()
    finally:
        os.close(descriptor)
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the file system has no RENAME_EXCHANGE: two renames instead
    raise OSError(code, os.strerror(code), str(parent / second))


def _is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from or while handling, is a full disk. Writers
    hide it: torch.save raises a RuntimeError while cleaning up after the OSError, safetensors a
    SafetensorError that only names "os error 28"."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err) or "os error 28" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _disk_full(target: Path, err: BaseException) -> OSError:
    return OSError(
        errno.ENOSPC,
        f"no space left on device while saving {target}; the folder was left as it was "
        f"({type(err).__name__}: {err})",
    )


def _lock_timeout() -> float:
    text = os.environ.get(_LOCK_TIMEOUT_ENV, "")
    try:
        return float(text) if text else _DEFAULT_LOCK_TIMEOUT
    except ValueError:
        raise ValueError(f"{_LOCK_TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None


class _Journal:
    """The lock file beside a folder: `flock`ed for the whole save, and holding one line per
    folder the save makes ("staging <name>", "old <name>") so an interrupted save can be undone."""

    def __init__(self, path: Path) -> None:
        self.path, self.descriptor = path, None

    def acquire(self, timeout: float, target: Path) -> None:
        deadline = time.monotonic() + timeout
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                self._wait(descriptor, deadline, target)
                if self._is_current(descriptor):
                    self.descriptor = descriptor
                    return
            except BaseException:
                os.close(descriptor)
                raise
            os.close(descriptor)  # the holder deleted this lock file on leaving: lock the new one

    def _wait(self, descriptor: int, deadline: float, target: Path) -> None:
        if fcntl is None:
            return
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another save to {target} is in progress ({self._holder()}; lock file "
                        f"{self.path}); gave up after {_lock_timeout():g} s. Wait for it to "
                        f"finish, or raise {_LOCK_TIMEOUT_ENV}"
                    ) from None
                time.sleep(0.02)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL):
                    raise
                # Some network file systems have no locks: the save still commits in one step,
                # but two writers are not kept apart.
                logger.warning("%s: file locks are not supported here (%s)", self.path, err)
                return

    def _is_current(self, descriptor: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> str:
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except OSError:
            return "process unknown"
        pids = [line.split(" ", 1)[1] for line in lines if line.startswith("pid ")]
        return f"process {pids[-1]}" if pids else "process unknown"

    def entries(self) -> list[tuple[str, str]]:
        os.lseek(self.descriptor, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self.descriptor, 65536):
            chunks.append(chunk)
        lines = b"".join(chunks).decode("utf-8", "replace").split("\n")
        return [tuple(line.split(" ", 1)) for line in lines if line.count(" ") == 1]

    def start(self) -> None:
        """Empty the journal (leftovers are gone) and say who holds the lock."""
        os.ftruncate(self.descriptor, 0)
        self.record("pid", str(os.getpid()))

    def record(self, kind: str, name: str) -> None:
        os.lseek(self.descriptor, 0, os.SEEK_END)
        os.write(self.descriptor, f"{kind} {name}\n".encode())
        os.fsync(self.descriptor)
        crash_point(f"journal {kind}")

    def finish(self) -> None:
        os.ftruncate(self.descriptor, 0)
        crash_point("journal cleared")

    def release(self) -> None:
        """Unlock; the lock file is deleted unless it lists folders still to clean up."""
        if self.descriptor is None:
            return
        try:
            clean = all(kind == "pid" for kind, _ in self.entries())
            if clean and self._is_current(self.descriptor):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.descriptor)
            self.descriptor = None


# -- loading while a save may commit -----------------------------------------------------------


def recover_folder(folder: str | os.PathLike) -> None:
    """If `folder` is missing because a two-rename save stopped between its renames, put the old
    folder back (under the lock). Does nothing in every other case, and costs one stat."""
    if not Path(folder).exists():
        clean_leftovers(folder)


def clean_leftovers(folder: str | os.PathLike) -> None:
    """What `folder_save` does first, alone: under the folder's lock, undo an interrupted save
    (the old folder back if the folder is missing, journalled leftovers removed). For callers that
    will not save (convert refusing an existing folder) and for loaders. Costs one stat when there
    is no lock file beside the folder."""
    target = Path(os.path.abspath(folder))
    lock_path = target.parent / f".{target.name}.bloomlm-lock"
    if not lock_path.exists():
        return
    save = _FolderSave(target, owns_everything, beside=True)
    try:
        save.lock.acquire(_lock_timeout(), target)
    except OSError:  # a read-only folder: nothing can be repaired; a load says what is missing
        return
    try:
        save.recover()
        save.lock.finish()
    finally:
        save.lock.release()


def _identity(path: Path) -> tuple[int, ...] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_ctime_ns, info.st_mtime_ns)


def _back_off(attempt: int) -> None:
    """Wait before reading a folder again: saves in a row commit one after another, and a read
    started right after one commit would race the next. Jittered, so readers do not align."""
    time.sleep(random.uniform(0.5, 1.0) * min(0.5, 0.01 * 2**attempt))


def consistent_load(load: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a `from_pretrained(cls, name_or_path, *args, **kwargs)` so that a save committing
    to the folder while it is read makes it read again (see the module docstring)."""

    @functools.wraps(load)
    def wrapper(cls: Any, name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(name_or_path, (str, os.PathLike)):
            return load(cls, name_or_path, *args, **kwargs)
        folder = Path(os.fspath(name_or_path), kwargs.get("subfolder") or "")
        recover_folder(folder)
        for attempt in range(_LOAD_ATTEMPTS):
            before = _identity(folder)
            if before is None:  # a hub name, or missing: nothing local to guard
                return load(cls, name_or_path, *args, **kwargs)
            try:
                result = load(cls, name_or_path, *args, **kwargs)
            except Exception:
                if _identity(folder) == before:
                    raise
                _back_off(attempt)
                continue  # a save committed meanwhile; what failed may be a mix: read again
            if _identity(folder) == before:
                return result
            _back_off(attempt)
        raise CheckpointError(
            f"{folder} was replaced {_LOAD_ATTEMPTS} times while being loaded (saves to it "
            "are in progress); load it once they are done"
        )

    return wrapper


# -- single files ------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.

    For a lone file outside model folders; saves of model folders use `folder_save`.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        yield temporary
        with contextlib.suppress(OSError):
            _fsync(temporary)  # without it a crash after the rename can leave an empty file
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


_SIZE_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or digits plus a unit, read as transformers'
    `convert_file_size_to_int`.

    KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024; a lowercase final "b" ("5Gb") means
    bits.
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

"""A save is all or nothing (bloomlm.files.folder_save): killed at any step, out of disk space, or
racing another writer, a folder loads as exactly the old checkpoint or exactly the new one.

Kill trials fork this process (torch imported already) and stop the save in the child at each of
its crash points (after each file written, each fsync, each rename) and at random times; the
parent loads the folder with bloomlm's loaders and compares every tensor (tests/kill_trials.py).
The long random campaign is benchmarks/kill_campaign.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import safetensors
import safetensors.torch

import kill_trials
from bloomlm import BloomForCausalLM, checkpoint, files
from bloomlm.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

# Every writer of kill_trials.WRITERS but the Flax single file and Flax two-rename variants, whose
# steps the Flax sharded and torch two-rename writers already take (Flax loads are slow to check);
# benchmarks/kill_campaign.py runs them all.
POINT_WRITERS = [
    name
    for name in kill_trials.WRITERS
    if name not in ("flax-msgpack", "flax-msgpack-sharded-2renames")
]
RANDOM_KILLS = 2  # per writer here; hundreds in benchmarks/kill_campaign.py


def _ram_folder() -> pathlib.Path | None:
    shm = pathlib.Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return pathlib.Path(tempfile.mkdtemp(prefix="bloomlm-test-", dir=shm))
    return None


@pytest.fixture
def scratch(tmp_path) -> pathlib.Path:
    """Where kill trials save: in RAM (/dev/shm) where there is one. A trial saves four times, and
    on this disk each save's fsyncs cost ~100 ms; SIGKILL leaves the page cache intact, so the
    trials prove the same there (power loss is what the fsyncs are for). Tests that must see a
    real disk use tmp_path."""
    folder = _ram_folder()
    if folder is None:
        yield tmp_path
        return
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> kill_trials.Checkpoints:
    return kill_trials.Checkpoints(tmp_path_factory.mktemp("checkpoints"))


def _broken(results: list[kill_trials.TrialResult]) -> list[kill_trials.TrialResult]:
    return [r for r in results if r.loaded_as.startswith("FAILED") or not r.leftovers_cleaned]


# -- kills ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POINT_WRITERS)
def test_killed_at_every_crash_point_the_folder_is_old_or_new(ckpts, scratch, name):
    writer = kill_trials.WRITERS[name](ckpts)
    results = kill_trials.point_trials(writer, scratch)
    assert len(results) >= 10, [r.how for r in results]
    assert all(r.killed for r in results), [r for r in results if not r.killed]
    assert not _broken(results), _broken(results)
    # Both sides of the commit point were reached: the trials prove something either way.
    before = "old" if writer.had_old else "none"
    assert {r.loaded_as for r in results} == {before, "new"}
    # Every file write and every rename of the save is a point that was tried.
    labels = " ".join(r.how for r in results)
    assert (
        "wrote" in labels and "fsync" in labels and ("exchanged" in labels or "renamed" in labels)
    )


@pytest.mark.parametrize("name", POINT_WRITERS)
def test_killed_at_random_times_the_folder_is_old_or_new(ckpts, scratch, name):
    writer = kill_trials.WRITERS[name](ckpts)
    rng = random.Random(name)
    results = kill_trials.random_trials(writer, scratch, RANDOM_KILLS, rng, timings=1)
    assert not _broken(results), _broken(results)


def test_two_rename_fallback_is_undone_by_the_next_load(ckpts, tmp_path):
    writer = kill_trials.WRITERS["torch-safetensors-sharded-2renames"](ckpts)
    labels = kill_trials.save_labels(writer, tmp_path)
    folder = tmp_path / "trial" / "ckpt"
    writer.prepare(folder)
    between = labels.index("renamed folder aside") + 1
    outcome = kill_trials.fork_save(lambda: writer.save(folder), crash_at=between)
    files._use_exchange = True
    assert outcome.killed and not folder.exists()  # stopped between the two renames
    assert writer.loads_as(folder) == "old"  # the load put the old folder back
    assert folder.is_dir() and kill_trials.leftovers(folder.parent) == []


def test_an_error_between_the_two_renames_puts_the_old_folder_back(ckpts, tmp_path):
    writer = kill_trials.WRITERS["torch-safetensors-sharded-2renames"](ckpts)
    labels = kill_trials.save_labels(writer, tmp_path)
    folder = tmp_path / "trial" / "ckpt"
    writer.prepare(folder)
    before = _snapshot(folder.parent)
    files.set_crash_plan(files.CrashPlan(labels.index("renamed folder aside") + 1, "enospc"))
    try:
        with pytest.raises(OSError, match="no space left on device"):
            writer.save(folder)
    finally:
        files.set_crash_plan(None)
        files._use_exchange = True
    assert _snapshot(folder.parent) == before


# -- full disk -----------------------------------------------------------------------------------


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


DISK_FULL_WRITERS = [
    "torch-safetensors-sharded", "torch-bin-sharded", "flax-msgpack-sharded", "finetune-best",
    "finetune-state", "tokenizer", "convert",
]  # fmt: skip


@pytest.mark.parametrize("name", DISK_FULL_WRITERS)
def test_disk_full_at_any_write_says_so_and_changes_nothing(ckpts, scratch, name):
    """ENOSPC injected at every step before the commit (the write calls, their fsyncs, the
    journal): an OSError saying "no space left on device", and the folder exactly as it was."""
    writer = kill_trials.WRITERS[name](ckpts)
    labels = kill_trials.save_labels(writer, scratch)
    files._use_exchange = True
    commit = next(i for i, label in enumerate(labels) if label in ("exchanged", "renamed"))
    for point in range(1, commit + 1):
        trial = scratch / f"t{point}"
        writer.prepare(trial / "ckpt")
        before = _snapshot(trial)
        files.set_crash_plan(files.CrashPlan(point, action="enospc"))
        try:
            with pytest.raises(OSError, match="no space left on device") as caught:
                writer.save(trial / "ckpt")
        finally:
            files.set_crash_plan(None)
        assert caught.value.errno == errno.ENOSPC
        assert _snapshot(trial) == before, f"changed by a failed save at {labels[point - 1]}"
        shutil.rmtree(trial)


def test_safetensors_disk_full_is_an_oserror_naming_it(ckpts, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError; it becomes the ENOSPC OSError."""
    writer = kill_trials.WRITERS["torch-safetensors-sharded"](ckpts)
    writer.prepare(tmp_path / "ckpt")
    before = _snapshot(tmp_path)

    def full_disk(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"half a shard")
        message = "Error while serializing: I/O error: No space left on device (os error 28)"
        raise safetensors.SafetensorError(message)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="no space left on device") as caught:
        writer.save(tmp_path / "ckpt")
    assert caught.value.errno == errno.ENOSPC and _snapshot(tmp_path) == before


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 640 KB tmpfs: room for the old checkpoint, not for the old and the new side by side.
    Mounting needs root (CAP_SYS_ADMIN); where it is refused the test is skipped, saying why (the
    injected-ENOSPC tests above always run)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not permitted'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("name", ["torch-safetensors-sharded", "torch-bin", "flax-msgpack"])
def test_real_full_disk_leaves_the_folder_as_it_was(ckpts, small_tmpfs, name):
    writer = kill_trials.WRITERS[name](ckpts)
    folder = small_tmpfs / "ckpt"
    writer.prepare(folder)
    before, free_before = _snapshot(small_tmpfs), os.statvfs(small_tmpfs).f_bfree
    with pytest.raises(OSError, match="no space left on device") as caught:
        writer.save(folder)
    assert caught.value.errno == errno.ENOSPC
    assert _snapshot(small_tmpfs) == before
    assert os.statvfs(small_tmpfs).f_bfree == free_before, "the partial copy was not removed"
    assert writer.loads_as(folder) == "old"


# -- concurrency ---------------------------------------------------------------------------------


def _exited_cleanly(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _loaded_label(ckpts, folder: pathlib.Path) -> str:
    found = kill_trials._numpy(BloomForCausalLM.from_pretrained(folder).state_dict())
    return kill_trials._which(found, ckpts.torch_tensors, folder)


def test_concurrent_writers_are_serialised_and_loads_see_one_checkpoint(ckpts, tmp_path):
    """Two processes save different sharded checkpoints to one folder five times each while this
    process loads it over and over: both succeed, and every load is exactly one checkpoint."""
    folder = tmp_path / "shared"
    ckpts.model_old.save_pretrained(folder, max_shard_size=kill_trials.SHARD)

    def saves(model):
        return lambda: [model.save_pretrained(folder, max_shard_size=kill_trials.SHARD)
                        for _ in range(5)]  # fmt: skip

    running = {
        kill_trials.fork_child(saves(ckpts.model_old)): None,
        kill_trials.fork_child(saves(ckpts.model_new)): None,
    }
    loads = 0
    while any(status is None for status in running.values()):
        try:
            assert _loaded_label(ckpts, folder) in ("old", "new")
            loads += 1
        except CheckpointError as err:  # saves kept committing under the reader: said, not mixed
            assert "times while being loaded" in str(err)
        for pid in [pid for pid, status in running.items() if status is None]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running[pid] = status
    assert all(_exited_cleanly(status) for status in running.values()), running
    assert loads > 0
    assert _loaded_label(ckpts, folder) in ("old", "new")
    index = json.loads((folder / checkpoint.SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(
        p.name for p in folder.glob("model-*.safetensors")
    )
    assert kill_trials.leftovers(tmp_path) == []


def test_a_second_writer_waits_then_fails_clearly(ckpts, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    ckpts.model_old.save_pretrained(folder)
    before = _snapshot(folder)
    with open(tmp_path / ".ckpt.bloomlm-lock", "w") as held:  # another save holds the lock
        held.write("pid 4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        monkeypatch.setenv("BLOOMLM_SAVE_LOCK_TIMEOUT", "0.3")
        start = time.monotonic()
        message = f"another save to {folder} is in progress \\(process 4242"
        with pytest.raises(TimeoutError, match=message):
            ckpts.model_new.save_pretrained(folder)
        assert time.monotonic() - start >= 0.3
    assert _snapshot(folder) == before


def test_a_waiting_writer_goes_on_when_the_first_finishes(ckpts, tmp_path):
    folder = tmp_path / "ckpt"
    ckpts.model_old.save_pretrained(folder)
    lock_path = tmp_path / ".ckpt.bloomlm-lock"
    held = open(lock_path, "w")
    fcntl.flock(held, fcntl.LOCK_EX)
    # The child closes its copy of the held descriptor (one lock shared by both after a fork).
    pid = kill_trials.fork_child(lambda: (held.close(), ckpts.model_new.save_pretrained(folder)))
    time.sleep(0.3)
    assert _loaded_label(ckpts, folder) == "old"  # the writer is waiting
    lock_path.unlink()  # as a finishing save does before unlocking: the waiter must lock anew
    held.close()
    assert _exited_cleanly(os.waitpid(pid, 0)[1])
    assert _loaded_label(ckpts, folder) == "new"
    assert kill_trials.leftovers(tmp_path) == []


# -- leftovers, owned files, odd targets ---------------------------------------------------------


def test_only_journalled_leftovers_are_removed(ckpts, tmp_path):
    folder = tmp_path / "ckpt"
    ckpts.model_old.save_pretrained(folder)
    ckpts.model_old.save_pretrained(tmp_path / "x")
    labels, _ = kill_trials.crash_labels(lambda: ckpts.model_new.save_pretrained(tmp_path / "x"))
    shutil.rmtree(tmp_path / "x")
    outcome = kill_trials.fork_save(
        lambda: ckpts.model_new.save_pretrained(folder), crash_at=labels.index("linked") + 1
    )
    assert outcome.killed
    made = [p for p in tmp_path.iterdir() if ".ckpt.bloomlm-staging-" in p.name]
    assert len(made) == 1
    # Look-alikes the journal does not list are someone else's: kept.
    lookalike = tmp_path / ".ckpt.bloomlm-staging-0123456789abcdef"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("not bloomlm's")
    ckpts.model_new.save_pretrained(folder)
    assert not made[0].exists() and (lookalike / "keep.txt").read_text() == "not bloomlm's"
    assert not (tmp_path / ".ckpt.bloomlm-lock").exists()


def test_a_save_replaces_its_own_files_and_keeps_the_rest(ckpts, tmp_path):
    folder = tmp_path / "ckpt"
    ckpts.model_old.save_pretrained(folder, max_shard_size=kill_trials.SHARD)
    ckpts.tokenizer_old.save_pretrained(folder)
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text("{}\n")
    (folder / "flax_model.msgpack").write_bytes(b"the user's Flax weights")
    (folder / "README.md").write_text("# mine\n")
    os.chmod(folder, 0o750)
    ckpts.model_new.save_pretrained(folder)  # single file: the old shards and index must go
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([
        "README.md", "config.json", "data", "flax_model.msgpack", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    ]), names  # fmt: skip
    assert (folder / "data" / "train.jsonl").read_text() == "{}\n"
    assert (folder / "flax_model.msgpack").read_bytes() == b"the user's Flax weights"
    assert oct(os.stat(folder).st_mode & 0o777) == oct(0o750), "the folder's mode changed"


def test_a_symlinked_folder_stays_a_link(ckpts, tmp_path):
    real = tmp_path / "real"
    ckpts.model_old.save_pretrained(real)
    (tmp_path / "link").symlink_to(real)
    ckpts.model_new.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    found = kill_trials._numpy(BloomForCausalLM.from_pretrained(real).state_dict())
    assert kill_trials._which(found, ckpts.torch_tensors, real) == "new"


def test_without_a_sibling_files_are_replaced_one_by_one(ckpts, tmp_path, monkeypatch, caplog):
    """A folder that is a mount point, or whose parent is read-only, cannot be swapped: the save
    stages inside it and renames file by file, and says the save is not all-or-nothing."""
    folder = tmp_path / "ckpt"
    ckpts.model_old.save_pretrained(folder, max_shard_size=kill_trials.SHARD)
    (folder / kill_trials.USER_FILE).write_text("mine")
    monkeypatch.setattr(files, "_can_stage_beside", lambda target: False)
    ckpts.model_new.save_pretrained(folder)
    assert "not all-or-nothing" in caplog.text
    found = kill_trials._numpy(BloomForCausalLM.from_pretrained(folder).state_dict())
    assert kill_trials._which(found, ckpts.torch_tensors, folder) == "new"
    assert (
        not list(folder.glob("model-*")) and (folder / kill_trials.USER_FILE).read_text() == "mine"
    )
    assert kill_trials.leftovers(tmp_path) == []


def test_saving_into_the_working_folder_twice(ckpts, tmp_path, monkeypatch):
    """The swap replaces the folder this process works in; it then works in the new one."""
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt")
    ckpts.model_new.save_pretrained(".")
    ckpts.tokenizer_new.save_pretrained(".")
    assert os.path.samefile(os.getcwd(), tmp_path / "ckpt")
    assert {"model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "ckpt"))


def test_nested_saves_commit_once(ckpts, tmp_path):
    """A model and tokenizer saved into a save in progress write there directly: one commit."""
    folder = tmp_path / "ckpt"
    plan = files.set_crash_plan(files.CrashPlan())
    try:
        with files.folder_save(folder, files.owns_everything) as staging:
            ckpts.model_new.save_pretrained(staging)
            ckpts.tokenizer_new.save_pretrained(staging)
    finally:
        files.set_crash_plan(None)
    assert plan.seen.count("renamed") + plan.seen.count("exchanged") == 1
    assert plan.seen.count("journal staging") == 1
    assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file()


def test_flax_and_torch_loads_retry_when_a_save_commits_meanwhile(ckpts, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    ckpts.model_old.save_pretrained(folder)
    calls = []
    real_read = checkpoint.load_state_dict

    def read_then_replace(*args, **kwargs):
        result = real_read(*args, **kwargs)
        if not calls:  # a save commits between reading the config and the weights
            ckpts.model_new.save_pretrained(folder)
        calls.append(1)
        return result

    monkeypatch.setattr(checkpoint, "load_state_dict", read_then_replace)
    model = BloomForCausalLM.from_pretrained(folder, torch_dtype="float32")
    found = kill_trials._numpy(model.state_dict())
    assert len(calls) == 2 and kill_trials._which(found, ckpts.torch_tensors, folder) == "new"


def test_crash_point_env_var_stops_a_subprocess(ckpts, tmp_path):
    """BLOOMLM_CRASH_AT stops a separate process (the CLI) at that crash point."""
    ckpts.model_old.save_pretrained(tmp_path / "source")
    package_root = str(pathlib.Path(files.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": package_root, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bloomlm", "convert", str(tmp_path / "source"),
               str(tmp_path / "out")]  # fmt: skip
    crashed = subprocess.run(
        command, env={**env, "BLOOMLM_CRASH_AT": "3"}, capture_output=True, timeout=300
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert not (tmp_path / "out").exists()
    finished = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert kill_trials.leftovers(tmp_path) == []

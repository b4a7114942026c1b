"""Kill trials for bloomlm's saves, shared by tests/test_crash_safety.py and
benchmarks/kill_campaign.py.

A trial forks this process (which has imported torch already, so a trial costs milliseconds, not a
fresh interpreter), runs one save in the child and stops it: at its N-th `bloomlm.files.crash_point`
(after each file written, each fsync, each rename), or by a SIGKILL from the parent after a random
delay. The parent then loads the folder with bloomlm's own loaders and compares every tensor: it
must be exactly the old checkpoint or exactly the new one (or, where there was none before, no
checkpoint). Then the same save runs to completion in the parent, which must give the new
checkpoint and leave no bloomlm leftovers anywhere in the trial's folder.

A `Writer` is one kind of save: how to put the old state in place, the save itself, and what the
folder may load as.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from bloomlm import (
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    files,
)
from bloomlm.errors import CheckpointNotFoundError

FIXTURE_TOKENIZER = pathlib.Path(__file__).parent / "fixtures" / "bloom-style-tokenizer"
USER_FILE = "notes.txt"  # a file of the user's in the folder: every save must keep it
SHARD = "200KB"  # the tiny models below are 233 KB and 537 KB: 2 and 3 shards


@dataclasses.dataclass
class Outcome:
    killed: bool  # the child died of SIGKILL
    error: str | None  # the exception the child raised, if any
    seconds: float


def fork_child(work: Callable[[], object]) -> int:
    """Run `work()` in a forked child that exits 0, or 1 if it raised; the child's pid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax warns that fork and threads mix; children avoid it
        pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def fork_save(
    save: Callable[[], None],
    *,
    crash_at: int | None = None,
    kill_after: float | None = None,
    timeout: float = 120.0,
) -> Outcome:
    """Run `save()` in a forked child, stopped at crash point `crash_at` or killed after
    `kill_after` seconds; wait for it (a child alive after `timeout` s is a hang: an
    AssertionError)."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # jax warns that fork and threads mix; the child never uses it
        warnings.simplefilter("ignore")
        pid = os.fork()
    start = time.perf_counter()  # after the fork's own cost (tens of ms for a big process)
    if pid == 0:  # the child: never returns
        os.close(read_end)
        code = 0
        try:
            if crash_at is not None:
                files.set_crash_plan(files.CrashPlan(crash_at))
            save()
        except BaseException as err:  # reported to the parent, which decides
            os.write(write_end, f"{type(err).__name__}: {err}".encode()[:8000])
            code = 1
        os._exit(code)
    os.close(write_end)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    status = _wait(pid, timeout)
    seconds = time.perf_counter() - start
    with os.fdopen(read_end, "rb") as pipe:
        error = pipe.read().decode(errors="replace") or None
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return Outcome(killed, error, seconds)


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"a save in a forked child did not finish in {timeout} s")
        time.sleep(0.001)


def crash_labels(save: Callable[[], None]) -> tuple[list[str], float]:
    """Run `save()` here with a recording crash plan: its crash point labels, and its seconds."""
    plan = files.set_crash_plan(files.CrashPlan())
    start = time.perf_counter()
    try:
        save()
    finally:
        files.set_crash_plan(None)
    return plan.seen, time.perf_counter() - start


def leftovers(root: pathlib.Path) -> list[str]:
    """Every path under `root` whose name is bloomlm's (lock files, staging and old folders)."""
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*") if ".bloomlm-" in path.name
    )


# -- writers -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Writer:
    """One kind of save. `prepare(folder)` puts the old state in place (or nothing: `had_old`
    False); `save(folder)` is the save under test; `loads_as(folder)` answers "old", "new" or
    "none" and raises AssertionError for anything else (a mix, a broken folder)."""

    name: str
    prepare: Callable[[pathlib.Path], None]
    save: Callable[[pathlib.Path], None]
    loads_as: Callable[[pathlib.Path], str]
    had_old: bool = True
    resave_fails_when_new: bool = False  # convert never overwrites a finished folder


def tiny_config(tokenizer, n_layer: int, hidden_size: int) -> BloomConfig:
    return BloomConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, n_layer=n_layer, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def _random_model(config: BloomConfig, seed: int) -> BloomForCausalLM:
    torch.manual_seed(seed)
    return BloomForCausalLM(config).eval()


def _torch_state(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    return BloomForCausalLM.from_pretrained(folder).state_dict()


def _same_tensors(ours: dict, theirs: dict) -> bool:
    if ours.keys() != theirs.keys():
        return False
    return all(
        ours[k].shape == theirs[k].shape and np.array_equal(np.asarray(ours[k]), theirs[k])
        for k in ours
    )


def _which(found: dict, candidates: dict[str, dict], folder: pathlib.Path) -> str:
    for label, expected in candidates.items():
        if _same_tensors(found, expected):
            return label
    raise AssertionError(f"{folder} loads as neither the old nor the new checkpoint: a mix")


class Checkpoints:
    """The old (A: 2 layers, hidden 32) and new (B: 3 layers, hidden 48) models, their tokenizer
    (with a different padding side each), and their tensors as bloomlm loads them back."""

    def __init__(self, root: pathlib.Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.tokenizer_old = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER, padding_side="right")
        self.tokenizer_new = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER, padding_side="left")
        self.model_old = _random_model(tiny_config(self.tokenizer_old, 2, 32), seed=1)
        self.model_new = _random_model(tiny_config(self.tokenizer_old, 3, 48), seed=2)
        self.reference = {}  # label -> folder saved once, loaded back
        for label, model in (("old", self.model_old), ("new", self.model_new)):
            model.save_pretrained(root / label)
            self.reference[label] = root / label
        self.torch_tensors = {label: _numpy(_torch_state(p)) for label, p in self.reference.items()}
        self._flax = None

    def flax(self) -> dict:
        """{label: (numpy params tree, flat numpy params)} for the Flax writers (made on demand)."""
        if self._flax is None:
            from bloomlm import FlaxBloomForCausalLM

            self._flax = {}
            for label, folder in self.reference.items():
                model = FlaxBloomForCausalLM.from_pretrained(folder, from_pt=True)
                tree = _to_numpy_tree(model.params)
                self._flax[label] = (tree, _flat(tree))
        return self._flax


def _numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in state.items()}


def _to_numpy_tree(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def _flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    if not isinstance(tree, dict):
        return {prefix: np.asarray(tree)}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}/{key}" if prefix else key))
    return out


def _with_user_file(folder: pathlib.Path) -> None:
    (folder / USER_FILE).write_text("the user's own notes\n")


def _check_user_file(folder: pathlib.Path) -> None:
    assert (folder / USER_FILE).read_text() == "the user's own notes\n", "a user's file changed"


def torch_writer(ckpts: Checkpoints, *, safe: bool, sharded: bool, exchange: bool = True) -> Writer:
    """`BloomForCausalLM.save_pretrained` of B over A (each in the same format), beside the
    tokenizer's files and a user's file, which must survive."""
    kwargs = {"safe_serialization": safe, "max_shard_size": SHARD if sharded else "5GB"}

    def prepare(folder: pathlib.Path) -> None:
        ckpts.model_old.save_pretrained(folder, **kwargs)
        ckpts.tokenizer_old.save_pretrained(folder)
        _with_user_file(folder)

    def save(folder: pathlib.Path) -> None:
        files._use_exchange = exchange
        ckpts.model_new.save_pretrained(folder, **kwargs)

    def loads_as(folder: pathlib.Path) -> str:
        found = _numpy(_torch_state(folder))
        _check_user_file(folder)
        assert AutoTokenizer.from_pretrained(folder).padding_side == "right", "tokenizer changed"
        return _which(found, ckpts.torch_tensors, folder)

    fmt = ("safetensors" if safe else "bin") + ("-sharded" if sharded else "")
    return Writer(f"torch-{fmt}" + ("" if exchange else "-2renames"), prepare, save, loads_as)


def flax_writer(ckpts: Checkpoints, *, sharded: bool, exchange: bool = True) -> Writer:
    """`FlaxBloomForCausalLM.save_pretrained` (msgpack) of B over A. The child gets NumPy params,
    so it never touches the XLA runtime (not safe after fork)."""
    from bloomlm import FlaxBloomForCausalLM

    flax = ckpts.flax()
    configs = {"old": ckpts.model_old.config, "new": ckpts.model_new.config}
    # Built here, in the parent: construction runs JAX, which a forked child must not.
    models = {
        label: FlaxBloomForCausalLM(config, _do_init=False) for label, config in configs.items()
    }
    size = SHARD if sharded else "10GB"

    def save_as(label: str, folder: pathlib.Path) -> None:
        models[label].save_pretrained(folder, params=flax[label][0], max_shard_size=size)

    def prepare(folder: pathlib.Path) -> None:
        save_as("old", folder)
        _with_user_file(folder)

    def save(folder: pathlib.Path) -> None:
        files._use_exchange = exchange
        save_as("new", folder)

    def loads_as(folder: pathlib.Path) -> str:
        _, params = FlaxBloomForCausalLM.from_pretrained(folder, _do_init=False)
        _check_user_file(folder)
        return _which(_flat(_to_numpy_tree(params)), {k: v[1] for k, v in flax.items()}, folder)

    name = "flax-msgpack" + ("-sharded" if sharded else "") + ("" if exchange else "-2renames")
    return Writer(name, prepare, save, loads_as)


def convert_writer(ckpts: Checkpoints) -> Writer:
    """`bloomlm convert` of B (with its tokenizer) into a new folder: before the commit there is
    no folder, after it the whole converted one."""
    from bloomlm.convert import convert_checkpoint

    source = ckpts.root / "convert-source"
    if not source.exists():
        ckpts.model_new.save_pretrained(source)
        ckpts.tokenizer_new.save_pretrained(source)

    def save(folder: pathlib.Path) -> None:
        convert_checkpoint(source, folder, to="bin", max_shard_size=SHARD)

    def loads_as(folder: pathlib.Path) -> str:
        if not folder.exists():
            return "none"
        try:
            found = _numpy(_torch_state(folder))
        except CheckpointNotFoundError as err:
            raise AssertionError(f"{folder} exists but holds no checkpoint: {err}") from err
        assert AutoTokenizer.from_pretrained(folder).padding_side == "left"
        return _which(found, {"new": ckpts.torch_tensors["new"]}, folder)

    return Writer("convert", lambda folder: None, save, loads_as, had_old=False,
                  resave_fails_when_new=True)  # fmt: skip


def finetune_best_writer(ckpts: Checkpoints) -> Writer:
    """finetune's best-model save: model, tokenizer and eval_results.json of B over A in `out`,
    while `out/training_state/` (saved before) stays as it was."""
    from bloomlm import finetune

    def prepare(folder: pathlib.Path) -> None:
        finetune._save_best(folder, ckpts.model_old, ckpts.tokenizer_old, {"best_epoch": 1})
        _fake_state(ckpts, folder, "old")

    def save(folder: pathlib.Path) -> None:
        finetune._save_best(folder, ckpts.model_new, ckpts.tokenizer_new, {"best_epoch": 2})

    def loads_as(folder: pathlib.Path) -> str:
        label = _which(_numpy(_torch_state(folder)), ckpts.torch_tensors, folder)
        results = json.loads((folder / finetune.RESULTS_FILE).read_text())
        assert results["best_epoch"] == {"old": 1, "new": 2}[label], "results disagree with model"
        padding = AutoTokenizer.from_pretrained(folder).padding_side
        assert padding == {"old": "right", "new": "left"}[label], "tokenizer disagrees with model"
        assert _state_label(ckpts, folder) == "old", "training_state changed"
        return label

    return Writer("finetune-best", prepare, save, loads_as)


def finetune_state_writer(ckpts: Checkpoints) -> Writer:
    """finetune's training_state save (weights, optimizer and scheduler, counters) of B over A;
    `--resume` must find one complete state either way."""
    from bloomlm import finetune

    def prepare(folder: pathlib.Path) -> None:
        finetune._save_best(folder, ckpts.model_old, ckpts.tokenizer_old, {"best_epoch": 1})
        _fake_state(ckpts, folder, "old")

    def loads_as(folder: pathlib.Path) -> str:
        _which(_numpy(_torch_state(folder)), {"old": ckpts.torch_tensors["old"]}, folder)
        return _state_label(ckpts, folder)

    return Writer(
        "finetune-state", prepare, lambda folder: _fake_state(ckpts, folder, "new"), loads_as
    )


def _optimizer(model: torch.nn.Module, steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(steps):
        optimizer.step()  # no gradients: changes nothing, but the scheduler wants it first
        scheduler.step()
    return optimizer, scheduler


def _fake_state(ckpts: Checkpoints, out: pathlib.Path, label: str) -> None:
    from bloomlm import finetune

    model = ckpts.model_old if label == "old" else ckpts.model_new
    steps = 3 if label == "old" else 5
    optimizer, scheduler = _optimizer(model, steps)
    finetune._save_state(out, model, optimizer, scheduler, {"label": label, "step": steps})


def _state_label(ckpts: Checkpoints, out: pathlib.Path) -> str:
    from bloomlm import finetune

    state_dir = out / finetune.STATE_DIR
    state = json.loads((state_dir / finetune.STATE_FILE).read_text())
    saved = torch.load(state_dir / finetune.OPTIMIZER_FILE, weights_only=True)
    label = _which(_numpy(_torch_state(state_dir)), ckpts.torch_tensors, state_dir)
    assert state["label"] == label, "trainer_state.json disagrees with the weights"
    assert saved["scheduler"]["last_epoch"] == state["step"], "optimizer.pt disagrees"
    return label


def tokenizer_writer(ckpts: Checkpoints) -> Writer:
    """The tokenizer's save (three files) over another tokenizer, beside a model that stays."""

    def prepare(folder: pathlib.Path) -> None:
        ckpts.model_old.save_pretrained(folder)
        ckpts.tokenizer_old.save_pretrained(folder)

    def loads_as(folder: pathlib.Path) -> str:
        _which(_numpy(_torch_state(folder)), {"old": ckpts.torch_tensors["old"]}, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["padding_side"] == tokenizer.padding_side
        return {"right": "old", "left": "new"}[tokenizer.padding_side]

    return Writer(
        "tokenizer", prepare, lambda folder: ckpts.tokenizer_new.save_pretrained(folder), loads_as
    )


WRITERS: dict[str, Callable[[Checkpoints], Writer]] = {
    "torch-safetensors": lambda c: torch_writer(c, safe=True, sharded=False),
    "torch-safetensors-sharded": lambda c: torch_writer(c, safe=True, sharded=True),
    "torch-bin": lambda c: torch_writer(c, safe=False, sharded=False),
    "torch-bin-sharded": lambda c: torch_writer(c, safe=False, sharded=True),
    "torch-safetensors-sharded-2renames": lambda c: torch_writer(
        c, safe=True, sharded=True, exchange=False
    ),
    "flax-msgpack": lambda c: flax_writer(c, sharded=False),
    "flax-msgpack-sharded": lambda c: flax_writer(c, sharded=True),
    "flax-msgpack-sharded-2renames": lambda c: flax_writer(c, sharded=True, exchange=False),
    "convert": convert_writer,
    "finetune-best": finetune_best_writer,
    "finetune-state": finetune_state_writer,
    "tokenizer": tokenizer_writer,
}


# -- running trials ------------------------------------------------------------------------------


@dataclasses.dataclass
class TrialResult:
    writer: str
    how: str  # "point <n> <label>" or "random <seconds>"
    killed: bool
    loaded_as: str  # "old" / "new" / "none", or "FAILED: ..." for a broken promise
    leftovers_cleaned: bool
    seconds: float = 0.0  # from the fork to the child's end


def run_trial(
    writer: Writer,
    root: pathlib.Path,
    *,
    crash_at: int | None = None,
    kill_after: float | None = None,
    how: str = "",
) -> TrialResult:
    """One trial in `root/<fresh folder>/ckpt`; the folder is removed afterwards."""
    trial = pathlib.Path(os.path.realpath(root)) / f"trial-{os.urandom(4).hex()}"
    folder = trial / "ckpt"
    trial.mkdir(parents=True)
    try:
        writer.prepare(folder)
        outcome = fork_save(lambda: writer.save(folder), crash_at=crash_at, kill_after=kill_after)
        files._use_exchange = True
        if outcome.error is not None:
            failed = f"FAILED: {outcome.error}"
            return TrialResult(writer.name, how, False, failed, False, outcome.seconds)
        loaded = _loads_as(writer, folder)
        cleaned = _resave_cleans_up(writer, folder, trial, loaded)
        return TrialResult(writer.name, how, outcome.killed, loaded, cleaned, outcome.seconds)
    finally:
        files._use_exchange = True
        shutil.rmtree(trial, ignore_errors=True)


def _loads_as(writer: Writer, folder: pathlib.Path) -> str:
    try:
        loaded = writer.loads_as(folder)
    except Exception as err:  # a broken promise, reported (the test asserts on it)
        return f"FAILED: {type(err).__name__}: {err}"
    if loaded == "none" and writer.had_old:
        return "FAILED: the old checkpoint was lost"
    return loaded


def _resave_cleans_up(
    writer: Writer, folder: pathlib.Path, trial: pathlib.Path, loaded: str
) -> bool:
    """The same save, run to the end here: the folder is then the new checkpoint and no bloomlm
    leftover remains anywhere in the trial folder."""
    try:
        writer.save(folder)
    except FileExistsError:
        if not (writer.resave_fails_when_new and loaded == "new"):
            raise
    if writer.loads_as(folder) != "new":
        raise AssertionError(f"{writer.name}: a complete save after a crash is not the new one")
    return not leftovers(trial)


def point_trials(writer: Writer, root: pathlib.Path) -> list[TrialResult]:
    """A trial stopped at each crash point of `writer`'s save, in order."""
    return [
        run_trial(writer, root, crash_at=i, how=f"point {i} {label}")
        for i, label in enumerate(save_labels(writer, root), start=1)
    ]


def random_trials(
    writer: Writer, root: pathlib.Path, count: int, rng: random.Random, timings: int = 3
) -> list[TrialResult]:
    """`count` trials killed after a random delay in [0, T], T the lower quartile of the save's
    lifetime in a fork (`timings` timed saves, then every trial the kill came too late for): a
    save's duration varies a lot on a busy machine, and most kills should land while it runs."""
    lifetimes = [_lifetime(writer, root) for _ in range(timings)]
    results = []
    for _ in range(count):
        delay = rng.uniform(0.0, sorted(lifetimes)[len(lifetimes) // 4])
        result = run_trial(writer, root, kill_after=delay, how=f"random {delay * 1e3:.2f} ms")
        if not result.killed:
            lifetimes.append(result.seconds)
        results.append(result)
    return results


def save_labels(writer: Writer, root: pathlib.Path) -> list[str]:
    """The crash point labels of one complete save over the old state, run here."""
    trial = root / f"labels-{os.urandom(4).hex()}"
    try:
        writer.prepare(trial / "ckpt")
        return crash_labels(lambda: writer.save(trial / "ckpt"))[0]
    finally:
        files._use_exchange = True
        shutil.rmtree(trial, ignore_errors=True)


def _lifetime(writer: Writer, root: pathlib.Path) -> float:
    """Seconds one complete save takes in a forked child, from the fork to its exit (the random
    delays run from the fork too)."""
    trial = root / f"timing-{os.urandom(4).hex()}"
    try:
        writer.prepare(trial / "ckpt")
        outcome = fork_save(lambda: writer.save(trial / "ckpt"))
        assert outcome.error is None, outcome.error
        return outcome.seconds
    finally:
        files._use_exchange = True
        shutil.rmtree(trial, ignore_errors=True)

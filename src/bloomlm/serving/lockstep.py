"""Serving a model split over processes (tensor parallelism): rank 0 leads, the others follow.

A split model's forward is collective: every rank must run the same decoder call, with the same
inputs, at the same time. The serving engine schedules and samples (a request without a seed
draws a random one), so running an engine on every rank would make the ranks diverge. Instead
only rank 0 runs the engine (and HTTP); this module owns the replay that keeps the other ranks in
step with it:

    # rank 0                                   # every other rank
    engine = Engine(model, tokenizer, ...)     follow(model)   # returns when rank 0 closes
    ...
    engine.close()

On rank 0 the Engine wraps the model in `LockstepModel` (it does so itself for a split model):
`make_decoder` and every method call on a decoder (step_rows, fill, extend, copy_row, grow_rows,
reset, ...) is first broadcast to the mesh's group with `broadcast_object_list` (tensors go on
the CPU, so gloo and NCCL carry them alike), then run locally; attribute reads (`rows`,
`capacity`) are local. `follow` receives each message and makes the same call on its own shard.
Every rank holds the full logits after a call (the LM head gathers them), but only rank 0's are
used. Sampling happens on rank 0 only, so the ranks cannot choose different tokens.

Faults: a call that fails on rank 0 fails alike on every rank (the same code on the same data),
so a follower logs the error and waits for the next message, as the engine isolates a failed
request and keeps serving. A follower whose receive itself fails (rank 0 gone) raises.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_STOP = ("stop",)


class _Ref:
    """A decoder named in a message (copy_row's `decoder=`): each rank resolves its own."""

    def __init__(self, name: str):
        self.name = name


def is_split(model: Any) -> bool:
    """Whether `model` is split over processes (tp_plan= / device_mesh=)."""
    return getattr(model, "tensor_parallel_mesh", None) is not None


def mesh_rank(model: Any) -> int:
    """This process's rank in the model's tensor-parallel mesh."""
    return int(model.tensor_parallel_mesh.get_local_rank())


class LockstepModel:
    """Rank 0's view of a split model for the engine: decoders whose calls every rank replays.
    Anything else (config, dtype, device, generation_config) is the model's own."""

    def __init__(self, model: Any):
        if not is_split(model):
            raise ValueError("LockstepModel is for a model split by tp_plan= / device_mesh=")
        if mesh_rank(model) != 0:
            raise ValueError(
                "LockstepModel runs on rank 0 of the model's mesh; on the other ranks call "
                "bloomlm.serving.lockstep.follow(model)"
            )
        self.model = model
        self.group = model.tensor_parallel_mesh.get_group()
        self._names = itertools.count()
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def send(self, message: tuple) -> None:
        """Broadcast one message to the followers (the calls' order is the protocol)."""
        if self._closed:
            raise RuntimeError("the followers were released (close()): no more decoder calls")
        dist.broadcast_object_list([message], group=self.group, group_src=0)

    def make_decoder(self, *args: Any, **kwargs: Any) -> LockstepDecoder:
        name = f"d{next(self._names)}"
        self.send(("make", name, _portable(args), _portable(kwargs)))
        return LockstepDecoder(self, name, self.model.make_decoder(*args, **kwargs))

    def close(self) -> None:
        """Release the followers (`follow` returns); idempotent."""
        if not self._closed:
            dist.broadcast_object_list([_STOP], group=self.group, group_src=0)
            self._closed = True


class LockstepDecoder:
    """A decoder on rank 0 whose every method call is broadcast before it runs here."""

    def __init__(self, leader: LockstepModel, name: str, local: Any):
        self._leader, self._name, self._local = leader, name, local

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._local, name)
        if not callable(value):
            return value  # rows, capacity, ...: the same on every rank

        def call(*args: Any, **kwargs: Any) -> Any:
            message = ("call", self._name, name, _portable(args), _portable(kwargs))
            self._leader.send(message)
            return value(*_local_args(args), **_local_args(kwargs))

        return call


def _portable(value: Any) -> Any:
    """`value` as the followers can receive it: tensors on the CPU, decoders by name."""
    if isinstance(value, LockstepDecoder):
        return _Ref(value._name)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, tuple):
        return tuple(_portable(v) for v in value)
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    return value


def _local_args(value: Any) -> Any:
    """Rank 0's own arguments: its proxy decoders replaced by their local decoders."""
    if isinstance(value, LockstepDecoder):
        return value._local
    if isinstance(value, tuple):
        return tuple(_local_args(v) for v in value)
    if isinstance(value, dict):
        return {k: _local_args(v) for k, v in value.items()}
    return value


def _resolve(value: Any, decoders: dict[str, Any], device: torch.device) -> Any:
    """A received argument on a follower: names to its decoders, tensors to its device."""
    if isinstance(value, _Ref):
        return decoders[value.name]
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_resolve(v, decoders, device) for v in value)
    if isinstance(value, list):
        return [_resolve(v, decoders, device) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, decoders, device) for k, v in value.items()}
    return value


def follow(model: Any) -> int:
    """On every rank but 0: replay rank 0's decoder calls on this rank's shard until rank 0
    closes its engine; returns the number of calls replayed."""
    if not is_split(model):
        raise ValueError("follow(model) is for a model split by tp_plan= / device_mesh=")
    if mesh_rank(model) == 0:
        raise ValueError("rank 0 leads (it runs the Engine); follow(model) runs on the others")
    group = model.tensor_parallel_mesh.get_group()
    decoders: dict[str, Any] = {}
    calls = 0
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, group=group, group_src=0)
        message = box[0]
        if message == _STOP:
            return calls
        kind, name, *rest = message
        try:
            if kind == "make":
                args, kwargs = _resolve(rest, decoders, model.device)
                decoders[name] = model.make_decoder(*args, **kwargs)
            else:
                method, args, kwargs = _resolve(rest, decoders, model.device)
                calls += 1
                with torch.no_grad():
                    getattr(decoders[name], method)(*args, **kwargs)
        except Exception:  # the same call failed on rank 0: its request fails, serving goes on
            logger.exception("replaying %s %s failed", kind, name)


__all__ = ["LockstepDecoder", "LockstepModel", "follow", "is_split"]

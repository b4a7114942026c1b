"""Tensor parallelism for the PyTorch classes, on `torch.distributed.tensor` (DTensor).

Inside a `torchrun --nproc-per-node N` job (or any initialised process group):

    model = BloomForCausalLM.from_pretrained(path, tp_plan="auto")        # a 1-D mesh of N ranks
    model = BloomForCausalLM.from_pretrained(path, device_mesh=mesh)      # a mesh you made:
                                                                          # 1-D, or its "model" axis

The split is `bloomlm.sharding_plan`'s, applied with `parallelize_module`: `query_key_value` and
`dense_h_to_4h` ColwiseParallel, `dense` and `dense_4h_to_h` RowwiseParallel (one all-reduce
each), the word embedding RowwiseParallel (vocab-parallel lookup, one all-reduce) and the tied LM
head ColwiseParallel with its logits gathered, so every rank holds the same full logits and
`generate` picks the same token on every rank, in every decoding strategy (sampling ones when every
rank seeds torch alike; torch's default seed is the same in every process). LayerNorms and the
small heads stay plain replicated tensors; the row-parallel biases become replicated DTensors,
added once.

Loading reads each rank's slices straight from the safetensors files (`SliceReader`), so a rank
never holds more than its share plus one tensor; a parameter the checkpoint lacks is initialised
from one seed all ranks agree on. `.bin` checkpoints are refused with a ValueError that says to
convert them (`bloomlm convert SRC DST --to safetensors`): read whole on every rank they would
cost N full copies. With `pretraining_tp > 1` and `slow_but_exact`, the row-parallel layers are
plain (the ranks' all-reduce fixes the summation order instead).

Each rank's attention runs on its H/N heads: `parallelize` sets the attention's local head count
and the model's `num_heads` and `alibi_slopes`, sliced from the GLOBAL head index (rank r's head j
is global head r * H/N + j; slopes of the local count would be wrong); the engine's KVCache and
Decoder read both, so the cache holds the local heads ([L, N, H/N, S, D]; BLOOM's tuples
[B * H/N, D, S] at the API). Attention probabilities (`output_attentions`) are gathered over the
heads and a `head_mask` is sliced to the rank's heads, so outputs have the single-process shapes.
The compiled decode step (`compile=`) is not offered with tensor parallelism (steps run eager).
What needs the whole model refuses a split one (`tensor_parallel_mesh` is set) with a ValueError:
`compile=`, `save_pretrained` without `state_dict=full_state_dict(model)`, quantizing, resizing the
vocabulary, and the serving engine (one process; each rank would draw its own tokens).

gloo (CPU) is tested here with 2 and 4 processes; NCCL (CUDA, one GPU per rank: LOCAL_RANK) takes
the same code path and is untested unless run on two or more GPUs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from bloomlm import checkpoint_names
from bloomlm.alibi import alibi_slopes
from bloomlm.checkpoint import SliceReader
from bloomlm.config import BloomConfig
from bloomlm.errors import CheckpointError
from bloomlm.sharding_plan import (
    COLUMN,
    ROW,
    TENSOR_PARALLEL_AXIS,
    VOCAB,
    ParamShard,
    check_tensor_parallel,
    tensor_parallel_plan,
)

TP_PLANS = ("auto",)

# --------------------------------------------------------------------------------------------------
# The mesh
# --------------------------------------------------------------------------------------------------


def resolve_mesh(tp_plan: str | None, device_mesh: DeviceMesh | None) -> DeviceMesh:
    """The 1-D mesh the model is split over: `device_mesh` (or its "model" axis), else, for
    `tp_plan="auto"`, every rank of the process group (initialised from torchrun's environment
    when it is not yet)."""
    if tp_plan not in (None, *TP_PLANS):
        raise ValueError(f"tp_plan must be 'auto' (bloomlm.sharding_plan's split), got {tp_plan!r}")
    if device_mesh is not None:
        return _model_axis(device_mesh)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                "tp_plan='auto' splits the model over the ranks of a torch.distributed job: run "
                "the script with `torchrun --nproc-per-node N script.py`, or initialise the "
                "process group first, or pass device_mesh="
            )
        dist.init_process_group(_backend())
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    world = dist.get_world_size()
    return init_device_mesh(device_type, (world,), mesh_dim_names=(TENSOR_PARALLEL_AXIS,))


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _model_axis(mesh: Any) -> DeviceMesh:
    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"device_mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    names = mesh.mesh_dim_names
    if names is not None and TENSOR_PARALLEL_AXIS in names:
        return mesh if mesh.ndim == 1 else mesh[TENSOR_PARALLEL_AXIS]
    if mesh.ndim == 1 and names is None:
        return mesh
    raise ValueError(
        f"device_mesh has dimensions {names} but no {TENSOR_PARALLEL_AXIS!r} dimension: tensor "
        f"parallelism runs over the one named {TENSOR_PARALLEL_AXIS!r} (or a 1-D mesh); make it "
        f'with init_device_mesh(device_type, (N,), mesh_dim_names=("{TENSOR_PARALLEL_AXIS}",))'
    )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load(
    model: nn.Module,
    folder: Path,
    dtype: torch.dtype,
    mesh: DeviceMesh,
    use_safetensors: bool | None = None,
) -> dict[str, list]:
    """Fill `model` (built on the meta device) with this rank's slices of the checkpoint in
    `folder`, then split it over `mesh`; returns transformers' loading info."""
    config: BloomConfig = model.config
    ways, rank = mesh.size(), mesh.get_local_rank()
    check_tensor_parallel(config.n_head, ways)
    architecture = type(model).__name__
    plan = {s.name: s for s in tensor_parallel_plan(config, ways, architecture)}
    reader = SliceReader(folder, use_safetensors=use_safetensors)
    device = mesh.device_type
    is_head = model.base_model is not model
    assigned, unexpected = {}, []
    for ckpt_name, shape in reader.shapes.items():
        key = checkpoint_names.fit_base_prefix(ckpt_name, is_head)
        if key not in plan:
            unexpected.append(ckpt_name)
            continue
        if shape != plan[key].shape:
            raise CheckpointError(
                f"checkpoint weight {ckpt_name} has shape {shape} but the model built from "
                f"config.json expects {plan[key].shape} for {key}; check the config"
            )
        local = reader.read(ckpt_name, plan[key].local_slices(rank))
        assigned[key] = _distributed(local.to(device, _dtype_for(local, dtype)), plan[key], mesh)
    tied = {"lm_head.weight"} if config.tie_word_embeddings and "lm_head.weight" in plan else set()
    missing = [name for name in plan if name not in assigned and name not in tied]
    assigned.update(_initialised(missing, plan, config, dtype, mesh))
    model.load_state_dict(assigned, strict=False, assign=True)
    parallelize(model, mesh)
    return {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": [],
            "error_msgs": []}  # fmt: skip


def _dtype_for(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def _distributed(local: torch.Tensor, shard: ParamShard, mesh: DeviceMesh) -> torch.Tensor:
    """A split parameter as a DTensor over `mesh` from this rank's part; a replicated one as is."""
    if shard.dim is None:
        return local
    shape, stride = torch.Size(shard.shape), _contiguous(shard.shape)
    return DTensor.from_local(local, mesh, [Shard(shard.dim)], run_check=False, shape=shape,
                              stride=stride)  # fmt: skip


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _initialised(
    names: list[str],
    plan: dict[str, ParamShard],
    config: BloomConfig,
    dtype: torch.dtype,
    mesh: DeviceMesh,
) -> dict[str, torch.Tensor]:
    """transformers' initial values for parameters the checkpoint lacks (a new head), drawn from
    one seed every rank agrees on, so replicated ones are equal and split ones fit together."""
    if not names:
        return {}
    seed = torch.randint(2**62, (1,))
    dist.broadcast(seed, group=mesh.get_group(), group_src=0)
    generator = torch.Generator().manual_seed(int(seed))
    tensors = {}
    for name in names:
        shard = plan[name]
        whole = torch.empty(shard.shape, dtype=torch.float32)
        if name.endswith("bias"):
            whole.zero_()
        elif "layernorm" in name or name.startswith(("ln_f", "transformer.ln_f")):
            whole.fill_(1.0)
        else:
            whole.normal_(0.0, config.initializer_range, generator=generator)
        local = whole[shard.local_slices(mesh.get_local_rank())].to(mesh.device_type, dtype)
        tensors[name] = _distributed(local.contiguous(), shard, mesh)
    return tensors


# --------------------------------------------------------------------------------------------------
# Splitting a loaded model
# --------------------------------------------------------------------------------------------------


def parallel_styles(config: BloomConfig, ways: int, architecture: str) -> dict[str, Any]:
    """{module path pattern: ParallelStyle} for `parallelize_module`, from the plan's kinds."""
    plan = tensor_parallel_plan(config, ways, architecture)
    kinds = {s.name.removesuffix(".weight"): s.kind for s in plan if s.name.endswith("weight")}
    styles: dict[str, Any] = {}
    for module, kind in kinds.items():
        pattern = _layer_wildcard(module)
        if kind == COLUMN:
            styles[pattern] = ColwiseParallel()
        elif kind == ROW:
            styles[pattern] = RowwiseParallel()
        elif kind == VOCAB and module.endswith("word_embeddings"):
            styles[pattern] = RowwiseParallel(input_layouts=Replicate())
        elif kind == VOCAB:  # the LM head: gather the logits, every rank gets them all
            styles[pattern] = ColwiseParallel(output_layouts=Replicate())
    return styles


def _layer_wildcard(module: str) -> str:
    """`transformer.h.3.mlp.dense_h_to_4h` -> `transformer.h.*.mlp.dense_h_to_4h`."""
    parts = module.split(".")
    return ".".join("*" if i > 0 and parts[i - 1] == "h" and p.isdigit() else p
                    for i, p in enumerate(parts))  # fmt: skip


def parallelize(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split `model` (parameters already DTensors where the plan splits them) over `mesh`: install
    parallelize_module's input/output redistribution, the attention's local heads and slopes, the
    tied head, and the hooks that give attentions and head masks their single-process shapes."""
    config: BloomConfig = model.config
    ways, rank = mesh.size(), mesh.get_local_rank()
    styles = parallel_styles(config, ways, type(model).__name__)
    parallelize_module(model, mesh, styles, src_data_rank=None)  # each rank read its own data
    if config.tie_word_embeddings and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    local_heads = config.n_head // ways
    heads = slice(rank * local_heads, (rank + 1) * local_heads)
    base = model.base_model
    base.num_heads = local_heads
    base.alibi_slopes = torch.from_numpy(alibi_slopes(config.n_head)[heads])
    for block in base.h:
        attention = block.self_attention
        attention.num_heads = local_heads
        attention.tp_slices = 1  # the all-reduce fixes the summation order
        attention.register_forward_hook(_gather_probs(mesh))
    for module in {model, base}:
        module.tensor_parallel_mesh = mesh
        module.tensor_parallel_heads = heads  # read by the head-mask plumbing (pretrained.py)
    return model


def _gather_probs(mesh: DeviceMesh) -> Callable:
    """A forward hook: the attention probabilities [B, H/N, T, S] of every rank, concatenated
    over the heads (the last element of the attention's output, None unless asked for)."""

    def hook(module: nn.Module, args: tuple, output: tuple) -> tuple:
        probs = output[-1]
        if probs is None:
            return output
        parts = [torch.empty_like(probs) for _ in range(mesh.size())]
        dist.all_gather(parts, probs.contiguous(), group=mesh.get_group())
        return (*output[:-1], torch.cat(parts, dim=1))

    return hook


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards, and the replicated ones once)."""
    total = 0
    for param in model.parameters():  # each tied parameter once
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters (each DTensor gathered), e.g. for `save_pretrained` on rank 0."""
    return {name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            for name, tensor in model.state_dict().items()}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Starting the processes
# --------------------------------------------------------------------------------------------------


def launch(
    function: Callable[..., Any],
    world_size: int,
    *args: Any,
    shutdown_timeout: int = 30,
) -> list[Any]:
    """Run `function(*args)` in `world_size` processes on this machine, each with torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), through torch.distributed.run's
    API (elastic_launch); returns each rank's return value, rank 0 first. `function` must be
    importable by name (a module-level function): the processes are spawned. SIGTERM, SIGINT,
    SIGHUP or SIGQUIT here is forwarded to every process, which get `shutdown_timeout` seconds to
    exit before they are killed; then it is raised here (torch's SignalException)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
        monitor_interval=0.1, start_method="spawn",
        shutdown_timeout=shutdown_timeout,
    )  # fmt: skip
    results = elastic_launch(config, function)(*args)
    return [results[rank] for rank in range(world_size)]

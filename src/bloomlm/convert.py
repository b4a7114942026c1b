"""Model-folder tools behind `bloomlm convert` and `bloomlm info`.

`convert_checkpoint` rewrites a model folder in another weight format (safetensors, PyTorch .bin,
Flax msgpack), dtype or shard size, or quantized (`model.int8.safetensors`, loaded later without
quantizing again), tokenizer and generation config included; the new folder is built in a staging
folder beside it and renamed into place, so a failure leaves nothing behind.
`parameter_count`, `model_summary` and `memory_estimate` answer "how big is this model" from its
config alone.

Importing this module imports no framework: torch and jax/flax are imported inside the functions
that need them, so the command line starts fast.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bloomlm.checkpoint_names import QUANTIZE_MODES
from bloomlm.config import BloomConfig

FORMATS = ("safetensors", "bin", "flax")
CONVERT_DTYPES = ("auto", "float32", "float16", "bfloat16")
BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
BYTES_NAME = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8"}
HEAD_CLASSES = (
    "BloomModel",
    "BloomForCausalLM",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
)


# -- convert ---------------------------------------------------------------------------------------


def convert_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    to: str = "safetensors",
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    on_step: Callable[[], None] | None = None,
    quantize: str | None = None,
) -> str:
    """Write the model in `source` (a folder or name) to the new folder `out`; the class name used.

    `to` is one of FORMATS, `dtype` one of CONVERT_DTYPES ("auto" keeps the checkpoint's). The class
    is the first of the config's `architectures` that bloomlm has, else BloomForCausalLM. `on_step`
    is called after the weights and after the tokenizer are written (2 steps, for a progress bar).
    `quantize` (one of QUANTIZE_MODES) writes the quantized checkpoint `from_pretrained(...,
    quantize=...)` would build (`model.int8.safetensors` / `model.fp16.safetensors`, safetensors
    only); `dtype` is then the dtype of what stays float (biases, LayerNorms) and of the compute.
    """
    from bloomlm.files import staging_dir  # its tempfile import costs `bloomlm --help` time
    from bloomlm.hub import resolve_model_dir

    resolved = resolve_model_dir(source, ["config.json"])
    destination = Path(out)
    _check_convert_options(destination, to, dtype, quantize)
    config = BloomConfig.from_pretrained(resolved)
    names = config.architectures or []
    architecture = next((a for a in names if a in HEAD_CLASSES), "BloomForCausalLM")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(destination.parent, destination.name)
    try:
        _convert_weights(resolved, staging, architecture, to, dtype, max_shard_size, quantize)
        if on_step is not None:
            on_step()
        _copy_tokenizer(resolved, staging)
        if on_step is not None:
            on_step()
        if destination.exists():
            destination.rmdir()  # empty, checked above
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return architecture


def _check_convert_options(destination: Path, to: str, dtype: str, quantize: str | None) -> None:
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(
            f"{destination} already exists; convert writes a new folder and never overwrites one"
        )
    if dtype == "int8":
        raise ValueError(
            "dtype int8 is not a dtype convert writes (float32, float16, bfloat16); "
            "for int8 weights use quantize='int8' (--quantize int8)"
        )
    if quantize is not None and quantize not in QUANTIZE_MODES:
        allowed = ", ".join(QUANTIZE_MODES)
        raise ValueError(f"quantize must be one of {allowed}; got {quantize!r}")
    if quantize is not None and to != "safetensors":
        raise ValueError(f"quantized weights are written as safetensors only; got to={to!r}")
    if dtype not in CONVERT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(CONVERT_DTYPES)}; got {dtype!r}")
    if to not in FORMATS:
        raise ValueError(f"to must be one of {', '.join(FORMATS)}; got {to!r}")


def _has_torch_weights(folder: Path) -> bool:
    from bloomlm.checkpoint import WEIGHT_FILE_CANDIDATES

    return any((folder / name).is_file() for name in WEIGHT_FILE_CANDIDATES)


def _convert_weights(
    source: Path,
    staging: Path,
    architecture: str,
    to: str,
    dtype: str,
    max_shard_size: int | str,
    quantize: str | None = None,
) -> None:
    import bloomlm

    has_torch = _has_torch_weights(source)
    if to == "flax":
        flax_class = getattr(bloomlm, "Flax" + architecture, None)
        if flax_class is None:
            raise ValueError(f"there is no Flax class for {architecture}")
        param_dtype = None if dtype == "auto" else dtype
        model = flax_class.from_pretrained(source, from_pt=has_torch, param_dtype=param_dtype)
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        return
    torch_class = getattr(bloomlm, architecture)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if quantize is not None:
        # Both int8 modes write the same tensors; the weight-only one skips fbgemm's packing.
        kwargs["quantize"] = "int8-weight-only" if quantize.startswith("int8") else quantize
    if not has_torch:
        kwargs["state_dict"] = flax_state_dict(source)
        if dtype == "auto":
            kwargs["torch_dtype"] = next(iter(kwargs["state_dict"].values())).dtype
    model = torch_class.from_pretrained(source, **kwargs)
    safe = to == "safetensors"
    model.save_pretrained(staging, safe_serialization=safe, max_shard_size=max_shard_size)


def flax_state_dict(source: str | os.PathLike) -> dict[str, Any]:
    """PyTorch tensors (transformers' names) from a folder holding only Flax msgpack weights."""
    import numpy as np
    import torch

    from bloomlm.flax import files, weights

    config = BloomConfig.from_pretrained(source)
    arrays = weights.flax_to_torch(files.read_msgpack(source), config)
    tensors = {}
    for name, array in arrays.items():
        if array.dtype.name == "bfloat16":  # NumPy has no bfloat16; go through float32
            as_float32 = np.asarray(array, dtype=np.float32)
            tensors[name] = torch.from_numpy(as_float32).to(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(np.array(array))  # a writable copy, as torch wants
    return tensors


def _copy_tokenizer(source: Path, staging: Path) -> None:
    from bloomlm.tokenizer import BloomTokenizerFast

    if (source / "tokenizer.json").is_file():
        BloomTokenizerFast.from_pretrained(source).save_pretrained(staging)
    generation = source / "generation_config.json"
    if generation.is_file() and not (staging / generation.name).exists():
        shutil.copy2(generation, staging / generation.name)


# -- info ------------------------------------------------------------------------------------------


def parameter_count(config: BloomConfig) -> int:
    """Parameters of BloomForCausalLM(config), counted on the meta device (no weights in memory)."""
    import torch

    from bloomlm.torch.model import BloomForCausalLM

    with torch.device("meta"):
        return BloomForCausalLM(config).num_parameters()


def model_summary(config: BloomConfig, n_params: int) -> dict[str, Any]:
    """The config's shape fields, the parameter count and the weights' bytes in each dtype."""
    summary = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "head_dim": config.hidden_size // config.n_head,
        "pretraining_tp": config.pretraining_tp,
        "torch_dtype": config.torch_dtype,
        "architectures": config.architectures,
        "parameters": n_params,
    }
    for dtype, size in BYTES_PER_DTYPE.items():
        summary[f"bytes_{BYTES_NAME.get(dtype, dtype)}"] = n_params * size
    return summary


def memory_estimate(
    config: BloomConfig, n_params: int, dtype: str, batch: int, length: int
) -> dict[str, int]:
    """Rough bytes to run `batch` sequences of `length` tokens (prompt + generated) in `dtype`.

    weights; KV cache (keys and values of every layer); the prompt's attention bias/scores
    [B, H, L, L]; hidden activations of one block ([B, L, 4*hidden] MLP intermediate and a few
    [B, L, hidden]); last-position logits [B, vocab] in float32.
    """
    size = BYTES_PER_DTYPE[dtype]
    compute = 2 if dtype == "int8" else size  # int8 weights compute in half precision
    weights = n_params * size
    if dtype == "int8":  # + a float32 scale per output row (embedding: vocab; a block: 9 hidden)
        weights += (config.vocab_size + 9 * config.n_layer * config.hidden_size) * 4
    estimate = {
        "weights": weights,
        "kv_cache": 2 * config.n_layer * batch * length * config.hidden_size * compute,
        "attention": batch * config.n_head * length * length * compute,
        "activations": batch * length * 8 * config.hidden_size * compute,
        "logits": batch * config.vocab_size * 4,
    }
    estimate["total"] = sum(estimate.values())
    return estimate

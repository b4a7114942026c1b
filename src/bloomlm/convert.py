"""Model-folder tools behind `bloomlm convert` and `bloomlm info`.

`convert_checkpoint` rewrites a model folder in another weight format (safetensors, PyTorch .bin,
Flax msgpack), dtype or shard size, or quantized (`model.int8.safetensors`, loaded later without
quantizing again), tokenizer and generation config included; the new folder is built aside and
committed in one step (`bloomlm.files.folder_save`), so a failure or a crash leaves no folder, never
a partial one.
`parameter_count`, `model_summary` and `memory_estimate` answer "how big is this model" from its
config alone.

Importing this module imports no framework: torch and jax/flax are imported inside the functions
that need them (none for `info`), so the command line starts fast.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bloomlm.checkpoint_names import FLAX_WEIGHT_FILES, PYTORCH_WEIGHT_FILES, QUANTIZE_MODES
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


# Over 40 lines: the signature's options documented; the body is one commit of two steps.
def convert_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    to: str = "safetensors",
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    on_step: Callable[[], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    quantize: str | None = None,
) -> str:
    """Write the model in `source` (a folder or name) to the new folder `out`; the class name used.

    `to` is one of FORMATS, `dtype` one of CONVERT_DTYPES ("auto" keeps the checkpoint's, and the
    config's `torch_dtype` always names the dtype written). The class is the first of the config's
    `architectures` that bloomlm has, else BloomForCausalLM. `on_step` is called after the weights
    and after the tokenizer are written (2 steps); `on_progress(bytes written, bytes expected)`
    while the weights are written (a few times a second, and once at the end).
    `quantize` (one of QUANTIZE_MODES) writes the quantized checkpoint `from_pretrained(...,
    quantize=...)` would build (`model.int8.safetensors` / `model.fp16.safetensors`, safetensors
    only); `dtype` is then the dtype of what stays float (biases, LayerNorms) and of the compute.
    """
    from bloomlm import files
    from bloomlm.hub import resolve_model_dir

    resolved = resolve_model_dir(source, ["config.json"])
    destination = Path(out)
    _check_convert_options(destination, to, dtype, quantize)
    architecture = architecture_of(BloomConfig.from_pretrained(resolved))
    # One commit for the whole folder; `require_empty` checks again under the lock, so of two
    # converts to one folder the second fails instead of replacing the first one's result.
    with files.folder_save(destination, files.owns_everything, require_empty=True) as staging:
        with _watch_bytes(staging, on_progress) as expect:
            _convert_weights(
                resolved, staging, architecture, to, dtype, max_shard_size, expect, quantize
            )
        if on_step is not None:
            on_step()
        _copy_tokenizer(resolved, staging)
        if on_step is not None:
            on_step()
    return architecture


def _check_convert_options(destination: Path, to: str, dtype: str, quantize: str | None) -> None:
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        from bloomlm import files

        files.clean_leftovers(destination)  # of a convert into it that was interrupted
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


def architecture_of(config: BloomConfig) -> str:
    """The class a folder holds: the first of its config's `architectures` that bloomlm has, else
    BloomForCausalLM."""
    names = config.architectures or []
    return next((a for a in names if a in HEAD_CLASSES), "BloomForCausalLM")


def weight_formats(folder: str | os.PathLike) -> set[str]:
    """Which weights `folder` holds: a subset of {"pytorch", "flax"} (by file name only)."""
    folder = Path(folder)
    formats = set()
    if any((folder / name).is_file() for name in PYTORCH_WEIGHT_FILES):
        formats.add("pytorch")
    if any((folder / name).is_file() for name in FLAX_WEIGHT_FILES):
        formats.add("flax")
    return formats


@contextmanager
def _watch_bytes(
    folder: Path, on_progress: Callable[[int, int], None] | None, interval: float = 0.2
) -> Iterator[Callable[[int], None]]:
    """Report the bytes in `folder` to `on_progress(written, expected)` every `interval` seconds
    from a background thread, and once at the end. Yields `expect(total)`, which sets the size
    the weights will have (known once they are loaded); nothing is reported before it is called.

    Watching the folder, rather than hooking every writer, gives progress for each format
    (safetensors, .bin, msgpack) and shard size alike.
    """
    if on_progress is None:
        yield lambda total: None
        return
    expected: list[int] = []
    done = threading.Event()

    def written() -> int:
        total = 0
        for entry in os.scandir(folder):
            try:
                total += entry.stat().st_size if entry.is_file() else 0
            except FileNotFoundError:  # a temporary file renamed meanwhile
                pass
        return total

    def watch() -> None:
        while not done.wait(interval):
            if expected:
                on_progress(min(written(), expected[0]), expected[0])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield expected.append
    finally:
        done.set()
        watcher.join()
    if expected:
        on_progress(expected[0], expected[0])


def _convert_weights(
    source: Path,
    staging: Path,
    architecture: str,
    to: str,
    dtype: str,
    max_shard_size: int | str,
    expect: Callable[[int], None],
    quantize: str | None = None,
) -> None:
    import bloomlm

    has_torch = "pytorch" in weight_formats(source)
    if to == "flax":
        flax_class = getattr(bloomlm, "Flax" + architecture, None)
        if flax_class is None:
            raise ValueError(f"there is no Flax class for {architecture}")
        param_dtype = None if dtype == "auto" else dtype
        model = flax_class.from_pretrained(source, from_pt=has_torch, param_dtype=param_dtype)
        if param_dtype is not None:  # the config names the dtype the weights are written in
            model.config.torch_dtype = param_dtype
        expect(_tree_bytes(model.params))
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
    expect(sum(p.numel() * p.element_size() for p in model.parameters()))
    safe = to == "safetensors"
    model.save_pretrained(staging, safe_serialization=safe, max_shard_size=max_shard_size)


def _tree_bytes(tree: Any) -> int:
    """Bytes of every array in a nested dict of arrays (Flax params)."""
    if isinstance(tree, dict):
        return sum(_tree_bytes(value) for value in tree.values())
    return int(tree.size * tree.dtype.itemsize)


def flax_state_dict(source: str | os.PathLike) -> dict[str, Any]:
    """PyTorch tensors (transformers' names) from a folder holding only Flax msgpack weights."""
    from bloomlm.torch.from_flax import flax_state_dict as read

    return read(source)


def _copy_tokenizer(source: Path, staging: Path) -> None:
    from bloomlm.tokenizer import BloomTokenizerFast

    if (source / "tokenizer.json").is_file():
        BloomTokenizerFast.from_pretrained(source).save_pretrained(staging)
    generation = source / "generation_config.json"
    if generation.is_file() and not (staging / generation.name).exists():
        from bloomlm import files

        files.write_bytes(staging / generation.name, generation.read_bytes())


# -- info ------------------------------------------------------------------------------------------


def parameter_count(config: BloomConfig, architecture: str = "BloomForCausalLM") -> int:
    """Parameters of `architecture`(config), as `num_parameters()` counts them (a tied LM head
    once), from the shapes alone: no framework is imported, so this is instant at any size."""
    from bloomlm.config import check_model_size

    check_model_size(config)  # an absurd config is refused before any arithmetic on it
    hidden, vocab = config.hidden_size, config.vocab_size
    # Per block: 2 LayerNorms (4h), fused QKV (3h^2 + 3h), attention output (h^2 + h),
    # MLP up (4h^2 + 4h) and down (4h^2 + h).
    block = 12 * hidden * hidden + 13 * hidden
    # Word embeddings, their LayerNorm, the blocks, the final LayerNorm.
    base = vocab * hidden + 2 * hidden + config.n_layer * block + 2 * hidden
    heads = {
        "BloomModel": 0,
        "BloomForCausalLM": 0 if config.tie_word_embeddings else vocab * hidden,
        "BloomForSequenceClassification": config.num_labels * hidden,  # score: no bias
        "BloomForTokenClassification": config.num_labels * (hidden + 1),
        "BloomForQuestionAnswering": 2 * (hidden + 1),
    }
    if architecture not in heads:
        raise ValueError(f"architecture must be one of {', '.join(heads)}; got {architecture!r}")
    return base + heads[architecture]


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

"""The names in a model folder that both frameworks agree on, framework-free: the weight files and
the `transformer` prefix of the base model's parameters.

Weight files, as transformers 4.37 names them (a shard index is `<file>.index.json`, its shards
`<stem>-00001-of-00003.<extension>`):

    model.safetensors   pytorch_model.bin   (PyTorch; read in that order, single file before index)
    flax_model.msgpack                      (Flax)
    tf_model.h5                             (TensorFlow; never read, only named in error messages)
    model.int8.safetensors                  (bloomlm's quantized saves: int8 weights + scales;
    model.fp16.safetensors                   float16 weights; config.json's `quantization` entry
                                             names the format. transformers finds no weights there
                                             and says so, instead of misreading them)

Prefix: a head model (`BloomForCausalLM`, ...) keeps the base model under `transformer`, so its
parameters are `transformer.h.0...` (PyTorch) or `transformer/h/0/...` (Flax), beside the head's own
weights (`lm_head`, `score`, `classifier`, `qa_outputs`). A base-model checkpoint has no prefix; it
loads into a head, and a head checkpoint into the base model: the prefix is added or stripped name
by name.
"""

from __future__ import annotations

import re

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
FLAX_WEIGHTS_NAME = "flax_model.msgpack"
FLAX_WEIGHTS_INDEX_NAME = "flax_model.msgpack.index.json"
TF_WEIGHTS_NAME = "tf_model.h5"

# transformers' search order for PyTorch weights in a folder.
PYTORCH_WEIGHT_FILES = (
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
)
FLAX_WEIGHT_FILES = (FLAX_WEIGHTS_NAME, FLAX_WEIGHTS_INDEX_NAME)

# The `quantize=` modes (`--quantize` on the command line), and the weight format each saves: both
# int8 modes store the same int8 weights and scales, and differ only in the kernel that runs them.
QUANTIZE_MODES = ("int8", "int8-weight-only", "fp16")
QUANTIZED_FORMATS = {"int8": "int8", "int8-weight-only": "int8", "fp16": "fp16"}
QUANTIZED_WEIGHTS_NAMES = {"int8": "model.int8.safetensors", "fp16": "model.fp16.safetensors"}
QUANTIZED_WEIGHT_FILES = tuple(
    name for single in QUANTIZED_WEIGHTS_NAMES.values() for name in (single, single + ".index.json")
)

BASE_PREFIX = "transformer"
# The heads' own modules: their weights sit beside `transformer`, never under it.
HEAD_MODULE_NAMES = ("lm_head", "score", "classifier", "qa_outputs")


def shard_file_name(weights_name: str, number: int, count: int) -> str:
    """transformers' name of shard `number` (from 1) of `count`: model.safetensors ->
    model-00001-of-00003.safetensors."""
    stem, extension = weights_name.rsplit(".", 1)
    return f"{stem}-{number:05d}-of-{count:05d}.{extension}"


def is_shard_file_name(file_name: str, weights_name: str) -> bool:
    """Whether `file_name` is a shard name `shard_file_name` gives for `weights_name`."""
    stem, extension = (re.escape(part) for part in weights_name.rsplit(".", 1))
    return re.fullmatch(rf"{stem}-\d{{5}}-of-\d{{5}}\.{extension}", file_name) is not None


def add_base_prefix(name: str, sep: str = ".") -> str:
    """`name` as a head model spells it: under `transformer` unless it is already or names a head's
    own weight. `sep` is "." for PyTorch names, "/" for Flax paths."""
    first = name.split(sep, 1)[0]
    if first == BASE_PREFIX or first in HEAD_MODULE_NAMES:
        return name
    return f"{BASE_PREFIX}{sep}{name}"


def strip_base_prefix(name: str, sep: str = ".") -> str:
    """`name` as the base model spells it: without a leading `transformer`."""
    first, _, rest = name.partition(sep)
    return rest if first == BASE_PREFIX and rest else name


def fit_base_prefix(name: str, model_is_head: bool, sep: str = ".") -> str:
    """A checkpoint's `name` as the model being loaded spells it (see add/strip_base_prefix)."""
    return add_base_prefix(name, sep) if model_is_head else strip_base_prefix(name, sep)

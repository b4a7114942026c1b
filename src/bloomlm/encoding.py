"""`BatchEncoding`, what the tokenizer returns, and the list <-> tensor conversions it uses.

Tensors are made only when asked for, and torch and jax are imported only then, so tokenizer-only
work never loads a framework. The backend `tokenizers.Encoding` of each row is kept for token/word
maps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Encoding

# The tokenizer's logger: BatchEncoding was defined in bloomlm.tokenizer, and users filter on that.
logger = logging.getLogger("bloomlm.tokenizer")

TENSOR_TYPES = ("pt", "np", "jax")


class BatchEncoding(dict):
    """What the tokenizer returns: a dict of features (`input_ids`, `attention_mask`, ...) + extras.

    Features are also attributes (`enc.input_ids`). `enc[i]` with an int is the backend
    `tokenizers.Encoding` of row i (char/word/token maps). Values are lists, or tensors of one
    framework.
    """

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        encoding: Encoding | Sequence[Encoding] | None = None,
        tensor_type: str | None = None,
        n_sequences: int | None = None,
    ) -> None:
        super().__init__(data or {})
        if isinstance(encoding, Encoding):
            encoding = [encoding]
        self._encodings = list(encoding) if encoding is not None else None
        if n_sequences is None and self._encodings:
            n_sequences = self._encodings[0].n_sequences
        self._n_sequences = n_sequences
        self.convert_to_tensors(tensor_type)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        if isinstance(key, int) and self._encodings is not None:
            return self._encodings[key]
        if isinstance(key, slice):
            return {name: value[key] for name, value in self.items()}
        raise KeyError(
            f"BatchEncoding keys are feature names (str), row indices (int) or slices; got {key!r}"
        )

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: features double as attributes.
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return dict.__getitem__(self, name)
        except KeyError:
            raise AttributeError(f"BatchEncoding has no feature or attribute {name!r}") from None

    @property
    def encodings(self) -> list[Encoding] | None:
        """The backend encodings, one per row (None when built by `pad`)."""
        return self._encodings

    @property
    def n_sequences(self) -> int | None:
        """1 for single texts, 2 for pairs, None when unknown."""
        return self._n_sequences

    @property
    def is_fast(self) -> bool:
        return self._encodings is not None

    def _encoding(self, batch_index: int) -> Encoding:
        if self._encodings is None:
            raise ValueError(
                "token/word maps are only available on encodings made by the tokenizer's __call__, "
                "not by pad()"
            )
        return self._encodings[batch_index]

    def tokens(self, batch_index: int = 0) -> list[str]:
        """The token strings of row `batch_index`."""
        return self._encoding(batch_index).tokens

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of row `batch_index`, the index of its word (None for special/pad)."""
        return self._encoding(batch_index).word_ids

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """For each token of row `batch_index`: 0 (text), 1 (text_pair) or None (special/pad)."""
        return self._encoding(batch_index).sequence_ids

    def convert_to_tensors(self, tensor_type: str | None = None) -> BatchEncoding:
        """Turn every feature into a tensor of `tensor_type` ("pt", "np", "jax"); None: lists."""
        framework = check_return_tensors(tensor_type)
        if framework is None:
            return self
        for key, value in self.items():
            if not is_tensor(value):
                self[key] = as_tensor(value, framework, key)
        return self

    def to(self, device: Any) -> BatchEncoding:
        """Move every torch tensor to `device` (str, int or torch.device) in place; returns self."""
        import torch

        if not isinstance(device, str | int | torch.device):
            # transformers' behaviour: a dtype or module passed here (e.g. by APEX) is ignored.
            logger.warning(
                "Attempting to cast a BatchEncoding to %s; only devices are supported.", device
            )
            return self
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device=device)
        return self


def check_return_tensors(return_tensors: Any) -> str | None:
    """The framework `return_tensors` names ("pt", "np", "jax"), or None; ValueError for others."""
    if return_tensors is None:
        return None
    use = "None (lists), 'pt' (torch), 'np' (numpy) or 'jax'"
    return enum_choice("return_tensors", return_tensors, TENSOR_TYPES, use)


def enum_choice(name: str, value: Any, allowed: Any, use: str) -> str:
    """`value` as one of the `allowed` strings (transformers' enums, such as TensorType or
    PaddingStrategy, give their `.value`); else a ValueError saying what to `use`."""
    choice = getattr(value, "value", value)
    if choice not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use {use}")
    return choice


def is_tensor(value: Any) -> bool:
    # Lists and tuples are the only values built here; anything with a shape is already a tensor.
    return not isinstance(value, list | tuple) and hasattr(value, "shape")


def as_tensor(value: Any, framework: str, key: str) -> Any:
    """Feature `key`'s list as a tensor of `framework`; ValueError for rows of different lengths."""
    if isinstance(value, list | tuple) and value and isinstance(value[0], list | tuple):
        lengths = {len(row) for row in value}
        if len(lengths) > 1:
            raise ValueError(
                f"Unable to create a tensor from `{key}`: its rows have different lengths "
                f"{sorted(lengths)}. Use padding=True (and truncation=True if needed) to get "
                "batched tensors of one length."
            )
    if framework == "pt":
        import torch

        tensor = torch.tensor(value)
        # An empty list has no element type and would become float; ids and masks are integers.
        return tensor.long() if tensor.numel() == 0 else tensor
    array = np.asarray(value)
    if array.size == 0:
        array = array.astype(np.int64)
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array)  # int32 unless jax_enable_x64, exactly as transformers returns
    return array


def to_python(value: Any) -> Any:
    """Lists from tensors and arrays (pad works on lists, like transformers)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [to_python(item) for item in value]
    return value


def framework_of(value: Any) -> str | None:
    """The framework ("pt", "np", "jax") whose tensor `value` (or its first row) is; None: lists."""
    if isinstance(value, list | tuple) and value:
        value = value[0]
    module = type(value).__module__.split(".")[0]
    return {"torch": "pt", "numpy": "np", "jax": "jax", "jaxlib": "jax"}.get(module)

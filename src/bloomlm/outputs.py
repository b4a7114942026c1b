"""Model outputs: dataclasses with transformers' field names that also behave like tuples.

transformers returns `ModelOutput`s that can be read as `out.logits`, `out["logits"]` or `out[0]`,
and with `return_dict=False` a plain tuple of the fields that are not None. These classes give the
same three views, so code written against either shape keeps working. Framework-free: fields hold
whatever tensors the model produced. Every output of bloomlm (the models' and `generate`'s, both
frameworks) is one of these, so they all follow one rule.

The rule is transformers' (its ModelOutput is an OrderedDict of the fields that are set): it acts as
a mapping, so iterating, `list(out)` and unpacking go over the *names* of the set fields, as with a
dict; `out.to_tuple()` (or `out[:]`) gives their values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any


class ModelOutput:
    """Base: attribute, key and index access over the fields that are set (not None); iterating
    yields their names, as a dict's keys (transformers' rule)."""

    def to_tuple(self) -> tuple:
        return tuple(
            getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        )

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return list(self.to_tuple())

    def items(self) -> list[tuple[str, Any]]:
        return list(zip(self.keys(), self.to_tuple()))

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, None) if key in self.keys() else default

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(
                    f"{key!r} is not set in this {type(self).__name__}; set fields: {self.keys()}"
                )
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.to_tuple())


@dataclass(repr=False)
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None
    cross_attentions: Any = None  # always None for BLOOM; kept for the transformers field set


@dataclass(repr=False)
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Any = None
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None
    cross_attentions: Any = None


@dataclass(repr=False)
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Any = None
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclass(repr=False)
class TokenClassifierOutput(ModelOutput):
    loss: Any = None
    logits: Any = None
    hidden_states: Any = None
    attentions: Any = None


@dataclass(repr=False)
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Any = None
    start_logits: Any = None
    end_logits: Any = None
    hidden_states: Any = None
    attentions: Any = None


def _repr(self: ModelOutput) -> str:
    shown = ", ".join(f"{k}={_describe(v)}" for k, v in self.items())
    return f"{type(self).__name__}({shown})"


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"<{type(value).__name__} {tuple(shape)} {getattr(value, 'dtype', '')}>"
    if isinstance(value, tuple):
        return f"<tuple of {len(value)}>"
    return repr(value)


ModelOutput.__repr__ = _repr

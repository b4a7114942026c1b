"""Outputs of the Flax models: transformers' Flax field names, readable as attributes, keys or a
tuple.

Each class is a `flax.struct.dataclass`, so it is a pytree and can be returned from a function under
`jax.jit`; it is also a `bloomlm.outputs.ModelOutput`, so `out.logits`, `out["logits"]`, `out[0]`
and `out.to_tuple()` all work. `past_key_values` (the updated cache) is set only when a cache was
passed in; it comes second, where transformers puts it in the tuple form.
"""

from __future__ import annotations

from typing import Any

from flax import struct

from bloomlm.outputs import ModelOutput


@struct.dataclass(repr=False)
class FlaxBaseModelOutput(ModelOutput):
    last_hidden_state: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@struct.dataclass(repr=False)
class FlaxCausalLMOutput(ModelOutput):
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@struct.dataclass(repr=False)
class FlaxSequenceClassifierOutput(ModelOutput):
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@struct.dataclass(repr=False)
class FlaxTokenClassifierOutput(ModelOutput):
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@struct.dataclass(repr=False)
class FlaxQuestionAnsweringModelOutput(ModelOutput):
    start_logits: Any = None
    end_logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None

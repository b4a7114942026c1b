"""The prompt `generate` decodes from, checked once: ids [B, L], their attention mask, and what the
first forward pass reads instead of the ids' embeddings when there is something else.

transformers 4.37 lets a decoder-only model start from `inputs_embeds` [B, T, C] (the ids returned
then start with `input_ids` if given, else a bos token per row, and the mask covers the
embeddings), and asks the model's `prepare_inputs_for_generation` for every forward pass's inputs.
PEFT's prompt learning (prompt tuning, p-tuning) replaces that method on the model it wraps: on the
first pass it puts its virtual tokens' embeddings before the prompt's and widens the mask.
`PrefillInputs` asks that method for the first pass's inputs (and for every pass when nothing is
cached, as transformers does); later steps feed generated ids, which is all PEFT changes for them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from bloomlm.generation import GenerationConfig
from bloomlm.torch.decoding.processors import eos_list

logger = logging.getLogger("bloomlm.torch.generate")

_ALLOWED_KWARGS = (
    "allowed are `input_ids`, `attention_mask`, `inputs_embeds`, the GenerationConfig fields, "
    "`compile`, `generator` and `max_model_len`"
)


@dataclasses.dataclass
class Prompt:
    """ids [B, L] and mask [B, L] (the rows the loops extend); `embeds` [B, T, C] and
    `embeds_mask` [B, T] when the first pass reads embeddings (`generate(inputs_embeds=)`)."""

    ids: torch.Tensor
    mask: torch.Tensor
    embeds: torch.Tensor | None = None
    embeds_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def length(self) -> int:
        return self.ids.shape[1]


def prepare_inputs(
    model: Any, inputs: torch.Tensor | None, model_kwargs: dict[str, Any], config: GenerationConfig
) -> Prompt:
    """Check the prompt and its mask; build the mask as transformers does when none is given."""
    input_ids = model_kwargs.pop("input_ids", None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    embeds = model_kwargs.pop("inputs_embeds", None)
    if model_kwargs:
        raise ValueError(
            f"generate() got unknown arguments {sorted(model_kwargs)}: {_ALLOWED_KWARGS}"
        )
    if inputs is not None and input_ids is not None:
        raise ValueError("pass the prompt once: either `inputs` or `input_ids`, not both")
    input_ids = inputs if inputs is not None else input_ids
    if embeds is not None:
        config.use_cache = True  # as transformers: the embeddings are read on the first pass only
        return _embeds_prompt(model, input_ids, embeds, attention_mask, config)
    input_ids = _prompt_ids(model, input_ids, attention_mask, config)
    if attention_mask is None:
        attention_mask = _default_attention_mask(
            input_ids, config.pad_token_id, config.eos_token_id
        )
    else:
        _check_mask(attention_mask, input_ids.shape, "input_ids")
    pad = config.pad_token_id
    if pad is not None and bool((input_ids[:, -1] == pad).any()):
        logger.warning(
            "A decoder-only architecture is being used, but right-padding was detected! For "
            "correct generation results, please set `padding_side='left'` when initializing the "
            "tokenizer."
        )
    return Prompt(input_ids, attention_mask)


def _embeds_prompt(
    model: Any, input_ids: Any, embeds: Any, attention_mask: Any, config: GenerationConfig
) -> Prompt:
    """transformers' decoder-only `inputs_embeds` rule: the embeddings are the first pass's
    input; the ids returned start with `input_ids` (or one bos token per row)."""
    hidden_size = getattr(model.config, "hidden_size", None)
    if (
        not isinstance(embeds, torch.Tensor)
        or embeds.dim() != 3
        or not embeds.is_floating_point()
        or embeds.shape[1] == 0
        or (hidden_size is not None and embeds.shape[2] != hidden_size)
    ):
        got = list(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(
            f"`inputs_embeds` must be a float tensor [batch, length >= 1, hidden_size="
            f"{hidden_size}], got {got}"
        )
    if input_ids is None:
        if config.bos_token_id is None:
            raise ValueError("`bos_token_id` has to be defined when no `input_ids` are provided")
        input_ids = embeds.new_full((embeds.shape[0], 1), config.bos_token_id, dtype=torch.long)
    else:
        input_ids = _prompt_ids(model, input_ids, None, config)
    if input_ids.shape[0] != embeds.shape[0]:
        raise ValueError(
            f"`input_ids` and `inputs_embeds` must have the same batch size, got "
            f"{input_ids.shape[0]} and {embeds.shape[0]}"
        )
    if attention_mask is None:
        attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    else:
        _check_mask(attention_mask, embeds.shape[:2], "inputs_embeds")
    ids_mask = torch.ones_like(input_ids)
    return Prompt(input_ids, ids_mask, embeds, attention_mask)


def _check_mask(attention_mask: Any, shape: torch.Size, name: str) -> None:
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == shape:
        return
    got = (
        list(attention_mask.shape)
        if isinstance(attention_mask, torch.Tensor)
        else type(attention_mask).__name__
    )
    raise ValueError(f"`attention_mask` must have the shape of `{name}` {list(shape)}, got {got}")


def _prompt_ids(
    model: Any, input_ids: Any, attention_mask: Any, config: GenerationConfig
) -> torch.Tensor:
    """The checked prompt [B, L] as int64, or a lone bos token when none is given."""
    if input_ids is None:  # start from a lone bos token
        if attention_mask is not None:
            raise ValueError("`attention_mask` was given without `input_ids`; pass both or neither")
        if config.bos_token_id is None:
            raise ValueError("`bos_token_id` has to be defined when no `input_ids` are provided")
        device = getattr(model, "device", None)  # None for a model without parameters
        return torch.full((1, 1), config.bos_token_id, dtype=torch.long, device=device)
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
    ):
        got = (
            f"{input_ids.dtype} of shape {list(input_ids.shape)}"
            if isinstance(input_ids, torch.Tensor)
            else repr(input_ids)
        )
        raise ValueError(
            f"`input_ids` must be an integer tensor of shape [batch, length], got {got}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"`input_ids` must hold at least one token per row, got shape {list(input_ids.shape)}"
        )
    check_vocabulary(model, input_ids, "input_ids")
    return input_ids.long()


def check_vocabulary(model: Any, ids: torch.Tensor, name: str) -> None:
    """Every id of `ids` must be a row of the model's embedding."""
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is None:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"token id {bad} in `{name}` is outside the vocabulary: ids must lie in "
            f"[0, {vocab_size})"
        )


def _default_attention_mask(
    input_ids: torch.Tensor, pad: int | None, eos: int | list[int] | None
) -> torch.Tensor:
    """Mask out pad tokens, unless pad is also an eos token (then nothing can be told apart)."""
    eos_ids = eos_list(eos)
    if (
        pad is not None
        and bool((input_ids == pad).any())
        and (eos_ids is None or pad not in eos_ids)
    ):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids)


class PrefillInputs:
    """What a pass over the whole sequence (the first, or every one without a cache) reads:
    the caller's embeddings, or the inputs the model's `prepare_inputs_for_generation` builds
    (PEFT's prompt learning: virtual tokens' embeddings and a wider mask), or the ids."""

    def __init__(self, hook: Any = None, embeds: torch.Tensor | None = None,
                 embeds_mask: torch.Tensor | None = None):  # fmt: skip
        self.hook, self.embeds, self.embeds_mask = hook, embeds, embeds_mask
        self._first: tuple[torch.Tensor | None, torch.Tensor] | None = None
        self.uses_embeds = embeds is not None  # known for a hook once `columns` asked it

    @classmethod
    def for_prompt(cls, model: Any, prompt: Prompt, expand: int) -> PrefillInputs:
        """Rows expanded `expand` times (beams, returned sequences), as transformers does before
        its first pass; `model`'s hook, when it has one."""
        if prompt.embeds is not None:
            return cls(None, prompt.embeds.repeat_interleave(expand, dim=0),
                       prompt.embeds_mask.repeat_interleave(expand, dim=0))  # fmt: skip
        hook = getattr(model, "prepare_inputs_for_generation", None)
        return cls(hook if callable(hook) else None)

    def columns(self, ids: torch.Tensor, mask: torch.Tensor) -> int:
        """How many cache columns the first pass over `ids` fills (more than L with embeddings)."""
        self._first = self(ids, mask)
        embeds, first_mask = self._first
        self.uses_embeds = embeds is not None
        return ids.shape[1] if embeds is None else first_mask.shape[1]

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(embeddings or None, mask) for a pass over the whole sequence `ids` [N, L]."""
        if self._first is not None:  # computed by `columns` for this very pass
            first, self._first = self._first, None
            return first
        if self.embeds is not None:
            return self.embeds, self.embeds_mask
        if self.hook is None:
            return None, mask
        inputs = self.hook(ids, past_key_values=None, attention_mask=mask, use_cache=True)
        if inputs.get("past_key_values") is not None:
            raise ValueError(
                "the model's prepare_inputs_for_generation returned `past_key_values` for the "
                "first pass (PEFT's prefix tuning does); bloomlm's generate takes ids or "
                "`inputs_embeds` there: use prompt tuning or p-tuning, or transformers' model"
            )
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            return None, mask
        hook_mask = inputs.get("attention_mask")
        if hook_mask is None:
            hook_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, hook_mask

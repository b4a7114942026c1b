"""Classifier-free guidance (`guidance_scale`, `negative_prompt_ids`): transformers 4.37's
UnbatchedClassifierFreeGuidanceLogitsProcessor, with its own decoder for the unconditional pass.

The processor is the first of the chain. Each call it advances the unconditional sequence by the
last token of `input_ids` (the first call starts it from the negative prompt, or from that last
token alone) and returns scale * (log p(x | prompt) - log p(x | negative)) + log p(x | negative).
Like transformers', it keeps one unconditional row per row it is called with and never reorders
them with beams.
"""

from __future__ import annotations

from typing import Any

import torch

from bloomlm.generation import GenerationConfig
from bloomlm.torch.decoding.inputs import Prompt, check_vocabulary


class ClassifierFreeGuidance:
    """The guidance processor `(input_ids [N, L], scores [N, V]) -> scores`; see the module."""

    def __init__(
        self, scale: float, source: Any, ids: torch.Tensor | None, mask: torch.Tensor | None,
        use_cache: bool, steps: int,
    ):  # fmt: skip
        self.scale, self.source, self.use_cache, self.steps = scale, source, use_cache, steps
        self.ids, self.mask = ids, mask
        self.decoder: Any = None

    @classmethod
    def build(
        cls, source: Any, config: GenerationConfig, prompt: Prompt, negative_ids: Any,
        negative_mask: Any,
    ) -> ClassifierFreeGuidance:  # fmt: skip
        """Checked at the API boundary: a negative prompt [B', L'] of ids with a matching mask."""
        if negative_ids is not None:
            if not isinstance(negative_ids, torch.Tensor) or negative_ids.dim() != 2 or (
                negative_ids.is_floating_point() or negative_ids.numel() == 0
            ):  # fmt: skip
                raise ValueError(
                    "`negative_prompt_ids` must be an integer tensor [batch, length >= 1], got "
                    f"{negative_ids!r}"
                )
            check_vocabulary(source, negative_ids, "negative_prompt_ids")
            negative_ids = negative_ids.long()
        if negative_mask is not None and (
            negative_ids is None
            or not isinstance(negative_mask, torch.Tensor)
            or negative_mask.shape != negative_ids.shape
        ):
            raise ValueError(
                "`negative_prompt_attention_mask` needs `negative_prompt_ids` and their shape"
            )
        steps = config.max_length - prompt.length
        return cls(float(config.guidance_scale), source, negative_ids, negative_mask,
                   bool(config.use_cache), steps)  # fmt: skip

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = torch.nn.functional.log_softmax(scores, dim=-1)
        unconditional = torch.nn.functional.log_softmax(self._logits(input_ids), dim=-1)
        return self.scale * (scores - unconditional) + unconditional

    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The unconditional model's next-token logits [N, V] after this call's token."""
        if self.decoder is None:  # first call: the negative prompt, or the last token alone
            if self.ids is None:
                self.ids = input_ids[:, -1:]
            elif self.ids.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"`negative_prompt_ids` needs one row per decoded row ({input_ids.shape[0]}: "
                    f"prompts x beams or returned sequences), got {self.ids.shape[0]}"
                )
            if self.mask is None:
                self.mask = torch.ones_like(self.ids)
            capacity = self.ids.shape[1] + self.steps
            self.decoder = self.source.make_decoder(self.ids.shape[0], capacity)
            return self.decoder.prefill(self.ids, self.mask).logits[:, -1]
        self.mask = torch.cat([self.mask, torch.ones_like(input_ids[:, -1:])], dim=1)
        if self.use_cache:
            return self.decoder.step(input_ids[:, -1:]).logits[:, -1]
        self.ids = torch.cat([self.ids, input_ids[:, -1:]], dim=1)
        self.decoder.crop(0)
        return self.decoder.prefill(self.ids, self.mask).logits[:, -1]

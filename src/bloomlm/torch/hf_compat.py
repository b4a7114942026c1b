"""The generic surface of transformers 4.37's `PreTrainedModel` that outside code touches, for the
PyTorch BLOOM classes only.

PEFT, transformers' `Trainer` and pipelines, accelerate and people's scripts read class attributes
(`main_input_name`, `_no_split_modules`, `supports_gradient_checkpointing`, ...) and call generic
methods (`can_generate()`, `enable_input_require_grads()`, `get_memory_footprint()`,
`floating_point_ops()`, ...). `PreTrainedModelAPI` holds them once for every class; `CausalLMAPI`
adds what generation code calls on the causal LM (`prepare_inputs_for_generation`, BLOOM's cache
converters). Loading, saving, embeddings and gradient checkpointing live in `pretrained.py`.

One deliberate difference: a tied LM head is listed once in `state_dict()` (under the embedding's
name), as `save_pretrained` stores it. transformers lists the same tensor twice, which
`safetensors` refuses to save, so `Trainer`'s checkpoints (it saves `state_dict()` of models that
are not its own class) would fail. `load_state_dict` takes either form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bloomlm.config import BloomConfig


class PreTrainedModelAPI:
    """transformers' generic model attributes, mixed into BloomPreTrainedModel (an nn.Module)."""

    config_class = BloomConfig
    main_input_name = "input_ids"
    framework = "pt"
    supports_gradient_checkpointing = True
    # accelerate's `device_map="auto"` keeps each decoder block on one device; the cache is never
    # moved between devices by its hooks.
    _no_split_modules = ["BloomBlock"]
    _skip_keys_device_placement = "past_key_values"
    _keys_to_ignore_on_save: list[str] | None = None
    _keys_to_ignore_on_load_missing: list[str] | None = None
    _keys_to_ignore_on_load_unexpected: list[str] | None = None
    is_parallelizable = False
    model_parallel = False
    # transformers gives a model that cannot generate `generation_config = None`; the causal LM's
    # GenerationConfigMixin property takes precedence over this.
    generation_config = None

    @classmethod
    def can_generate(cls) -> bool:
        """Whether `generate()` works on this class (the causal LM)."""
        return callable(getattr(cls, "generate", None))

    @property
    def warnings_issued(self) -> dict[str, bool]:
        """Warnings shown once per model (transformers' Trainer and PEFT record theirs here)."""
        return self.__dict__.setdefault("_warnings_issued", {})

    @warnings_issued.setter
    def warnings_issued(self, value: dict[str, bool]) -> None:
        self.__dict__["_warnings_issued"] = value

    # -- sizes -----------------------------------------------------------------------------------

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers), each tensor counted once."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(t.nelement() * t.element_size() for t in tensors)

    def estimate_tokens(self, input_dict: dict[str, Any]) -> int:
        """Tokens in a batch of model inputs (0, with a one-time warning, without `input_ids`)."""
        if self.main_input_name in input_dict:
            return input_dict[self.main_input_name].numel()
        self.warnings_issued.setdefault("estimate_tokens", True)
        return 0

    def floating_point_ops(
        self, input_dict: dict[str, Any], exclude_embeddings: bool = True
    ) -> int:
        """transformers' estimate for one forward + backward pass: 6 * tokens * parameters."""
        tokens = self.estimate_tokens(input_dict)
        return 6 * tokens * self.num_parameters(exclude_embeddings=exclude_embeddings)

    # -- gradients into the embeddings' output (PEFT) --------------------------------------------

    def enable_input_require_grads(self) -> None:
        """Make the embeddings' output require grad, so checkpointed blocks of a frozen model still
        pass gradients back to adapters (PEFT calls this)."""

        def make_output_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        embeddings = self.get_input_embeddings()
        self._require_grads_hook = embeddings.register_forward_hook(make_output_require_grad)

    def disable_input_require_grads(self) -> None:
        hook = getattr(self, "_require_grads_hook", None)
        if hook is None:
            raise ValueError(
                "disable_input_require_grads() needs enable_input_require_grads() first"
            )
        hook.remove()
        del self._require_grads_hook

    # -- the tied LM head, listed once -----------------------------------------------------------

    def _tied_head_keys(self) -> list[str]:
        """`_tied_weights_keys` while the head really is the embedding matrix."""
        head, embeddings = self.get_output_embeddings(), self.get_input_embeddings()
        if head is None or embeddings is None or head.weight is not embeddings.weight:
            return []
        return list(self._tied_weights_keys)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """nn.Module's state_dict, with a tied LM head listed once (see the module docstring)."""
        destination = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in self._tied_head_keys():
            destination.pop(prefix + key, None)
        return destination

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # Runs before the submodules load: a state dict without the tied head (ours, or what
        # safetensors files hold) gives the head the embedding matrix it is tied to.
        embedding_key = prefix + self._embedding_weight_key()
        for key in self._tied_head_keys():
            if prefix + key not in state_dict and embedding_key in state_dict:
                state_dict[prefix + key] = state_dict[embedding_key]
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _embedding_weight_key(self) -> str:
        base = "" if self.base_model is self else self.base_model_prefix + "."
        return base + "word_embeddings.weight"


class CausalLMAPI:
    """What transformers' generation code (and PEFT's prompt learning) calls on the causal LM."""

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The forward arguments of one decoding step, as transformers 4.37's BLOOM builds them:
        with a cache, only the tokens it has not seen; `inputs_embeds` on the first step only."""
        if past_key_values is not None:
            past_length = past_key_values[0][0].shape[2]  # key (B*H, D, S), or (B, H, D, S)
            # Some callers already pass only the new tokens; else keep the last one.
            keep_from = past_length if input_ids.shape[1] > past_length else input_ids.shape[1] - 1
            input_ids = input_ids[:, keep_from:]
            if past_key_values[0][0].shape[0] == input_ids.shape[0]:  # (B, H, ...): standard
                past_key_values = self._convert_to_bloom_cache(past_key_values)
        if inputs_embeds is not None and past_key_values is None:
            model_inputs: dict[str, Any] = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update(
            past_key_values=past_key_values,
            use_cache=kwargs.get("use_cache"),
            attention_mask=attention_mask,
        )
        return model_inputs

    @staticmethod
    def _convert_to_standard_cache(past_key_value: tuple, batch_size: int) -> tuple:
        """BLOOM's (key (B*H, D, S), value (B*H, S, D)) -> (B, H, D, S), (B, H, S, D)."""
        rows, head_dim, length = past_key_value[0][0].shape
        num_heads = rows // batch_size
        return tuple(
            (
                key.view(batch_size, num_heads, head_dim, length),
                value.view(batch_size, num_heads, length, head_dim),
            )
            for key, value in past_key_value
        )

    @staticmethod
    def _convert_to_bloom_cache(past_key_value: tuple) -> tuple:
        """(B, H, D, S) keys and (B, H, S, D) values -> BLOOM's (B*H, D, S), (B*H, S, D)."""
        batch_size, num_heads, head_dim, length = past_key_value[0][0].shape
        rows = batch_size * num_heads
        return tuple(
            (key.view(rows, head_dim, length), value.view(rows, length, head_dim))
            for key, value in past_key_value
        )

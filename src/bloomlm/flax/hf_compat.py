"""The generic surface of transformers 4.37's `FlaxPreTrainedModel` that outside code touches,
for the Flax BLOOM classes only: class attributes (`config_class`, `main_input_name`,
`framework`), `can_generate()`, `generation_config` (None for models that cannot generate) and
`enable_gradient_checkpointing()`. Parameters, casts, caches and files live in `pretrained.py`.
"""

from __future__ import annotations

from bloomlm.config import BloomConfig


class FlaxPreTrainedModelAPI:
    """Mixed into FlaxBloomPreTrainedModel (which holds `module`, `config` and the dtypes)."""

    config_class = BloomConfig
    main_input_name = "input_ids"
    # transformers gives a model that cannot generate `generation_config = None`; the causal LM's
    # GenerationConfigMixin property takes precedence over this.
    generation_config = None

    @property
    def framework(self) -> str:
        return "flax"

    @classmethod
    def can_generate(cls) -> bool:
        """Whether `generate()` works on this class (the causal LM)."""
        return callable(getattr(cls, "generate", None))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.module.gradient_checkpointing)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass (`nn.remat`) instead of
        keeping them: less memory for `jax.grad`, the same numbers. Parameters are unchanged."""
        settings = (self.config, self.dtype, self.param_dtype, self.scan_layers)
        self.module = self.module_class(*settings, gradient_checkpointing=True)

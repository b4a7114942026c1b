"""bloomlm: BLOOM language models in PyTorch and JAX/Flax, a drop-in for transformers' BLOOM
classes.

Names are resolved lazily (PEP 562), so `import bloomlm` imports neither torch nor jax until a model
class is touched, and never imports transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BloomConfig": "bloomlm.config",
    "BloomTokenizerFast": "bloomlm.tokenizer",
    "AutoTokenizer": "bloomlm.tokenizer",
    "BatchEncoding": "bloomlm.encoding",
    "BloomPreTrainedModel": "bloomlm.torch.pretrained",
    "BloomModel": "bloomlm.torch.model",
    "BloomForCausalLM": "bloomlm.torch.model",
    "BloomForSequenceClassification": "bloomlm.torch.model",
    "BloomForTokenClassification": "bloomlm.torch.model",
    "BloomForQuestionAnswering": "bloomlm.torch.model",
    "GenerationConfig": "bloomlm.generation",
    "PhrasalConstraint": "bloomlm.constraints",
    "DisjunctiveConstraint": "bloomlm.constraints",
    "TextStreamer": "bloomlm.streamers",
    "TextIteratorStreamer": "bloomlm.streamers",
    "FlaxBloomModel": "bloomlm.flax.pretrained",
    "FlaxBloomForCausalLM": "bloomlm.flax.pretrained",
    "FlaxBloomForSequenceClassification": "bloomlm.flax.pretrained",
    "FlaxBloomForTokenClassification": "bloomlm.flax.pretrained",
    "FlaxBloomForQuestionAnswering": "bloomlm.flax.pretrained",
}

# Submodules reachable as attributes (`bloomlm.flax_losses.causal_lm_loss`), imported on first use.
_SUBMODULES = {"flax_losses": "bloomlm.flax.losses"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(_SUBMODULES[name])
        globals()[name] = module
        return module
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bloomlm' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

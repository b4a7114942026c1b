"""Serving: a continuous-batching engine (`Engine`, `LLM` for offline jobs) and `bloomlm serve`,
an OpenAI-compatible HTTP server on it (server.py; needs `pip install "bloomlm[serve]"`).

The names below are imported on first use: `bloomlm.serving.memory` (the CLI's size checks)
loads without torch, and nothing here loads the server's dependencies."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "CompletionOutput": "engine",
    "Engine": "engine",
    "EngineObserver": "engine",
    "QueueFull": "engine",
    "RequestOutput": "engine",
    "TokenLogprob": "engine",
    "LLM": "llm",
    "GenerationError": "llm",
    "MemoryPlan": "memory",
    "plan_memory": "memory",
    "InvalidParameter": "params",
    "SamplingParams": "params",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'bloomlm.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bloomlm.serving.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = sorted(_HOMES)

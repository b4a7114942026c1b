"""Serving: a continuous-batching engine (`Engine`, `LLM` for offline jobs) and `bloomlm serve`,
an OpenAI-compatible HTTP server on it (server.py; needs `pip install "bloomlm[serve]"`).

Importing this package loads torch but none of the server's dependencies."""

from bloomlm.serving.engine import (
    CompletionOutput,
    Engine,
    EngineObserver,
    QueueFull,
    RequestOutput,
    TokenLogprob,
)
from bloomlm.serving.llm import LLM, GenerationError
from bloomlm.serving.memory import MemoryPlan, plan_memory
from bloomlm.serving.params import InvalidParameter, SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "Engine",
    "EngineObserver",
    "GenerationError",
    "InvalidParameter",
    "MemoryPlan",
    "QueueFull",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "plan_memory",
]

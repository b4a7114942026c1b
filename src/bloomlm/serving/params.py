"""What a request asks of the serving engine: `SamplingParams`, checked once when made.

The fields follow vLLM's offline API and OpenAI's request bodies (`max_tokens`, `temperature`,
`top_p`, `n`, `stop`, `seed`, `presence_penalty`, `frequency_penalty`, `logprobs`), with the
extensions `top_k`, `min_tokens`, `repetition_penalty`, `no_repeat_ngram_size` and `ignore_eos`.
A bad value raises `InvalidParameter` naming the field and what is allowed: the server turns it
into a 400 body whose `param` is that field.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class InvalidParameter(ValueError):
    """A request field with a value the engine cannot take; `param` names the field."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class SamplingParams:
    """How to continue one prompt.

    n: continuations of the prompt (they share its prefill and one random generator, drawn in
        continuation order). max_tokens: the most new tokens (None: up to the usable length).
    min_tokens: the end-of-text token is banned before this many. temperature 0 is greedy
    decoding (the token `model.generate(do_sample=False)` picks); otherwise the logits are
    divided by it, then top_k (0 or -1: off) and top_p (1: off) filter them, as transformers'
    warpers do. presence_penalty / frequency_penalty (OpenAI's): subtracted from the logit of
    each token already generated, once / per time it was. repetition_penalty (CTRL's, over the
    prompt and the tokens so far, 1: off) and no_repeat_ngram_size (0: off) as in `generate`.
    stop: strings that end the text (not included). seed: the request's own generator (None: a
    random one); its draws never depend on other requests. ignore_eos: never end at the
    end-of-text token. logprobs: report each new token's log-probability and this many top
    alternatives (None: no logprobs). prompt_logprobs: the same for the prompt's tokens.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        _integer(self, "n", low=1)
        if self.max_tokens is not None:
            _integer(self, "max_tokens", low=1)
        _integer(self, "min_tokens", low=0)
        _number(self, "temperature", low=0.0)
        _number(self, "top_p", low=0.0, low_open=True, high=1.0)
        _integer(self, "top_k", low=-1)
        _number(self, "presence_penalty", low=-2.0, high=2.0)
        _number(self, "frequency_penalty", low=-2.0, high=2.0)
        _number(self, "repetition_penalty", low=0.0, low_open=True)
        _integer(self, "no_repeat_ngram_size", low=0)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _integer(self, name, low=0, high=20)
        if self.seed is not None:
            _integer(self, "seed", low=0, high=2**63 - 1)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameter("stop", "stop must be a string or a list of non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter("ignore_eos", "ignore_eos must be a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain(self) -> bool:
        """Nothing but the raw logits decides the token (no filter, no penalty)."""
        return (
            self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
            and self.repetition_penalty == 1.0
            and self.no_repeat_ngram_size == 0
            and self.min_tokens == 0
            and not self.ignore_eos
        )


def _integer(params: SamplingParams, name: str, low: int, high: int | None = None) -> None:
    value: Any = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(name, f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidParameter(name, f"{name} must be {allowed}, got {value}")


def _number(
    params: SamplingParams,
    name: str,
    low: float,
    *,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    value: Any = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidParameter(name, f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        lower = f"> {low}" if low_open else f">= {low}"
        allowed = lower if high is None else f"{lower} and <= {high}"
        raise InvalidParameter(name, f"{name} must be {allowed}, got {value}")
    setattr(params, name, float(value))


__all__ = ["InvalidParameter", "SamplingParams"]

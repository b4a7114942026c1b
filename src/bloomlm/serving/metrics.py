"""The server's Prometheus metrics (`GET /metrics`), one registry per server.

bloomlm_requests_total{status}                   requests by outcome: finished, abort (client gone
                                                  or shutdown), error (engine), rejected (4xx: a bad
                                                  body, a wrong key, a full queue)
bloomlm_prompt_tokens_total                       prompt tokens prefilled
bloomlm_generation_tokens_total                   tokens generated
bloomlm_requests_running / _waiting               sequences in the batch / requests queued
bloomlm_batch_occupancy                           running sequences / the most that may run
bloomlm_max_sequences                             the memory plan's bound on running sequences
bloomlm_time_to_first_token_seconds               histogram, from arrival to the first token
bloomlm_inter_token_latency_seconds               histogram, between a sequence's tokens
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from bloomlm.serving.engine import EngineObserver

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics(EngineObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bloomlm_requests", "requests by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("bloomlm_prompt_tokens", "prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "bloomlm_generation_tokens", "generated tokens", registry=r
        )
        self.running = Gauge("bloomlm_requests_running", "sequences in the batch", registry=r)
        self.waiting = Gauge("bloomlm_requests_waiting", "requests queued", registry=r)
        self.occupancy = Gauge(
            "bloomlm_batch_occupancy", "running sequences / max sequences", registry=r
        )
        self.max_sequences = Gauge(
            "bloomlm_max_sequences", "the most sequences that may run at once", registry=r
        )
        self.ttft = Histogram("bloomlm_time_to_first_token_seconds", "time to first token",
                              buckets=_TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("bloomlm_inter_token_latency_seconds", "time between tokens",
                             buckets=_ITL_BUCKETS, registry=r)  # fmt: skip
        for status in ("finished", "abort", "error", "rejected"):
            self.requests.labels(status)  # every series exists from the start, at 0

    # EngineObserver: called on the engine thread (prometheus_client is thread-safe)
    def request_started(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def new_token(self, first: float | None, gap: float | None) -> None:
        self.generation_tokens.inc()
        if first is not None:
            self.ttft.observe(first)
        if gap is not None:
            self.itl.observe(gap)

    def request_finished(self, status: str, generated_tokens: int) -> None:
        self.requests.labels(status).inc()

    def step_done(self, running: int, waiting: int, max_sequences: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.max_sequences.set(max_sequences)
        self.occupancy.set(running / max_sequences if max_sequences else 0.0)

    def rejected(self) -> None:
        self.requests.labels("rejected").inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["Metrics"]

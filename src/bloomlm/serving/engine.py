"""The continuous-batching engine: many requests share one decode batch; usable without HTTP.

    engine = Engine(model, tokenizer, max_model_len=2048)
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=32, temperature=0))
    while engine.has_work():
        for output in engine.step():   # RequestOutput: new text and tokens, finished or not
            ...

`LLM` (llm.py) is the offline front end, `EngineThread` (worker.py) runs `step` on its own thread
for the server. The engine drives the model only through the decoding engine's step protocol
(torch/engine.py), and only inside `step`, so one thread touches the model.

Layout: one Decoder whose rows 0..R-1 hold the R running sequences, contiguous (a decode step is
one `step_rows` over slice(0, R), each row at its own length), and a one-row staging Decoder where
the next prompt is prefilled. A finished or cancelled sequence frees its row at once: the last
running row is copied into it (its used columns only), so rows stay contiguous. A prompt whose
prefill is done is copied into the next free row (into n rows for n continuations: one prefill).
The cache grows with the load, in power-of-two rows and columns, up to the memory plan's
`max_sequences` rows of `max_model_len` columns (memory.py).

Scheduling, per `step`: the running sequences advance one token together; then at most one
prefill chunk (`prefill_chunk` tokens of one prompt) runs, so a long prompt never stalls the
running ones for longer than one chunk. Waiting requests start first come, first served, when
rows are free for all their continuations; `max_waiting` bounds the queue (QueueFull beyond).

Each sequence's next token comes from its own request's settings and random generator
(`SamplingParams`): the processors and warpers are generate's pure functions, in transformers'
order, then `torch.multinomial` with the request's generator, exactly as `model.generate(...,
generator=[g])` draws: a request's tokens do not depend on what else is in the batch. A greedy
request returns the tokens `model.generate(do_sample=False)` returns for its prompt alone (up to
float rounding between batch shapes, about 1e-6 of the logits here, which can only flip a
near-tie).

A model split over processes (tensor parallelism) is served from rank 0: the engine drives it
through `lockstep.LockstepModel`, whose decoder calls the other ranks replay (`follow(model)`);
`close()` releases them. The memory plan then counts this rank's heads only.

Faults: an exception in a prefill fails that request only; in the decode step, the requests in
the batch; in one row's sampling or detokenizing, that row's request. Failed requests finish
with finish_reason "error" and `error` set; the engine keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from bloomlm.serving.memory import MemoryPlan, plan_memory
from bloomlm.serving.params import SamplingParams
from bloomlm.torch.generate import (
    apply_repetition_penalty,
    apply_temperature,
    ban_repeated_ngrams,
    ban_tokens,
    top_k_filter,
    top_p_filter,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_LEN = 2048  # when neither max_model_len nor the config's seq_length says
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill call between two decode steps
_FIRST_ROWS = 8  # rows the cache starts with; it doubles as the load grows


class QueueFull(RuntimeError):
    """The waiting queue is full: try again later (the server's 429)."""


class EngineStopped(RuntimeError):
    """The engine takes no more requests (shutting down: the server's 503)."""


@dataclasses.dataclass
class TokenLogprob:
    """A token's log-probability under the model (log_softmax of its raw logits) and the `top`
    most likely tokens at that position, (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class CompletionOutput:
    """One continuation so far. `text` is what may be shown (cut before a stop string; text that
    could still become one, or an unfinished character, is held back until it is decided);
    `delta_*` is what changed since this request's previous output (streaming)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error"; None while running
    stop_reason: str | int | None = None  # the stop string, or the end-of-text token id
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)
    delta_logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass
class RequestOutput:
    """A request's continuations after a step (`finished`: all of them are done)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None


class EngineObserver:
    """What the engine reports as it runs (the server's metrics); the default does nothing."""

    def request_started(self, prompt_tokens: int) -> None: ...

    def new_token(self, first: float | None, gap: float | None) -> None:
        """A token was generated: `first` is the request's time to first token when this is
        its first, `gap` the time since this sequence's previous token when it had one."""

    def request_finished(self, status: str, generated_tokens: int) -> None: ...

    def step_done(self, running: int, waiting: int, max_sequences: int) -> None: ...


# --------------------------------------------------------------------------------------------------
# Per-request state
# --------------------------------------------------------------------------------------------------


class _Sequence:
    """One continuation: its tokens, text, and what was already reported."""

    def __init__(self, index: int, logprobs: bool):
        self.index = index
        self.tokens: list[int] = []
        self.text = ""
        self.shown = 0  # characters of `text` reported
        self.reported = 0  # tokens reported
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self.counts: torch.Tensor | None = None  # per-token counts, for OpenAI's penalties
        self.last_token_at = 0.0


class _Request:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt: str | None,
        device: torch.device,
        max_model_len: int,
    ):
        self.id, self.prompt_ids, self.params, self.prompt = request_id, prompt_ids, params, prompt
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seqs = [_Sequence(i, params.logprobs is not None) for i in range(params.n)]
        room = max_model_len - len(prompt_ids)
        self.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.prefilled = 0
        want_prompt = params.prompt_logprobs is not None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if want_prompt else None
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.error: str | None = None
        self.finished = False
        self.touched = False

    @property
    def done(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.seqs)


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


def _lead_if_split(model: Any) -> Any:
    """The model the engine drives: `model` itself, or for a model split over processes (tensor
    parallelism) on rank 0 its lockstep proxy, whose decoder calls the other ranks replay
    (lockstep.py). Elsewhere a ValueError: each rank would schedule and draw on its own (a
    request without a seed gets a random one), the ranks would pick different tokens and their
    collectives would diverge."""
    from bloomlm.serving import lockstep

    if isinstance(model, lockstep.LockstepModel) or not lockstep.is_split(model):
        return model
    if lockstep.mesh_rank(model) != 0:
        raise ValueError(
            "the serving engine of a model split by tp_plan= / device_mesh= runs on rank 0 only: "
            "on this rank call bloomlm.serving.lockstep.follow(model), which replays rank 0's "
            "decoder calls"
        )
    return lockstep.LockstepModel(model)


class Engine:
    """Continuous batching over one model (see the module doc). `add_request`, `abort` and
    `num_waiting` may be called from any thread; `step` from one thread only."""

    # Over 40 lines: the engine's state, each field with the reason it exists.
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_model_len: int | None = None,
        max_sequences: int | None = None,
        kv_cache_memory: int | None = None,
        max_waiting: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        observer: EngineObserver | None = None,
    ):
        model = _lead_if_split(model)
        config = model.config
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = (
            max_model_len or getattr(config, "seq_length", None) or DEFAULT_MODEL_LEN
        )
        self.plan: MemoryPlan = plan_memory(config, model.dtype, model.device, self.max_model_len,
                                            kv_cache_memory=kv_cache_memory,
                                            max_batch=max_sequences,
                                            tensor_parallel=_ways(model))  # fmt: skip
        self.max_sequences = self.plan.max_sequences
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting
        self.observer = observer or EngineObserver()
        self.device = model.device
        first = min(self.max_sequences, _FIRST_ROWS)
        self.decoder = model.make_decoder(first, self.max_model_len, compile=False)
        self.staging = model.make_decoder(1, self.max_model_len, compile=False)
        eos = model.generation_config.eos_token_id
        self.eos: list[int] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.vocab_size = config.vocab_size
        self.slots: list[tuple[_Request, _Sequence]] = []  # row i of the decoder
        self.waiting: deque[_Request] = deque()
        self.prefilling: _Request | None = None
        self.requests: dict[str, _Request] = {}  # unfinished, by id (engine thread only)
        self._lock = threading.Lock()
        self._inbox: deque[_Request] = deque()
        self._aborts: set[str] = set()
        self._touched: list[_Request] = []
        self.observer.step_done(0, 0, self.max_sequences)  # the bound is known before any step

    def close(self) -> None:
        """Release the other ranks of a split model (their `follow` returns); idempotent, and
        nothing to do for a model in one process. No step may run after it."""
        close = getattr(self.model, "close", None)
        if close is not None:
            close()

    # -- any thread ------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> None:
        """Queue one request (its prompt already tokenized and checked by the caller)."""
        self.add_requests([(request_id, prompt_ids, params, prompt)])

    def add_requests(
        self, requests: Sequence[tuple[str, Sequence[int], SamplingParams, Any]]
    ) -> None:
        """Queue several requests, all or none (QueueFull when the queue has no room for all)."""
        made = []
        for request_id, prompt_ids, params, *prompt in requests:  # (id, ids, params[, text])
            ids = [int(t) for t in prompt_ids]
            self._check(ids, params)
            text = prompt[0] if prompt else None
            made.append(_Request(request_id, ids, params, text, self.device, self.max_model_len))
        with self._lock:
            waiting = len(self._inbox) + len(self.waiting)
            if self.max_waiting is not None and waiting + len(made) > self.max_waiting:
                raise QueueFull(
                    f"{waiting} requests are waiting (at most {self.max_waiting}); try again later"
                )
            self._inbox.extend(made)

    def abort(self, request_id: str) -> None:
        """Cancel a request: its rows are freed at the start of the next step."""
        with self._lock:
            self._aborts.add(request_id)

    def num_waiting(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self.waiting) + (self.prefilling is not None)

    def num_running(self) -> int:
        return len(self.slots)

    def has_work(self) -> bool:
        with self._lock:
            queued = bool(self._inbox or self._aborts)
        return queued or bool(self.waiting or self.slots or self.prefilling)

    def _check(self, ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if not ids:
            raise ValueError("the prompt has no tokens")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; max_model_len={self.max_model_len} leaves "
                "no room for a new token"
            )
        if params.n > self.max_sequences:
            raise ValueError(
                f"n={params.n} continuations do not fit: at most {self.max_sequences} sequences "
                "run at once"
            )

    # -- the engine thread -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Admit new requests and cancellations, advance the running sequences one token, run
        at most one prefill chunk; the outputs of every request that changed."""
        self._touched = []
        self._take_inbox()
        if self.slots:
            self._decode()
        self._prefill()
        self._release_finished()
        outputs = [self._output(request) for request in self._touched]
        for request in self._touched:
            request.touched = False
            if request.finished:
                self.requests.pop(request.id, None)
        self.observer.step_done(len(self.slots), self.num_waiting(), self.max_sequences)
        return outputs

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """Fail every unfinished request (the caller's last resort after a bug in `step`)."""
        self._touched = []
        for request in list(self.requests.values()):
            self._finish_request(request, "error", error)
        self.slots.clear()
        self.waiting.clear()
        self.prefilling = None
        outputs = [self._output(request) for request in self._touched]
        self.requests.clear()
        return outputs

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = self._aborts, set()
        for request in new:
            self.requests[request.id] = request
            self.waiting.append(request)
        for request_id in aborts:
            request = self.requests.get(request_id)
            if request is not None and not request.finished:
                self._finish_request(request, "abort")

    # -- decoding ----------------------------------------------------------------------------------

    def _decode(self) -> None:
        rows = len(self.slots)
        last = [seq.tokens[-1] for _, seq in self.slots]
        try:
            ids = torch.tensor(last, dtype=torch.long, device=self.device)
            logits = self.decoder.step_rows(ids, slice(0, rows))
        except Exception as error:  # the step touched every running request
            logger.exception("the decode step failed; failing its %d sequences", rows)
            for request in {id(r): r for r, _ in self.slots}.values():
                self._finish_request(request, "error", error)
            return
        greedy = logits.argmax(dim=-1).tolist()  # one batched op for the plain greedy rows
        now = time.perf_counter()
        for row, (request, seq) in enumerate(self.slots):
            if request.finished or seq.finish_reason is not None:
                continue
            try:
                params = request.params
                if params.greedy and params.plain and params.logprobs is None:
                    token, logprob = greedy[row], None
                else:
                    token, logprob = self._choose(request, seq, logits[row])
                self._append(request, seq, token, logprob, now)
            except Exception as error:  # this row's request only
                logger.exception("request %s failed", request.id)
                self._finish_request(request, "error", error)

    def _choose(
        self, request: _Request, seq: _Sequence, logits: torch.Tensor
    ) -> tuple[int, TokenLogprob | None]:
        """The next token of `seq` from its row's logits [V], with its request's settings."""
        params = request.params
        scores = self._process(request, seq, logits[None])
        if params.greedy:
            token = int(scores.argmax(dim=-1))
        else:
            if params.temperature != 1.0:
                scores = apply_temperature(scores, params.temperature)
            if params.top_k > 0:
                scores = top_k_filter(scores, params.top_k)
            if params.top_p < 1.0:
                scores = top_p_filter(scores, params.top_p)
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=request.generator))
        logprob = None
        if params.logprobs is not None:
            logprob = _token_logprob(logits.float().log_softmax(-1), token, params.logprobs)
        return token, logprob

    def _process(self, request: _Request, seq: _Sequence, scores: torch.Tensor) -> torch.Tensor:
        """generate's logits processors in transformers' order, then OpenAI's penalties."""
        params = request.params
        if params.plain:
            return scores
        if params.repetition_penalty != 1.0 or params.no_repeat_ngram_size:
            ids = torch.tensor([request.prompt_ids + seq.tokens], device=scores.device)
            if params.repetition_penalty != 1.0:
                scores = apply_repetition_penalty(ids, scores, params.repetition_penalty)
            if params.no_repeat_ngram_size:
                scores = ban_repeated_ngrams(ids, scores, params.no_repeat_ngram_size)
        if self.eos and (params.ignore_eos or len(seq.tokens) < params.min_tokens):
            scores = ban_tokens(scores, self.eos)
        if seq.counts is not None:
            counts = seq.counts.to(scores.dtype)
            penalty = params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
            scores = scores - penalty
        return scores

    def _append(
        self,
        request: _Request,
        seq: _Sequence,
        token: int,
        logprob: TokenLogprob | None,
        now: float,
    ) -> None:
        params = request.params
        seq.tokens.append(token)
        if params.presence_penalty or params.frequency_penalty:
            if seq.counts is None:
                seq.counts = torch.zeros(self.vocab_size, dtype=torch.long, device=self.device)
            seq.counts[token] += 1
        if logprob is not None and seq.logprobs is not None:
            seq.logprobs.append(logprob)
        first = gap = None
        if request.first_token_at is None:
            request.first_token_at = now
            first = now - request.arrival
        if seq.last_token_at:
            gap = now - seq.last_token_at
        seq.last_token_at = now
        self.observer.new_token(first, gap)
        self._touch(request)
        if token in self.eos and not params.ignore_eos:
            seq.finish_reason, seq.stop_reason = "stop", token
        self._detokenize(request, seq)
        if seq.finish_reason is None and len(seq.tokens) >= request.max_tokens:
            seq.finish_reason = "length"
        if request.done:
            self._finish_request(request, None)

    def _detokenize(self, request: _Request, seq: _Sequence) -> None:
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        stops = request.params.stop
        if stops and seq.finish_reason is None:
            found = [(i, s) for s in stops if (i := text.find(s)) >= 0]
            if found:
                index, stop = min(found)
                text = text[:index]
                seq.finish_reason, seq.stop_reason = "stop", stop
        seq.text = text

    # -- prefill -----------------------------------------------------------------------------------

    def _prefill(self) -> None:
        request = self.prefilling
        if request is None:
            request = self._admit()
            if request is None:
                return
            self.prefilling = request
            self.observer.request_started(len(request.prompt_ids))
        start = request.prefilled
        chunk = request.prompt_ids[start : start + self.prefill_chunk]
        want_prompt = request.prompt_logprobs is not None
        try:
            ids = torch.tensor(chunk, dtype=torch.long, device=self.device)
            run = self.staging.fill if start == 0 else self.staging.extend
            out = run(0, ids, num_logits=len(chunk) if want_prompt else 1)
            request.prefilled += len(chunk)
            if want_prompt:
                self._prompt_logprobs(request, out.logits[0], start)
            if request.prefilled < len(request.prompt_ids):
                return
            self.prefilling = None
            self._start_running(request, out.logits[0, -1])
        except Exception as error:  # this request only
            logger.exception("the prefill of request %s failed", request.id)
            self.prefilling = None
            self._finish_request(request, "error", error)

    def _admit(self) -> _Request | None:
        """The first waiting request, when rows are free for all its continuations."""
        while self.waiting and self.waiting[0].finished:  # aborted while waiting
            self.waiting.popleft()
        if not self.waiting or len(self.slots) + self.waiting[0].params.n > self.max_sequences:
            return None
        return self.waiting.popleft()

    def _prompt_logprobs(self, request: _Request, logits: torch.Tensor, start: int) -> None:
        """Logprobs of the prompt tokens after `start` from the chunk's logits [T, V]."""
        assert request.prompt_logprobs is not None
        top = request.params.prompt_logprobs or 0
        log_probs = logits.float().log_softmax(-1)
        for t in range(logits.shape[0]):
            position = start + t + 1  # logits at t predict the token after it
            if position < len(request.prompt_ids):
                token = request.prompt_ids[position]
                request.prompt_logprobs.append(_token_logprob(log_probs[t], token, top))

    def _start_running(self, request: _Request, logits: torch.Tensor) -> None:
        """Copy the prefilled prompt into a row per continuation and pick each first token."""
        base, n = len(self.slots), request.params.n
        if base + n > self.decoder.rows:
            rows = min(self.max_sequences, max(base + n, 2 * self.decoder.rows))
            self.decoder.grow_rows(rows)
        for seq in request.seqs:
            row = base + seq.index
            self.decoder.copy_row(0, row, decoder=self.staging)
            self.slots.append((request, seq))
        now = time.perf_counter()
        for seq in request.seqs:
            if request.finished:
                break
            token, logprob = self._choose(request, seq, logits)
            self._append(request, seq, token, logprob, now)

    # -- finishing ---------------------------------------------------------------------------------

    def _touch(self, request: _Request) -> None:
        if not request.touched:
            request.touched = True
            self._touched.append(request)

    def _finish_request(
        self, request: _Request, reason: str | None, error: BaseException | None = None
    ) -> None:
        """Mark `request` finished; unfinished continuations get `reason` ("abort", "error")."""
        if request.finished:
            return
        for seq in request.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = reason
        if error is not None:
            request.error = f"{type(error).__name__}: {error}"
        if self.prefilling is request:
            self.prefilling = None
        request.finished = True
        self._touch(request)
        reasons = {seq.finish_reason for seq in request.seqs}
        status = "error" if "error" in reasons else "abort" if "abort" in reasons else "finished"
        self.observer.request_finished(status, sum(len(seq.tokens) for seq in request.seqs))

    def _release_finished(self) -> None:
        """Free the rows of finished sequences: the last running row moves into each."""
        done = [row for row, (r, seq) in enumerate(self.slots) if r.finished or seq.finish_reason]
        for row in reversed(done):  # from the end, so the row moved in is never a finished one
            last = len(self.slots) - 1
            if row != last:
                self.decoder.copy_row(last, row)
                self.slots[row] = self.slots[last]
            self.slots.pop()
            self.decoder.reset(last)

    def _output(self, request: _Request) -> RequestOutput:
        outputs = []
        hold = max((len(s) for s in request.params.stop), default=1) - 1
        for seq in request.seqs:
            if seq.finish_reason is not None:
                shown = len(seq.text)
            else:  # held back: an unfinished character, and what may begin a stop string
                shown = max(seq.shown, len(seq.text.rstrip("\ufffd")) - hold)
            delta_logprobs = None
            if seq.logprobs is not None:
                delta_logprobs = seq.logprobs[seq.reported :]
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text[:shown],
                    token_ids=list(seq.tokens),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    delta_text=seq.text[seq.shown : shown],
                    delta_token_ids=seq.tokens[seq.reported :],
                    delta_logprobs=delta_logprobs,
                )
            )
            seq.shown, seq.reported = shown, len(seq.tokens)
        return RequestOutput(
            request_id=request.id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_ids,
            outputs=outputs,
            finished=request.finished,
            prompt_logprobs=request.prompt_logprobs,
            error=request.error,
            arrival_time=request.arrival,
            first_token_time=request.first_token_at,
        )


def _ways(model: Any) -> int:
    """How many processes the model is split over (1: not split)."""
    mesh = getattr(model, "tensor_parallel_mesh", None)
    return 1 if mesh is None else int(mesh.size())


def _token_logprob(log_probs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s logprob from log_probs [V], and the `top` best (id, logprob)."""
    best: list[tuple[int, float]] = []
    if top:
        values, indices = log_probs.topk(top)
        best = list(zip(indices.tolist(), values.tolist()))
    value = float(log_probs[token])
    return TokenLogprob(token, value if not math.isnan(value) else -math.inf, best)


__all__ = [
    "CompletionOutput",
    "Engine",
    "EngineObserver",
    "EngineStopped",
    "QueueFull",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]

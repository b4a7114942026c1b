"""`bloomlm serve`: OpenAI-compatible HTTP endpoints on the continuous-batching engine.

    POST /v1/completions        prompt (string, list of strings, token ids), max_tokens (16),
                                temperature, top_p, n, stop, seed, stream, echo, logprobs (0-5),
                                presence_penalty, frequency_penalty; extensions: top_k,
                                min_tokens, repetition_penalty, ignore_eos
    POST /v1/chat/completions   messages rendered with the model folder's chat_template
                                (tokenizer_config.json) as transformers renders it, else with
                                DEFAULT_CHAT_TEMPLATE; max_tokens / max_completion_tokens (default:
                                up to the usable length), logprobs + top_logprobs, and the above
    GET  /v1/models             the one model served
    GET  /health                200 {"status": "ok"}; 503 while shutting down
    GET  /metrics               Prometheus text (metrics.py)
    GET  /                      the playground page (static/index.html)

Starlette and uvicorn (the `serve` extra). With `api_key`, /v1/* needs `Authorization: Bearer
KEY` (401 otherwise); /, /health and /metrics are open. Errors are OpenAI's body, `{"error":
{"message", "type", "param", "code"}}`, with the field named in `param`: 400 for a bad body, 404
for an unknown model or path, 413 for a body over 16 MiB, 429 with Retry-After when the waiting
queue is full, 503 while shutting down, 500 when the engine failed on the request (never a
traceback). Streams are
Server-Sent Events in OpenAI's chunk format, one chunk per generated token, ending with
`data: [DONE]`; a failure after the stream started is an `{"error": ...}` event before it.

A request's prompts (and its n continuations) are separate engine requests; the endpoint merges
their outputs into choices indexed prompt * n + continuation. A client that disconnects has its
requests aborted at once (the engine frees their rows at its next step). SIGTERM or Ctrl-C: the
server stops accepting connections and requests, lets running requests finish for
`shutdown_timeout` seconds, aborts the rest (streams get an error event and [DONE]), and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import importlib.resources
import itertools
import json
import logging
import math
import secrets
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bloomlm import chat
from bloomlm.serving.engine import EngineStopped, QueueFull, RequestOutput, TokenLogprob
from bloomlm.serving.metrics import Metrics
from bloomlm.serving.params import InvalidParameter, SamplingParams
from bloomlm.serving.worker import EngineThread

logger = logging.getLogger(__name__)

# Used when the model folder's tokenizer_config.json has no chat_template: one line per message,
# "Role: content", then "Assistant:" for the model to continue. (transformers' default for BLOOM
# joins the contents with the end-of-text token and ignores roles, which leaves a model nothing
# to tell the turns apart by.)
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_CHAT_LOGPROBS = 20
MAX_STOPS = 16
RETRY_AFTER_SECONDS = 1
MAX_BODY_BYTES = 16 * 2**20  # a larger body is refused (413) before it is read whole


@dataclasses.dataclass
class ServerSettings:
    model_name: str
    max_model_len: int
    max_sequences: int
    api_key: str | None = None
    chat_template: str | None = None  # the folder's; None: DEFAULT_CHAT_TEMPLATE
    shutdown_timeout: float = 30.0


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.code, self.headers = code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --------------------------------------------------------------------------------------------------
# Reading a request body
# --------------------------------------------------------------------------------------------------

_KINDS: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "string": (str,),
    "object": (dict,),
    "array": (list,),
}


class _Body:
    """A JSON object's fields, each read once with its type and range checked (400 naming it)."""

    def __init__(self, data: Any):
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {_kind(data)}")
        self.data = data

    def get(self, name: str, kind: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        wanted = _KINDS[kind]
        if (isinstance(value, bool) and kind != "boolean") or not isinstance(value, wanted):
            raise APIError(400, f"'{name}' must be {_article(kind)}, got {_kind(value)}", name)
        if kind == "number" and not math.isfinite(value):
            raise APIError(400, f"'{name}' must be a finite number", name)
        return value

    def ranged(
        self, name: str, kind: str, default: Any, low: float, high: float | None = None
    ) -> Any:
        value = self.get(name, kind, default)
        if value is not None and (value < low or (high is not None and value > high)):
            allowed = f">= {low}" if high is None else f"between {low} and {high}"
            raise APIError(400, f"'{name}' must be {allowed}, got {value}", name)
        return value


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


async def _json_body(request: Request) -> _Body:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    return _Body(data)


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


class _App:
    """The endpoints' shared state: the engine thread, tokenizer, settings and metrics."""

    def __init__(
        self, worker: EngineThread, tokenizer: Any, settings: ServerSettings, metrics: Metrics
    ):
        self.worker, self.tokenizer, self.settings, self.metrics = (
            worker, tokenizer, settings, metrics)  # fmt: skip
        self.created = int(time.time())
        self._ids = itertools.count()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(6)}{next(self._ids)}"

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")  # fmt: skip

    def check_model(self, body: _Body) -> None:
        name = body.get("model", "string")
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                           f"'{self.settings.model_name}'", "model",
                           code="model_not_found")  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


# Over 40 lines: the routes, each a few lines, in one place so the API reads as a table.
def build_app(
    worker: EngineThread, tokenizer: Any, settings: ServerSettings, metrics: Metrics
) -> Starlette:
    """The Starlette app; its lifespan starts and stops `worker`."""
    state = _App(worker, tokenizer, settings, metrics)

    def endpoint(handler: Callable[[_App, Request], Awaitable[Response]]) -> Callable:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            try:
                return await handler(state, request)
            except APIError as error:
                if 400 <= error.status < 499:  # refused; 5xx and 499 are counted by the engine
                    metrics.rejected()
                return error.response()
            except Exception:  # never a traceback in a response: the log has it
                logger.exception("%s %s failed", request.method, request.url.path)
                return APIError(500, "internal server error", type="internal_server_error"
                                ).response()  # fmt: skip

        return run

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not worker._thread.is_alive():
            worker.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, f"{request.method} {request.url.path}: "
                        f"{error.detail}", type=kind).response()  # fmt: skip

    routes = [
        Route("/", endpoint(_index), methods=["GET"]),
        Route("/health", endpoint(_health), methods=["GET"]),
        Route("/metrics", endpoint(_metrics), methods=["GET"]),
        Route("/v1/models", endpoint(_models), methods=["GET"]),
        Route("/v1/completions", endpoint(_completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(_chat_completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error})  # fmt: skip


@functools.cache
def _playground() -> str:
    return (importlib.resources.files("bloomlm.serving") / "static" / "index.html").read_text(
        encoding="utf-8"
    )


async def _index(state: _App, request: Request) -> Response:
    return HTMLResponse(_playground())


async def _health(state: _App, request: Request) -> Response:
    engine = state.worker.engine
    status = "ok" if state.worker.accepting else "shutting down"
    body = {"status": status, "running": engine.num_running(), "waiting": engine.num_waiting()}
    return JSONResponse(body, status_code=200 if state.worker.accepting else 503)


async def _metrics(state: _App, request: Request) -> Response:
    content, media_type = state.metrics.render()
    return Response(content, media_type=media_type)


async def _models(state: _App, request: Request) -> Response:
    state.authorize(request)
    model = {"id": state.settings.model_name, "object": "model", "created": state.created,
             "owned_by": "bloomlm", "max_model_len": state.settings.max_model_len}  # fmt: skip
    return JSONResponse({"object": "list", "data": [model]})


# --------------------------------------------------------------------------------------------------
# Completions and chat completions
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """One HTTP request's work: its prompts (text, ids), settings, and how to answer."""

    chat: bool
    prompts: list[tuple[str, list[int]]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False
    top_logprobs: int | None = None  # chat: alternatives per token when logprobs is on


# Over 40 lines: one OpenAI body field after another, each checked where it is read.
def _sampling(body: _Body, state: _App, max_tokens: int | None, logprobs: int | None) -> Any:
    """The SamplingParams fields every endpoint shares, read and checked."""
    settings = state.settings
    for name in ("logit_bias", "suffix", "tools", "functions", "tool_choice"):
        if body.data.get(name) not in (None, {}, [], ""):
            raise APIError(400, f"'{name}' is not supported by this server", name)
    n = body.ranged("n", "integer", 1, 1)
    if n > settings.max_sequences:
        raise APIError(400, f"'n' must be at most {settings.max_sequences} (the sequences this "
                       f"server runs at once), got {n}", "n")  # fmt: skip
    best_of = body.get("best_of", "integer")
    if best_of is not None and best_of != n:
        raise APIError(400, "'best_of' other than n is not supported", "best_of")
    stop = body.data.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop] if stop else []
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = [s for s in stop if s]
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"'stop' may hold at most {MAX_STOPS} strings", "stop")
    else:
        raise APIError(400, "'stop' must be a string or an array of strings", "stop")
    try:
        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            min_tokens=body.ranged("min_tokens", "integer", 0, 0),
            temperature=float(body.ranged("temperature", "number", 1.0, 0.0, 2.0)),
            top_p=float(body.ranged("top_p", "number", 1.0, 0.0, 1.0)),
            top_k=body.ranged("top_k", "integer", 0, -1),
            presence_penalty=float(body.ranged("presence_penalty", "number", 0.0, -2.0, 2.0)),
            frequency_penalty=float(body.ranged("frequency_penalty", "number", 0.0, -2.0, 2.0)),
            repetition_penalty=float(body.get("repetition_penalty", "number", 1.0)),
            stop=stops,
            seed=body.ranged("seed", "integer", None, 0, 2**63 - 1),
            ignore_eos=body.get("ignore_eos", "boolean", False),
            logprobs=logprobs,
        )
    except InvalidParameter as error:
        raise APIError(400, str(error), error.param) from None


def _stream_options(body: _Body, stream: bool) -> bool:
    options = body.get("stream_options", "object")
    if options is None:
        return False
    if not stream:
        raise APIError(400, "'stream_options' needs 'stream': true", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean", "stream_options")
    return include


def _check_lengths(state: _App, job: _Job, field: str) -> None:
    """Every prompt fits the usable length, with room for max_tokens (400 otherwise)."""
    limit = state.settings.max_model_len
    for _, ids in job.prompts:
        if not ids:
            raise APIError(400, f"'{field}' must not be empty", field)
        if len(ids) >= limit:
            raise APIError(400, f"'{field}' has {len(ids)} tokens; this model's usable length "
                           f"is {limit} tokens (--max-model-len), prompt and completion "
                           "together", field)  # fmt: skip
        wanted = job.params.max_tokens
        if wanted is not None and len(ids) + wanted > limit:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus 'max_tokens' ({wanted}) "
                           f"is more than the usable length {limit} (--max-model-len)",
                           "max_tokens")  # fmt: skip
    vocab = state.worker.engine.vocab_size
    if any(t < 0 or t >= vocab for _, ids in job.prompts for t in ids):
        raise APIError(400, f"token ids in '{field}' must lie in [0, {vocab})", field)


def _completion_prompts(state: _App, body: _Body) -> list[tuple[str, list[int]]]:
    prompt = body.data.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt")
    if isinstance(prompt, str):
        return [(prompt, state.encode(prompt) if prompt else [])]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [(p, state.encode(p) if p else []) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [(state.tokenizer.decode(prompt), list(prompt))]
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return [(state.tokenizer.decode(p), list(p)) for p in prompt]
    if isinstance(prompt, list) and not prompt:
        raise APIError(400, "'prompt' must not be empty", "prompt")
    raise APIError(400, "'prompt' must be a string, an array of strings, an array of token ids "
                   "or an array of such arrays", "prompt")  # fmt: skip


async def _completions(state: _App, request: Request) -> Response:
    state.authorize(request)
    body = await _json_body(request)
    state.check_model(body)
    prompts = _completion_prompts(state, body)
    stream = body.get("stream", "boolean", False)
    logprobs = body.ranged("logprobs", "integer", None, 0, MAX_COMPLETION_LOGPROBS)
    max_tokens = body.ranged("max_tokens", "integer", COMPLETION_MAX_TOKENS, 1)
    params = _sampling(body, state, max_tokens, logprobs)
    echo = body.get("echo", "boolean", False)
    if echo and logprobs is not None:
        params.prompt_logprobs = logprobs
    job = _Job(False, prompts, params, stream, _stream_options(body, stream), echo=echo)
    _check_lengths(state, job, "prompt")
    return await _run(state, request, job)


def _chat_prompt(state: _App, body: _Body) -> str:
    messages = body.data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects",
                       "messages")  # fmt: skip
    rendered = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"'{where}' must be an object with a string 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"'{where}.content' may hold text parts only", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string", "messages")
        rendered.append({**message, "content": content or ""})
    template = state.settings.chat_template or DEFAULT_CHAT_TEMPLATE
    try:
        return chat.render_chat(rendered, template, add_generation_prompt=True,
                                special_tokens=state.tokenizer.special_tokens_map)  # fmt: skip
    except Exception as error:  # the template refused the conversation (raise_exception)
        raise APIError(400, f"the chat template refused the messages: {error}",
                       "messages") from None  # fmt: skip


async def _chat_completions(state: _App, request: Request) -> Response:
    state.authorize(request)
    body = await _json_body(request)
    state.check_model(body)
    text = _chat_prompt(state, body)
    ids = list(state.tokenizer(text, add_special_tokens=False)["input_ids"])
    stream = body.get("stream", "boolean", False)
    want_logprobs = body.get("logprobs", "boolean", False)
    top = body.ranged("top_logprobs", "integer", None, 0, MAX_CHAT_LOGPROBS)
    if top is not None and not want_logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = body.ranged("max_completion_tokens", "integer", None, 1)
    max_tokens = body.ranged("max_tokens", "integer", max_tokens, 1)
    params = _sampling(body, state, max_tokens, (top or 0) if want_logprobs else None)
    job = _Job(True, [(text, ids)], params, stream, _stream_options(body, stream))
    _check_lengths(state, job, "messages")
    return await _run(state, request, job)


# --------------------------------------------------------------------------------------------------
# Running a job: submit, then answer at once or stream
# --------------------------------------------------------------------------------------------------


async def _run(state: _App, request: Request, job: _Job) -> Response:
    base = state.new_id("chatcmpl" if job.chat else "cmpl")
    ids = [f"{base}-{i}" for i in range(len(job.prompts))]
    queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def sink(output: RequestOutput) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, output)

    batch = [(rid, p_ids, job.params, text) for rid, (text, p_ids) in zip(ids, job.prompts)]
    try:
        state.worker.submit(batch, sink)
    except QueueFull as error:
        raise APIError(429, str(error), type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None  # fmt: skip
    except EngineStopped as error:
        raise APIError(503, str(error), type="service_unavailable") from None
    except ValueError as error:  # the engine's own checks (the endpoint's come first)
        raise APIError(400, str(error)) from None
    answer = _Answer(state, job, base, ids)
    if job.stream:
        return StreamingResponse(_events(state, answer, queue), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    try:
        results = await _collect(request, queue, set(ids))
    finally:
        for request_id in ids:
            state.worker.abort(request_id)  # a no-op for finished ones
    return answer.response(results)


async def _collect(
    request: Request, queue: asyncio.Queue[RequestOutput], pending: set[str]
) -> dict[str, RequestOutput]:
    """The final output of each request; APIError(499) when the client leaves first."""
    results: dict[str, RequestOutput] = {}
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while pending:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                raise APIError(499, "the client closed the connection")
            output = getter.result()
            if output.finished:
                pending.discard(output.request_id)
                results[output.request_id] = output
    finally:
        gone.cancel()
    return results


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(
    state: _App, answer: _Answer, queue: asyncio.Queue[RequestOutput]
) -> AsyncIterator[str]:
    """The SSE stream; cancelled (client gone) or not, nothing is left running after it."""
    pending = set(answer.ids)
    try:
        for chunk in answer.opening_chunks():
            yield _event(chunk)
        while pending:
            output = await queue.get()
            if output.finished:
                pending.discard(output.request_id)
            failure = answer.failure(output)
            if failure is not None:
                yield _event(failure.body())
                break
            for chunk in answer.chunks(output):
                yield _event(chunk)
        else:
            if answer.job.include_usage:
                yield _event(answer.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        for request_id in pending:
            state.worker.abort(request_id)


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Answer:
    """Builds one job's responses and chunks in OpenAI's shapes."""

    def __init__(self, state: _App, job: _Job, base: str, ids: list[str]):
        self.state, self.job, self.base, self.ids = state, job, base, ids
        self.index = {request_id: i for i, request_id in enumerate(ids)}
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p_ids) for _, p_ids in job.prompts)
        self.completion_tokens = 0
        self.offsets: dict[int, int] = {}  # completions' text_offset so far, per choice

    @property
    def object(self) -> str:
        return "chat.completion" if self.job.chat else "text_completion"

    def choice(self, output: RequestOutput, index: int) -> int:
        return self.index[output.request_id] * self.job.params.n + index

    def failure(self, output: RequestOutput) -> APIError | None:
        reasons = {o.finish_reason for o in output.outputs}
        if output.error is not None or "error" in reasons:
            return APIError(500, f"the engine failed on this request: {output.error}",
                            type="internal_server_error")  # fmt: skip
        if "abort" in reasons:
            return APIError(503, "the request was aborted: the server is shutting down",
                            type="service_unavailable")  # fmt: skip
        return None

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": total}  # fmt: skip

    # -- a whole answer --------------------------------------------------------------------------

    def response(self, results: dict[str, RequestOutput]) -> Response:
        choices = []
        for request_id in self.ids:
            output = results[request_id]
            failure = self.failure(output)
            if failure is not None:
                raise failure
            for completion in output.outputs:
                self.completion_tokens += len(completion.token_ids)
                choices.append(self._choice(output, completion))
        body = {"id": self.base, "object": self.object, "created": self.created,
                "model": self.state.settings.model_name, "choices": choices,
                "usage": self.usage()}  # fmt: skip
        return JSONResponse(body)

    def _choice(self, output: RequestOutput, completion: Any) -> dict[str, Any]:
        index = self.choice(output, completion.index)
        reason = completion.finish_reason
        if self.job.chat:
            logprobs = None
            if completion.logprobs is not None:
                logprobs = {"content": [self._chat_logprob(lp) for lp in completion.logprobs]}
            message = {"role": "assistant", "content": completion.text}
            return {"index": index, "message": message, "logprobs": logprobs,
                    "finish_reason": reason}  # fmt: skip
        text = completion.text
        logprobs = None
        if completion.logprobs is not None:
            entries: list[TokenLogprob | None] = []
            if self.job.echo:
                entries += [None] if output.prompt_logprobs is None else output.prompt_logprobs
            entries += completion.logprobs
            tokens = (output.prompt_token_ids if self.job.echo else []) + completion.token_ids
            logprobs = self._completion_logprobs(tokens, entries, 0)
        if self.job.echo:
            text = (output.prompt or "") + text
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    # -- streaming --------------------------------------------------------------------------------

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chat: the assistant role first; completions with echo: the prompts."""
        chunks = []
        n = self.job.params.n
        for p, (text, _) in enumerate(self.job.prompts):
            for j in range(n):
                if self.job.chat:
                    delta = {"role": "assistant", "content": ""}
                    chunks.append(self._chunk(p * n + j, delta, None, None))
                elif self.job.echo:
                    chunks.append(self._chunk(p * n + j, text, None, None))
        return chunks

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        """One chunk per new token of each continuation (its text may be empty: held back, or
        a token with no text of its own), the last one with its finish_reason."""
        chunks = []
        for completion in output.outputs:
            tokens = completion.delta_token_ids
            if not tokens:
                continue
            self.completion_tokens += len(tokens)
            index = self.choice(output, completion.index)
            logprobs = completion.delta_logprobs or [None] * len(tokens)
            for k, (token, lp) in enumerate(zip(tokens, logprobs)):
                last = k == len(tokens) - 1
                text = completion.delta_text if last else ""
                reason = completion.finish_reason if last else None
                chunks.append(self._token_chunk(index, token, lp, text, reason))
        return chunks

    def _token_chunk(
        self, index: int, token: int, lp: TokenLogprob | None, text: str, reason: str | None
    ) -> dict[str, Any]:
        if self.job.chat:
            logprobs = {"content": [self._chat_logprob(lp)]} if lp is not None else None
            return self._chunk(index, {"content": text}, reason, logprobs)
        logprobs = None
        if lp is not None:
            logprobs = self._completion_logprobs([token], [lp], self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + len(self.state.token_text(token))
        return self._chunk(index, text, reason, logprobs)

    def _chunk(self, index: int, content: Any, reason: str | None, logprobs: Any) -> dict:
        if self.job.chat:
            choice = {"index": index, "delta": content, "logprobs": logprobs,
                      "finish_reason": reason}  # fmt: skip
            kind = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": content, "logprobs": logprobs,
                      "finish_reason": reason}  # fmt: skip
            kind = "text_completion"
        return {"id": self.base, "object": kind, "created": self.created,
                "model": self.state.settings.model_name, "choices": [choice]}  # fmt: skip

    def usage_chunk(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.job.chat else "text_completion"
        return {"id": self.base, "object": kind, "created": self.created,
                "model": self.state.settings.model_name, "choices": [],
                "usage": self.usage()}  # fmt: skip

    # -- logprobs ----------------------------------------------------------------------------------

    def _completion_logprobs(
        self, tokens: list[int], entries: list[TokenLogprob | None], offset: int
    ) -> dict[str, Any]:
        texts = [self.state.token_text(t) for t in tokens]
        offsets = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=offset))
        top = []
        for entry in entries:
            if entry is None:
                top.append(None)
            else:
                top.append({self.state.token_text(t): lp for t, lp in entry.top})
        return {"tokens": texts, "token_logprobs": [e.logprob if e else None for e in entries],
                "top_logprobs": top, "text_offset": offsets}  # fmt: skip

    def _chat_logprob(self, entry: TokenLogprob) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self.state.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {**one(entry.token_id, entry.logprob),
                "top_logprobs": [one(t, lp) for t, lp in entry.top]}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Running the server
# --------------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server with bloomlm's shutdown: on SIGTERM or SIGINT the engine drains (running
    requests get `grace` seconds, then are aborted) while uvicorn stops accepting and waits for
    the open responses; the process then exits 0 (uvicorn would re-raise the signal)."""

    def __init__(self, config: uvicorn.Config, worker: EngineThread, grace: float):
        super().__init__(config)
        self.worker, self.grace = worker, grace

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.worker.drain(self.grace)
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port; the caller reads it back)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(
    app: Starlette,
    worker: EngineThread,
    sock: socket.socket,
    *,
    shutdown_timeout: float,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve `app` on `sock` until SIGTERM / SIGINT (see _Server)."""
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout + 5,
                            timeout_keep_alive=5)  # fmt: skip
    _Server(config, worker, shutdown_timeout).run(sockets=[sock])


__all__ = ["DEFAULT_CHAT_TEMPLATE", "APIError", "ServerSettings", "bind", "build_app", "run_server"]

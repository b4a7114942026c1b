"""`bloomlm serve` end to end, over loopback only: the real server in a subprocess on 127.0.0.1
with an ephemeral port (one for the whole session; a second, small one for the queue limit and
SIGTERM; one in this process for injected engine faults), the real `openai` client for
completions, chat and streaming, raw HTTP for errors, 100 concurrent clients, and the playground
in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium).

Every request loop is bounded in count and time; every server is stopped by the test that made it.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import torch

import bloomlm
from bloomlm.cli import main
from bloomlm.serving import LLM, SamplingParams
from conftest import generate_alone

API_KEY = "test-key"
MODEL = "bloomlm-tiny"
MAX_MODEL_LEN = 256
PACKAGE_ROOT = str(pathlib.Path(bloomlm.__file__).resolve().parent.parent)
SERVER_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]),
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


# --------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------


class Server:
    """A `bloomlm serve` subprocess; its output goes to a file (read when a test fails)."""

    def __init__(self, log: pathlib.Path, *options: str):
        self.log = log
        command = [
            sys.executable,
            "-m",
            "bloomlm",
            "serve",
            "--port",
            "0",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--log-level",
            "warning",
            *options,
        ]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=SERVER_ENV,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
            if found:
                self.port = int(found[1])
                break
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited:\n{log.read_text()}")
            time.sleep(0.1)
        else:
            self.stop()
            raise AssertionError(f"the server did not start in 120 s:\n{log.read_text()}")
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        status = pathlib.Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    running = Server(
        log, "--api-key", API_KEY, "--kv-cache-memory", "256MiB", "--max-waiting", "200"
    )
    yield running
    assert running.stop() == 0, running.output()


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny():
    model = bloomlm.BloomForCausalLM.from_pretrained(MODEL, torch_dtype="float32").eval()
    return model, bloomlm.AutoTokenizer.from_pretrained(MODEL)


def post(
    url: str, path: str, body: bytes | str | dict, headers: dict | None = None, timeout: float = 60
) -> tuple[int, dict, dict]:
    """Raw HTTP POST: (status, JSON body, headers)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = json.dumps(body) if isinstance(body, dict) else body
    all_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    all_headers.update(headers or {})
    try:
        connection.request("POST", path, body=data, headers=all_headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        connection.close()


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def health(url: str) -> dict:
    return json.loads(get(url, "/health")[1])


def metric(url: str, name: str) -> float:
    text = get(url, "/metrics")[1].decode()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found[1])


def wait_idle(url: str, seconds: float = 10.0) -> dict:
    deadline = time.monotonic() + seconds
    state = health(url)
    while (state["running"] or state["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.05)
        state = health(url)
    return state


# --------------------------------------------------------------------------------------------------
# The openai client
# --------------------------------------------------------------------------------------------------


def test_completions_with_the_openai_client_match_generate(server, client, tiny):
    prompt = "Once upon a time"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    choice = response.choices[0]
    assert choice.text == generate_alone(tiny, prompt, 20, do_sample=False)
    assert response.usage.prompt_tokens == len(tiny[1](prompt)["input_ids"])
    assert response.usage.completion_tokens <= 20
    assert response.usage.total_tokens == response.usage.prompt_tokens + 0 + (
        response.usage.completion_tokens
    )
    assert response.model == MODEL and response.object == "text_completion"
    # seeded sampling: what generate draws with a generator seeded alike
    sampled = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=12,
        temperature=0.7,
        top_p=0.9,
        seed=11,
        extra_body={"top_k": 30, "ignore_eos": True},
    )
    expected = generate_alone(
        tiny,
        prompt,
        12,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        top_k=30,
        suppress_tokens=[2],
        generator=[torch.Generator().manual_seed(11)],
    )
    assert sampled.choices[0].text == expected
    assert sampled.usage.completion_tokens == 12


def test_prompt_lists_n_echo_stop_and_logprobs(client, tiny):
    prompts = ["Once upon a time", "A list is"]
    response = client.completions.create(
        model=MODEL,
        prompt=prompts,
        max_tokens=6,
        n=2,
        temperature=0.9,
        seed=5,
        echo=True,
        logprobs=2,
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for choice in response.choices:
        prompt = prompts[choice.index // 2]
        assert choice.text.startswith(prompt)
        tokens = choice.logprobs.tokens
        assert "".join(tokens) == choice.text  # the prompt's tokens, then the new ones
        assert choice.logprobs.token_logprobs[0] is None
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])
    assert response.usage.completion_tokens == 4 * 6
    full = generate_alone(tiny, prompts[0], 30, do_sample=False)
    stop = full[8:11]
    stopped = client.completions.create(
        model=MODEL, prompt=prompts[0], max_tokens=30, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_presence_and_frequency_penalties_reach_the_engine(client, tiny):
    kwargs = dict(model=MODEL, prompt="A", max_tokens=20, temperature=0)
    plain = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    penalised = client.completions.create(
        **kwargs, frequency_penalty=2.0, presence_penalty=1.0, extra_body={"ignore_eos": True}
    )
    params = SamplingParams(
        max_tokens=20, temperature=0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=1.0
    )
    expected = LLM(*tiny, max_model_len=64).generate(["A"], params)[0].outputs[0].text
    assert penalised.choices[0].text == expected
    assert penalised.choices[0].text != plain.choices[0].text  # the tiny model repeats "A"


def test_streaming_completions_and_chat_with_the_openai_client(client):
    kwargs = dict(model=MODEL, prompt="The weather is", max_tokens=15, temperature=0.8, seed=3)
    whole = client.completions.create(**kwargs)
    stream = client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    token_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in token_chunks) == whole.choices[0].text
    assert len(token_chunks) == whole.usage.completion_tokens  # one chunk per token
    assert token_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
    parts = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert parts[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in parts)
    assert text == reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 5  # "System: Be brief.\nUser: Hi\nAssistant:"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_renders_with_the_default_template(client, tiny):
    from bloomlm.chat import render_chat
    from bloomlm.serving.server import DEFAULT_CHAT_TEMPLATE

    messages = [{"role": "user", "content": "Tell me a story"}]
    text = render_chat(messages, DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)
    assert text == "User: Tell me a story\nAssistant:"
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content == generate_alone(tiny, text, 12, do_sample=False)
    assert reply.usage.prompt_tokens == len(tiny[1](text)["input_ids"])


# --------------------------------------------------------------------------------------------------
# Bad input: OpenAI's error body naming the field, never a 500
# --------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b" " * (16 * 2**20 + 1), 413, None),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "", "max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [], "max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 256}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * 300}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 100000}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
        400,
        "max_tokens",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_error_bodies_naming_the_field(server, path, body, status, param):
    got, response, _ = post(server.url, path, body)
    assert got == status, response
    error = response["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert "Traceback" not in error["message"]


def test_api_key_unknown_paths_and_the_open_endpoints(server):
    status, body, _ = post(
        server.url, "/v1/completions", {"prompt": "hi"}, headers={"Authorization": "Bearer wrong"}
    )
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _ = get(server.url, "/v1/models")
    assert status == 401
    status, page = get(server.url, "/")
    assert (
        status == 200
        and b"bloomlm playground" in page
        and b"http" not in page.split(b"<script>")[1]
    )  # nothing loaded from elsewhere
    status, body = get(server.url, "/nowhere")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    assert health(server.url)["status"] == "ok"
    assert metric(server.url, "bloomlm_max_sequences") > 100  # the budget, not a constant
    assert "up to" in server.output() and "concurrent sequences" in server.output()


# --------------------------------------------------------------------------------------------------
# Load: 100 clients at once, 10% leave mid-stream
# --------------------------------------------------------------------------------------------------


def stream_once(url: str, body: dict, leave_after: int | None, results: list, index: int) -> None:
    """One streaming client: the number of token chunks it read, its text and usage."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(
            "POST",
            "/v1/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        chunks, text, usage, done = 0, "", None, False
        for _ in range(10_000):  # bounded: at most 32 tokens, a few lines each
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                chunks += 1
                text += choice["text"]
            if leave_after is not None and chunks >= leave_after:
                break  # the client leaves mid-stream
        results[index] = {"chunks": chunks, "text": text, "usage": usage, "done": done}
    except Exception as error:  # reported by the test, not lost in the thread
        results[index] = {"error": repr(error)}
    finally:
        connection.close()


def run_load(url: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the of and to in a is that for it as was with be by on not he this are".split()
    bodies, leaving = [], set(rng.sample(range(100), 10))
    for i in range(100):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        new_tokens = 32 if i in leaving else rng.randint(4, 32)  # leavers leave mid-stream
        bodies.append(
            {
                "prompt": prompt,
                "max_tokens": new_tokens,
                "temperature": 0.8,
                "seed": i,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
        )
    results: list = [None] * 100
    threads = [
        threading.Thread(
            target=stream_once, args=(url, body, 3 if i in leaving else None, results, i)
        )
        for i, body in enumerate(bodies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    for i, (body, result) in enumerate(zip(bodies, results)):
        assert result is not None and "error" not in result, (i, result)
        if i in leaving:
            assert result["chunks"] == 3 and not result["done"]
            continue
        assert result["done"] and result["chunks"] == body["max_tokens"], (i, result)
        assert result["usage"]["completion_tokens"] == body["max_tokens"]
    return results


def test_one_hundred_concurrent_clients_ten_percent_leaving(server):
    started = time.monotonic()
    finished_before = metric(server.url, 'bloomlm_requests_total{status="finished"}')
    aborted_before = metric(server.url, 'bloomlm_requests_total{status="abort"}')
    run_load(server.url, seed=1)
    state = wait_idle(server.url)
    assert state["running"] == 0 and state["waiting"] == 0  # the leavers were freed too
    first_rss = server.rss()
    run_load(server.url, seed=2)
    assert wait_idle(server.url)["running"] == 0
    second_rss = server.rss()
    assert abs(second_rss - first_rss) <= 0.05 * first_rss, (first_rss, second_rss)
    assert metric(server.url, 'bloomlm_requests_total{status="finished"}') - finished_before == 180
    assert metric(server.url, 'bloomlm_requests_total{status="abort"}') - aborted_before == 20
    assert metric(server.url, "bloomlm_requests_running") == 0
    assert metric(server.url, "bloomlm_time_to_first_token_seconds_count") >= 200
    assert time.monotonic() - started < 120


def test_a_client_that_leaves_before_its_answer_is_aborted(server):
    import socket

    aborted = metric(server.url, 'bloomlm_requests_total{status="abort"}')
    body = json.dumps({"prompt": "hi", "n": 64, "max_tokens": 250, "ignore_eos": True})
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request.encode())
        deadline = time.monotonic() + 10
        while health(server.url)["running"] < 64 and time.monotonic() < deadline:
            time.sleep(0.01)  # (the rows fill while the engine thread copies the prompt in)
        assert health(server.url)["running"] == 64
    state = wait_idle(server.url)  # 64 x 250 tokens would take seconds more
    assert state["running"] == 0
    assert metric(server.url, 'bloomlm_requests_total{status="abort"}') == aborted + 1


# --------------------------------------------------------------------------------------------------
# The queue limit and SIGTERM (a small server of their own)
# --------------------------------------------------------------------------------------------------


def test_a_full_queue_gets_429_and_sigterm_drains_and_exits_0(tmp_path):
    small = Server(
        tmp_path / "small.log", "--max-batch", "1", "--max-waiting", "1", "--shutdown-timeout", "0"
    )
    try:
        long = {"prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True}
        results: list = [None] * 2
        first = threading.Thread(target=stream_once, args=(small.url, long, None, results, 0))
        first.start()
        deadline = time.monotonic() + 30
        while health(small.url)["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = threading.Thread(target=stream_once, args=(small.url, long, None, results, 1))
        queued.start()  # fills the one waiting place
        while health(small.url)["waiting"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body, headers = post(small.url, "/v1/completions", {"prompt": "hi"})
        assert status == 429 and headers["retry-after"] == "1"
        assert body["error"]["type"] == "rate_limit_error"
        small.process.send_signal(signal.SIGTERM)
        assert small.process.wait(timeout=30) == 0, small.output()
        first.join(timeout=30)
        queued.join(timeout=30)
        assert "stopped" in small.output()
        for result in results:  # each stream ended cleanly: aborted with an error event + [DONE]
            assert result is not None and result.get("done"), result
        with pytest.raises(OSError):
            get(small.url, "/health")
    finally:
        small.stop()


# --------------------------------------------------------------------------------------------------
# An engine fault over HTTP (a server in this process, its prefill made to fail on one token)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def in_process_server(tiny, fail_token: int, tokenizer=None, api_key=API_KEY) -> Iterator[str]:
    import uvicorn

    from bloomlm.serving.engine import Engine
    from bloomlm.serving.metrics import Metrics
    from bloomlm.serving.server import ServerSettings, bind, build_app
    from bloomlm.serving.worker import EngineThread

    model, tokenizer = tiny[0], tokenizer or tiny[1]
    metrics = Metrics()
    engine = Engine(model, copy.deepcopy(tokenizer), max_model_len=128, observer=metrics)
    fill = engine.staging.fill

    def failing_fill(row, ids, **kwargs):
        if fail_token in ids.tolist():
            raise RuntimeError("injected fault")
        return fill(row, ids, **kwargs)

    engine.staging.fill = failing_fill
    worker = EngineThread(engine)
    settings = ServerSettings(
        MODEL, 128, engine.max_sequences, api_key=api_key, chat_template=tokenizer.chat_template
    )  # as `bloomlm serve` does
    app = build_app(worker, tokenizer, settings, metrics)
    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(app, log_level="critical", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_an_engine_fault_fails_only_its_request_with_a_500(tiny, caplog):
    tokenizer = tiny[1]
    poison = tokenizer("zebra")["input_ids"][0]
    with in_process_server(tiny, poison) as url:
        results: list = [None]
        healthy = {"prompt": "Once upon", "max_tokens": 30, "ignore_eos": True, "stream": True}
        other = threading.Thread(target=stream_once, args=(url, healthy, None, results, 0))
        other.start()
        status, body, _ = post(url, "/v1/completions", {"prompt": "zebra", "max_tokens": 5})
        assert status == 500 and body["error"]["type"] == "internal_server_error"
        assert "injected fault" in body["error"]["message"] and "Traceback" not in str(body)
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        stream = {"prompt": "zebra", "max_tokens": 5, "stream": True}
        connection.request(
            "POST",
            "/v1/completions",
            body=json.dumps(stream),
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        events = connection.getresponse().read().decode().split("\n\n")
        connection.close()
        assert "injected fault" in events[0] and events[1] == "data: [DONE]"
        other.join(timeout=60)
        assert results[0]["done"] and results[0]["chunks"] == 30  # untouched
        status, body, _ = post(url, "/v1/completions", {"prompt": "Once", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] <= 3  # still serving
    assert any("injected fault" in r.getMessage() or r.exc_info for r in caplog.records)


def test_metrics_count_tokens_requests_and_latencies(tiny):
    """/metrics on a server of its own, so every count is exact."""
    prompt = "Once upon a time"
    with in_process_server(tiny, -1) as url:
        assert metric(url, "bloomlm_max_sequences") > 1
        body = {"prompt": prompt, "n": 2, "max_tokens": 5, "temperature": 0.7, "seed": 1,
                "ignore_eos": True}  # fmt: skip
        status, answer, _ = post(url, "/v1/completions", body)
        assert status == 200 and answer["usage"]["completion_tokens"] == 10
        assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 0})[0] == 400
        wrong_key = {"Authorization": "Bearer wrong"}
        assert post(url, "/v1/completions", {"prompt": "hi"}, headers=wrong_key)[0] == 401
        counts = {
            'bloomlm_requests_total{status="finished"}': 1,
            'bloomlm_requests_total{status="rejected"}': 2,
            'bloomlm_requests_total{status="error"}': 0,
            "bloomlm_prompt_tokens_total": len(tiny[1](prompt)["input_ids"]),  # one prefill
            "bloomlm_generation_tokens_total": 10,
            "bloomlm_time_to_first_token_seconds_count": 1,  # per request
            "bloomlm_inter_token_latency_seconds_count": 2 * 4,  # per continuation
            "bloomlm_requests_running": 0,
            "bloomlm_requests_waiting": 0,
            "bloomlm_batch_occupancy": 0,
        }
        assert {name: metric(url, name) for name in counts} == counts
    from bloomlm.serving.metrics import Metrics

    gauges = Metrics()  # what one engine step reports, as the engine thread calls it
    gauges.step_done(running=3, waiting=2, max_sequences=12)
    text = gauges.render()[0].decode()
    for line in ("bloomlm_requests_running 3.0", "bloomlm_requests_waiting 2.0",
                 "bloomlm_batch_occupancy 0.25", "bloomlm_max_sequences 12.0"):  # fmt: skip
        assert line in text.splitlines()


def test_chat_uses_the_folders_chat_template_as_transformers_renders_it(tiny, tmp_path):
    folder = tmp_path / "with-template"
    shutil.copytree(pathlib.Path(bloomlm.__file__).parent / "assets" / MODEL, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    tokenizer = bloomlm.AutoTokenizer.from_pretrained(str(folder))
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "More"},
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s>[user] Hello</s>[assistant] Hi</s>[user] More</s>[assistant]"
    from transformers import AutoTokenizer as TheirTokenizer

    theirs = TheirTokenizer.from_pretrained(str(folder))
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        rendered
    )
    with in_process_server(tiny, -1, tokenizer) as url:
        status, body, _ = post(
            url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0}
        )
    assert status == 200, body
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert body["usage"]["prompt_tokens"] == len(ids)
    model = tiny[0]
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(
        out, skip_special_tokens=True
    )


def test_the_readmes_serving_examples_work_as_written(tiny, tmp_path):
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.DOTALL)
    assert [kind for kind, _ in blocks] == ["bash", "bash", "python", "python"]
    assert "bloomlm serve" in blocks[0][1] and 'pip install "bloomlm[serve]"' in blocks[0][1]
    with in_process_server(tiny, -1, api_key=None) as url:
        address = url.removeprefix("http://")
        curl = blocks[1][1].replace("127.0.0.1:8000", address)
        done = subprocess.run(
            ["bash", "-c", f"set -e\n{curl}"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert '"text_completion"' in done.stdout and "data: [DONE]" in done.stdout
        for _, code in blocks[2:]:
            script = tmp_path / "example.py"
            script.write_text(code.replace("127.0.0.1:8000", address))
            ran = subprocess.run(
                [sys.executable, str(script)],
                capture_output=True,
                text=True,
                env=SERVER_ENV,
                timeout=120,
            )
            assert ran.returncode == 0, ran.stderr
            assert ran.stdout.strip()


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def test_serve_without_the_extra_names_the_install_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    assert main(["serve"]) == 2
    assert 'pip install "bloomlm[serve]"' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--kv-cache-memory", "lots"])
    assert "--kv-cache-memory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "layer", "cache_dtype"),
    [
        (["--quantize", "int8"], "Int8Linear", torch.float32),
        (["--quantize", "int8-weight-only"], "Int8WeightOnlyLinear", torch.float32),
        (["--quantize", "fp16"], "Fp16Linear", torch.float32),  # fp16 weights, fp32 compute
        (["--dtype", "bfloat16"], "Linear", torch.bfloat16),
    ],
)
def test_serve_loads_the_model_as_the_model_options_say(
    monkeypatch, capsys, options, layer, cache_dtype
):
    """`bloomlm serve --quantize` / `--dtype` (the shared model options): the engine serves the
    quantized model, its KV cache and memory plan in the compute dtype, and a greedy request
    returns what that model's `generate` returns. (run_server is replaced by one in-process
    request, so no port is served.)"""
    from bloomlm.serving import server as server_module

    served: dict = {}

    def serve_one_request(app, worker, sock, **kwargs) -> None:
        sock.close()
        engine = worker.engine
        model, tokenizer = engine.model, engine.tokenizer
        ids = tokenizer("Once upon a time")["input_ids"]
        engine.add_request("q", ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        for _ in range(100):  # bounded: 1 prefill + 8 tokens
            for output in engine.step():
                served["tokens"] = output.outputs[0].token_ids
            if not engine.has_work():
                break
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                  suppress_tokens=[2])[0, len(ids):].tolist()  # fmt: skip
        served.update(expected=expected, model=model, engine=engine)

    monkeypatch.setattr(server_module, "run_server", serve_one_request)
    threads = torch.get_num_threads()  # the CLI sets one thread for a tiny model
    try:
        argv = ["serve", "--port", "0", "--max-model-len", "64", "--kv-cache-memory", "8MiB"]
        assert main([*argv, *options]) == 0
    finally:
        torch.set_num_threads(threads)
    model, engine = served["model"], served["engine"]
    assert type(model.transformer.h[0].mlp.dense_h_to_4h).__name__ == layer
    assert engine.decoder.cache.keys.dtype == cache_dtype
    per_token = 2 * 4 * 192 * torch.empty((), dtype=cache_dtype).element_size()
    assert engine.plan.bytes_per_token == per_token
    printed = capsys.readouterr().out
    assert f"KV cache: {per_token / 1024:.1f} KiB per token x 64 tokens" in printed
    assert "stopped" in printed
    assert served["tokens"] == served["expected"] and len(served["tokens"]) == 8


# --------------------------------------------------------------------------------------------------
# The playground in a real browser
# --------------------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def test_the_playground_streams_what_the_api_returns(server, client, tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        message = "the browser test needs Debian's chromium and chromium-driver (apt-get install)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium never fetches a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        settings = {
            "max_tokens": "40",
            "temperature": "0.9",
            "top_p": "0.95",
            "top_k": "40",
            "seed": "1234",
            "api_key": API_KEY,
        }
        for field, value in settings.items():
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("In the beginning")
        driver.execute_script(  # count the page's updates: the text must arrive piece by piece
            "window.updates = 0; new MutationObserver(() => window.updates++)"
            ".observe(document.getElementById('output'),"
            " {childList: true, subtree: true, characterData: true});"
        )
        driver.find_element(By.ID, "generate").click()
        wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        wait.until(lambda d: d.find_element(By.ID, "state").text.startswith(("done", "failed")))
        shown = driver.find_element(By.ID, "completion").get_property("textContent")
        tokens = int(driver.find_element(By.ID, "tokens").text)
        rate = float(driver.find_element(By.ID, "rate").text)
        updates = driver.execute_script("return window.updates")
        error = driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
    assert error == ""
    expected = client.completions.create(
        model=MODEL,
        prompt="In the beginning",
        max_tokens=40,
        temperature=0.9,
        top_p=0.95,
        seed=1234,
        extra_body={"top_k": 40},
    )
    assert shown == expected.choices[0].text
    assert tokens == expected.usage.completion_tokens
    assert rate > 0  # the page's tokens/s
    assert updates >= tokens // 2  # streamed, not written once at the end

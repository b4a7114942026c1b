"""`bloomlm serve --tensor-parallel 2`: the server split over two gloo processes on loopback.

One job for the module (process groups are spawned once per world size, not once per case):
rank 0 serves HTTP and samples, rank 1 replays its decoder calls (bloomlm.serving.lockstep).
Its greedy completions (two concurrent requests, n=2) and a seeded sampled one must equal what
the single-process model generates (which test_serve.py shows the single-process server
returns); SIGTERM to the launcher must stop every process and exit 0.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch

import bloomlm
from conftest import generate_alone

MODEL = "bloomlm-tiny"  # 6 heads: 2 ranks of 3
PACKAGE_ROOT = str(pathlib.Path(bloomlm.__file__).resolve().parent.parent)
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]),
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}
START_TIMEOUT = 180


class SplitServer:
    def __init__(self, log: pathlib.Path):
        self.log = log
        command = [sys.executable, "-m", "bloomlm", "serve", "--tensor-parallel", "2",
                   "--port", "0", "--max-model-len", "128", "--kv-cache-memory", "64MiB",
                   "--log-level", "warning", "--shutdown-timeout", "5"]  # fmt: skip
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            env=ENV, stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
            if found:
                self.url = f"127.0.0.1:{found[1]}"
                return
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited:\n{log.read_text()}")
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"the server did not start in {START_TIMEOUT} s:\n{log.read_text()}")

    def children(self) -> list[int]:
        """Processes whose parent is the launcher (the ranks)."""
        found = []
        for status in pathlib.Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            if re.search(rf"^PPid:\s+{self.process.pid}$", text, re.MULTILINE):
                found.append(int(status.parent.name))
        return found

    def kill(self) -> None:
        for pid in self.children():
            with_gone(lambda pid=pid: os.kill(pid, signal.SIGKILL))
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def with_gone(call) -> None:
    try:
        call()
    except ProcessLookupError:
        pass


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s+Z", state, re.MULTILINE)  # a zombie has exited


def complete(url: str, body: dict) -> dict:
    host, port = url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        data = json.loads(response.read())
        assert response.status == 200, data
        return data
    finally:
        connection.close()


@pytest.fixture(scope="module")
def split_server(tmp_path_factory) -> Iterator[SplitServer]:
    running = SplitServer(tmp_path_factory.mktemp("serve-tp") / "server.log")
    try:
        yield running
    finally:
        running.kill()


@pytest.fixture(scope="module")
def tiny():
    model = bloomlm.BloomForCausalLM.from_pretrained(MODEL, torch_dtype="float32").eval()
    return model, bloomlm.AutoTokenizer.from_pretrained(MODEL)


def test_split_server_completions_equal_one_process(split_server, tiny):
    assert "on each of 2 ranks" in split_server.log.read_text()  # the plan counts 3 heads
    prompts = ["Once upon a time", "The capital of France is"]
    results: list = [None, None]

    def one(index: int) -> None:
        body = {"prompt": prompts[index], "max_tokens": 12, "temperature": 0}
        results[index] = complete(split_server.url, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for thread in threads:  # two at once: one decode batch on rank 0, replayed on rank 1
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for prompt, result in zip(prompts, results):
        assert result is not None
        assert result["choices"][0]["text"] == generate_alone(tiny, prompt, 12, do_sample=False)
    both = complete(split_server.url, {"prompt": "A list is", "max_tokens": 10, "n": 2,
                                       "temperature": 0})  # fmt: skip
    expected = generate_alone(tiny, "A list is", 10, do_sample=False)
    assert [c["text"] for c in both["choices"]] == [expected, expected]
    sampling = {"temperature": 0.7, "top_p": 0.9, "top_k": 30}
    sampled = complete(split_server.url, {"prompt": "Once", "max_tokens": 10, "seed": 11,
                                          "ignore_eos": True, **sampling})  # fmt: skip
    generator = [torch.Generator().manual_seed(11)]
    assert sampled["choices"][0]["text"] == generate_alone(tiny, "Once", 10, do_sample=True,
                                                  suppress_tokens=[2], generator=generator,
                                                  **sampling)  # fmt: skip


def test_sigterm_stops_every_process_and_exits_0(split_server):
    ranks = split_server.children()
    assert len(ranks) >= 2, ranks  # the two ranks (and multiprocessing's resource tracker)
    split_server.process.send_signal(signal.SIGTERM)
    assert split_server.process.wait(timeout=60) == 0, split_server.log.read_text()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks if alive(pid)], split_server.log.read_text()
    assert "bloomlm serve: stopped" in split_server.log.read_text()

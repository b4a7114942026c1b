"""`EngineThread`: the engine's own thread, the only one that touches the model.

Callers (the server's event loop) submit requests with a `sink`, a function the thread calls with
each RequestOutput of that request (the server's sink hands it to its event loop with
`call_soon_threadsafe`); `abort` cancels one. The thread sleeps while there is nothing to do.

Shutdown: `drain(grace)` stops taking requests (EngineStopped), lets the running ones finish for
`grace` seconds, then aborts the rest (their sinks get a final output with finish_reason
"abort"); `stop()` ends the thread after that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from bloomlm.serving.engine import Engine, EngineStopped, RequestOutput
from bloomlm.serving.params import SamplingParams

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]
_IDLE_WAIT = 0.5  # seconds the idle thread sleeps between checks of its stop flag


class EngineThread:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._accepting = True
        self._abort_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="bloomlm-engine", daemon=True)
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(
        self, requests: Sequence[tuple[str, Sequence[int], SamplingParams, Any]], sink: Sink
    ) -> None:
        """Queue requests (all or none: QueueFull, EngineStopped); `sink` gets their outputs."""
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            for request_id, *_ in requests:
                self._sinks[request_id] = sink
        try:
            self.engine.add_requests(requests)
        except Exception:
            with self._lock:
                for request_id, *_ in requests:
                    self._sinks.pop(request_id, None)
            raise
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def drain(self, grace: float) -> None:
        """Take no more requests; abort what still runs `grace` seconds from now."""
        with self._lock:
            self._accepting = False
            self._abort_at = time.monotonic() + grace
        self._wake.set()

    def idle(self) -> bool:
        with self._lock:
            return not self._sinks

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left and end the thread."""
        self.drain(0.0)
        deadline = time.monotonic() + timeout
        while not self.idle() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            if self._abort_at is not None and time.monotonic() >= self._abort_at:
                with self._lock:
                    pending = list(self._sinks)
                for request_id in pending:
                    engine.abort(request_id)
            if not engine.has_work():
                self._wake.wait(_IDLE_WAIT)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as error:  # a bug in the engine itself: fail what it held, go on
                logger.exception("the engine step failed")
                outputs = engine.fail_all(error)
            self.steps += 1
            for output in outputs:
                self._deliver(output)

    def _deliver(self, output: RequestOutput) -> None:
        with self._lock:
            sink = self._sinks.get(output.request_id)
            if output.finished:
                self._sinks.pop(output.request_id, None)
        if sink is None:
            return
        try:
            sink(output)
        except Exception:  # a closed event loop, a consumer gone: not the engine's problem
            logger.exception("delivering the output of request %s failed", output.request_id)


__all__ = ["EngineThread"]

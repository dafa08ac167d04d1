"""Continuous batching: one thread owns the Engine and runs its rounds; requests join and leave between
rounds. HTTP handlers talk to it only through `submit` (a bounded queue) and `abort`, and read events
from an asyncio queue per request."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time

from dspark.engine import Engine, Event
from dspark.sampling_params import SamplingParams


class QueueFull(Exception):
    """More requests wait than the server accepts (HTTP 429)."""


@dataclasses.dataclass(eq=False)  # hashed by identity: the abort set holds handles
class Handle:
    """One request as the HTTP side sees it."""
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    request_id: int = -1
    result: object = None  # the engine's finished Request, set before the final event
    started: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass
class Final:
    """The last item of a handle's queue: why it ended ("stop", "length", "abort", "timeout", "error")."""
    reason: str
    message: str = ""


class EngineLoop:
    def __init__(self, engine: Engine, max_waiting: int = 256, on_round=None):
        self.engine, self.max_waiting, self.on_round = engine, max_waiting, on_round
        self._incoming: queue.Queue[Handle] = queue.Queue()
        self._aborts: set[Handle] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._handles: dict[int, Handle] = {}
        # Over finished requests: rounds, tokens emitted, draft nodes verified, and per draft position the
        # rounds that reached it and those that accepted it (for /metrics).
        self.totals = {"rounds": 0, "emitted": 0, "verified": 0, "attempts": [], "accepted": []}
        self.ended = {"abort": 0, "timeout": 0, "error": 0}  # requests that did not finish normally
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dspark-engine", daemon=True)

    # -- the HTTP side ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def waiting(self) -> int:
        return self._incoming.qsize() + len(self.engine.waiting)

    def running(self) -> int:
        """Requests holding cache rows: decoding, or with a long prompt still being prefilled."""
        return len(self.engine.running) + len(self.engine.prefilling)

    def submit(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float | None) -> Handle:
        if self.waiting() >= self.max_waiting:
            raise QueueFull(f"{self.waiting()} requests are waiting (limit {self.max_waiting}); retry later")
        deadline = None if timeout_s is None else time.perf_counter() + timeout_s
        handle = Handle(prompt_ids, params, deadline, asyncio.Queue(), asyncio.get_running_loop())
        self._incoming.put(handle)
        self._wake.set()
        return handle

    def abort(self, handle: Handle) -> None:
        with self._lock:
            self._aborts.add(handle)
        self._wake.set()

    # -- the engine thread --------------------------------------------------------------------------
    def _send(self, handle: Handle, item) -> None:
        try:
            handle.loop.call_soon_threadsafe(handle.events.put_nowait, item)
        except RuntimeError:  # the handler's event loop is gone: nobody listens any more
            pass

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _admit(self) -> None:
        while True:
            try:
                handle = self._incoming.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                cancelled = handle in self._aborts
                self._aborts.discard(handle)
            if cancelled:  # the client left before the request reached the engine
                self._send(handle, Final("abort"))
                continue
            try:
                handle.request_id = self.engine.add_request(handle.prompt_ids, handle.params)
            except ValueError as error:  # validated already; anything left is the engine's word
                self._send(handle, Final("error", str(error)))
                continue
            self._handles[handle.request_id] = handle

    def _drop(self, handle: Handle, reason: str, message: str = "") -> None:
        if handle.request_id in self._handles:
            self.engine.abort(handle.request_id)
            self.engine.finished.pop(handle.request_id, None)
            del self._handles[handle.request_id]
            self.ended[reason] = self.ended.get(reason, 0) + 1
            self._send(handle, Final(reason, message))

    def _expire(self) -> None:
        with self._lock:  # aborts of handles not admitted yet stay for _admit to skip
            aborts = {h for h in self._aborts if h.request_id >= 0}
            self._aborts -= aborts
        now = time.perf_counter()
        for handle in aborts:
            self._drop(handle, "abort")
        for handle in [h for h in self._handles.values() if h.deadline is not None and now > h.deadline]:
            self._drop(handle, "timeout")

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            handle = self._handles.get(event.request_id)
            if handle is None:
                continue
            if event.new_tokens:
                self._send(handle, event)
            if event.finished:
                request = self.engine.finished.pop(event.request_id)
                handle.result = request
                self._account(request.stats)
                del self._handles[event.request_id]
                self._send(handle, Final(request.finish_reason or "stop"))

    def _account(self, stats) -> None:
        t = self.totals
        t["rounds"] += stats.rounds
        t["emitted"] += stats.emitted
        t["verified"] += stats.verified
        for key in ("attempts", "accepted"):
            values = getattr(stats, key)
            t[key] += [0] * (len(values) - len(t[key]))
            for j, v in enumerate(values):
                t[key][j] += v

    def _run(self) -> None:
        while not self._stop:
            try:
                self._round()
            except Exception as error:  # noqa: BLE001 - fail the requests in flight, keep serving
                message = f"{type(error).__name__}: {error}"
                for handle in list(self._handles.values()):
                    try:
                        self._drop(handle, "error", message)
                    except Exception:  # noqa: BLE001 - the engine refuses even that: forget the request
                        self._handles.pop(handle.request_id, None)
                        self._send(handle, Final("error", message))

    def _round(self) -> None:
        self._admit()
        self._expire()
        if not self.engine.has_work():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        self._deliver(self.engine.step())
        if self.on_round is not None:
            self.on_round(self)

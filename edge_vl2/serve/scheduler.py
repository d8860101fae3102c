"""One model, one worker thread, a bounded FIFO queue in front of it.

The model answers one request at a time (a CPU kiosk has no room for two, and on a GPU one request at a time keeps
the memory bound the device profile promised). HTTP handlers run on the event loop; each accepted request becomes a
`Job` that the worker thread runs to completion, sending its events (text pieces, then "done" or "error") back to
the loop through `loop.call_soon_threadsafe`. A slot is reserved before the request's images are decoded, so a full
queue answers 503 at once, without that work. A job can be cancelled at any time (client gone, deadline, shutdown);
the worker checks between tokens, and skips a cancelled job that is still waiting.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import sys
import threading
import time
from typing import Callable

from .errors import ApiError, internal, unavailable

log = logging.getLogger("edge_vl2.serve")


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None, None


_TRIM, _MALLOPT = _glibc() if sys.platform.startswith("linux") else (None, None)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20  # above a logits row (vocab x 4 bytes), below one 384 px tile (1.7 MB)


def fix_mmap_threshold() -> None:
    """Serve every allocation of `MMAP_THRESHOLD` bytes or more from its own mmap, given back to the OS when freed.
    glibc's default threshold rises to the largest block freed so far (up to 32 MB), after which image tiles and
    activations come from the per-thread heaps, where small objects allocated between them pin their pages: the
    server's RSS then wanders with what was freed where (measured with `edge-vl2 soak`: -4 to +9 % from round to
    round, of which malloc_trim gave back ~3 MB). A fixed threshold also ends that adjustment. No-op off glibc."""
    if _MALLOPT is not None:
        _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim_heap() -> None:
    """Give freed heap pages back to the OS after each request. glibc keeps the memory of freed tensors in its heaps
    (its mmap threshold rises after the first large free), so without this a server's RSS drifts up to what its
    busiest moment needed and stays there (measured with `edge-vl2 soak`). Costs a few ms; no-op off glibc."""
    if _TRIM is not None:
        _TRIM(0)


class Job:
    """One request's work and its way back to the event loop."""

    def __init__(self, request, inputs, loop: asyncio.AbstractEventLoop, arrived: float, deadline: float):
        self.request, self.inputs = request, inputs
        self.loop, self.arrived, self.deadline = loop, arrived, deadline
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.cancel_reason = ""
        self.queued_at = time.monotonic()
        self.prepare_s = 0.0  # decoding the images and tokenising, before the job was queued

    def emit(self, kind: str, value=None) -> None:
        """From the worker thread: ("text", str) pieces, then ("done", Outcome) or ("error", ApiError)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()


class Scheduler:
    """FIFO of jobs run by one worker thread; `run(job)` does the work and emits the job's events."""

    def __init__(self, run: Callable[[Job], None], max_queue: int, retry_after_s: int):
        self._run, self.max_queue, self.retry_after_s = run, max_queue, retry_after_s
        self._queue: collections.deque[Job] = collections.deque()
        self._reserved = 0
        self._closed = False
        self._cv = threading.Condition()
        self.running: Job | None = None
        self.counts = collections.Counter()  # served, cancelled, failed, rejected
        self._thread = threading.Thread(target=self._work, name="edge-vl2-model", daemon=True)
        self._thread.start()

    # ---- the event loop's side ----------------------------------------------------------------------------------

    def reserve(self) -> None:
        """Hold a queue slot for a request being prepared, or refuse it (503 + Retry-After)."""
        with self._cv:
            if self._closed:
                raise unavailable("the server is shutting down", self.retry_after_s)
            if len(self._queue) + self._reserved >= self.max_queue:
                self.counts["rejected"] += 1
                raise unavailable(f"the queue is full ({self.max_queue} requests waiting); retry later",
                                  self.retry_after_s)
            self._reserved += 1

    def release(self) -> None:
        """Give back a reserved slot (the request failed validation before it was queued)."""
        with self._cv:
            self._reserved -= 1

    def submit(self, job: Job) -> None:
        with self._cv:
            self._reserved -= 1
            if self._closed:
                raise unavailable("the server is shutting down", self.retry_after_s)
            job.queued_at = time.monotonic()
            self._queue.append(job)
            self._cv.notify()

    def state(self) -> dict:
        with self._cv:
            return {"running": int(self.running is not None), "waiting": len(self._queue) + self._reserved,
                    "max_waiting": self.max_queue, **{k: self.counts[k] for k in
                                                      ("served", "cancelled", "failed", "rejected")}}

    def close(self, timeout: float) -> None:
        """Stop taking jobs, cancel the waiting ones, give the running one `timeout` seconds, then cancel it."""
        with self._cv:
            self._closed = True
            waiting, self._queue = list(self._queue), collections.deque()
            self._cv.notify_all()
        for job in waiting:
            job.cancel("server shutting down")
            job.emit("error", unavailable("the server is shutting down", self.retry_after_s))
        self._thread.join(timeout)
        running = self.running
        if running is not None:
            running.cancel("server shutting down")
            self._thread.join(5.0)

    # ---- the worker thread --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                job = self.running = self._queue.popleft()
            try:
                self._run_one(job)
            finally:
                with self._cv:
                    self.running = None
                job.inputs = None  # the request's tiles: the route still holds the job until its response ends
                job = None
                trim_heap()

    def _run_one(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            return
        try:
            self._run(job)
        except ApiError as e:
            self.counts["failed"] += 1
            job.emit("error", e)
            return
        except BaseException as e:  # a bug: the one place a traceback is logged
            log.exception("request failed with an internal error")
            self.counts["failed"] += 1
            job.emit("error", internal(e))
            return
        self.counts["cancelled" if job.cancelled.is_set() else "served"] += 1

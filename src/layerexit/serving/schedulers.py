"""Schedulers: which rows the engine steps next. All three drive the same :class:`~.engine.Engine`.

- ``none``: one request at a time, its rows as one batch that rows leave as they exit (the reference).
- ``batch``: dynamic batching. Requests wait until ``max_batch`` rows are queued or the oldest has waited
  ``max_wait_ms``; the batch then runs layer by layer, rows leave (and are answered) as they exit, and the
  next batch starts when the last row of this one exits. A batch therefore waits for its slowest row.
- ``layer``: continuous per-layer batching (in the spirit of DREX's re-batching at every exit point). A pool
  of rows in flight, each waiting at its own layer with its hidden states and rule state; each step runs one
  layer for (up to ``max_batch`` of) the rows waiting at it, so rows from different requests and arrival times
  share steps; exited rows are answered at once; queued requests join at layer 0, at most ``max_batch`` rows
  at a time, whenever fewer than ``max_batch`` rows wait there.

Layer-picking policy of ``layer`` (``policy``):

- ``largest`` (default): the layer with the most rows waiting (ties: the deeper one), which makes steps as
  large as possible and lets late rows catch up with, and merge into, rows that entered earlier. A group that
  has not been chosen for ``num_layers`` consecutive steps is chosen next, so no row starves.
- ``deepest``: the deepest layer with rows waiting; rows in flight finish before new ones start, which favours
  the latency of rows already running over step size.

Every scheduler runs in one background thread; :meth:`Scheduler.submit` is thread-safe and answers through
:class:`concurrent.futures.Future` objects on the rows. An exception while stepping some rows fails those
rows' futures only; the thread goes on with the rest.
"""

from __future__ import annotations

import collections
import threading
import time

from ..errors import bad_value
from .engine import Engine, Row

SCHEDULERS = ("none", "batch", "layer")
POLICIES = ("largest", "deepest")


class QueueFull(Exception):
    """The queue holds ``max_queue`` rows already: come back later (HTTP 503 with Retry-After)."""

    def __init__(self, queued: int, limit: int, retry_after: float):
        super().__init__(f"the queue is full ({queued} rows waiting, limit {limit}); retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The scheduler no longer accepts requests (it is draining before exit)."""


class Scheduler:
    """Base: a thread-safe queue of requests (lists of rows), a worker thread, drain-on-stop."""

    name = ""

    def __init__(self, engine: Engine, max_batch: int = 64, max_wait_ms: float = 5.0, max_queue: int = 1024):
        if int(max_batch) != max_batch or max_batch < 1:
            raise bad_value("max_batch", max_batch, "use a whole number of rows >= 1")
        if not max_wait_ms >= 0:
            raise bad_value("max_wait_ms", max_wait_ms, "use a number of milliseconds >= 0")
        if int(max_queue) != max_queue or max_queue < 1:
            raise bad_value("max_queue", max_queue, "use a whole number of rows >= 1")
        self.engine = engine
        self.max_batch, self.max_wait, self.max_queue = int(max_batch), max_wait_ms / 1000.0, int(max_queue)
        self._queue: collections.deque[list[Row]] = collections.deque()
        self._queued_rows = 0  # rows in _queue
        self._active_rows = 0  # rows taken from the queue and not yet exited
        self._cv = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.errors = 0  # steps that raised

    # --- public ---------------------------------------------------------------------------------------
    def submit(self, rows: list[Row]) -> None:
        """Queue one request's rows; raises :class:`QueueFull` or :class:`ShuttingDown` instead of waiting."""
        with self._cv:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            pending = self._queued_rows + self._active_rows
            if pending + len(rows) > self.max_queue:
                raise QueueFull(pending, self.max_queue, retry_after=1.0)
            self._queue.append(rows)
            self._queued_rows += len(rows)
            self._cv.notify()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        """Rows accepted and not yet started (waiting in the queue)."""
        return self._queued_rows

    @property
    def in_flight(self) -> int:
        """Rows started and not yet exited."""
        return self._active_rows

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name=f"layerexit-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with ``drain`` finish every accepted row first; then end the worker thread."""
        with self._cv:
            self._accepting = False
            if not drain:
                for rows in self._queue:
                    for row in rows:
                        row.future.set_exception(ShuttingDown("the server stopped before running this input"))
                self._queue.clear()
                self._queued_rows = 0
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- worker ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._has_work():
                    if self._stopping:
                        return
                    self._cv.wait()
            self._work()

    def _has_work(self) -> bool:
        return bool(self._queue) or self._active_rows > 0

    def _take(self, limit: int) -> list[Row]:
        """Whole requests from the queue, up to ``limit`` rows (always at least one request)."""
        rows: list[Row] = []
        with self._cv:
            while self._queue and (not rows or len(rows) + len(self._queue[0]) <= limit):
                request = self._queue.popleft()
                rows.extend(request)
                self._queued_rows -= len(request)
            self._active_rows += len(rows)
        return rows

    def _finished(self, n: int) -> None:
        with self._cv:
            self._active_rows -= n

    def _fail(self, rows: list[Row], err: BaseException) -> None:
        self.errors += 1
        for row in rows:
            if not row.future.done():
                row.future.set_exception(err)
        self._finished(len(rows))

    def _step(self, rows: list[Row], layer: int) -> list[Row]:
        """Run ``layer`` for ``rows``; answer the rows that exit and return those that go on (none when the step
        failed: its rows are answered with the error and the scheduler goes on)."""
        try:
            exited = self.engine.step(rows, layer)
        except Exception as err:  # noqa: BLE001 - reported to those rows' clients
            self._fail(rows, err)
            return []
        self._finished(len(exited))
        gone = set(map(id, exited))
        return [r for r in rows if id(r) not in gone]

    def _run_batch(self, rows: list[Row]) -> None:
        """Embed ``rows`` and run them layer by layer until the last exits (rows leave as they exit)."""
        try:
            self.engine.embed(rows)
        except Exception as err:  # noqa: BLE001 - reported to those rows' clients
            self._fail(rows, err)
            return
        for layer in range(self.engine.num_layers):
            rows = self._step(rows, layer)
            if not rows:
                return

    def _work(self) -> None:
        raise NotImplementedError


class NoneScheduler(Scheduler):
    """One request at a time (the reference)."""

    name = "none"

    def _work(self) -> None:
        with self._cv:
            request = self._queue.popleft()
            self._queued_rows -= len(request)
            self._active_rows += len(request)
        self._run_batch(request)


class BatchScheduler(Scheduler):
    """Dynamic batching: up to ``max_batch`` rows or ``max_wait_ms``; rows leave the batch as they exit."""

    name = "batch"

    def _work(self) -> None:
        with self._cv:  # wait for a full batch, the oldest request's deadline, or shutdown
            deadline = self._queue[0][0].created + self.max_wait
            while self._queued_rows < self.max_batch and not self._stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
        self._run_batch(self._take(self.max_batch))


class LayerScheduler(Scheduler):
    """Continuous per-layer batching over a pool of rows in flight (see the module docstring)."""

    name = "layer"

    def __init__(self, engine: Engine, max_batch: int = 64, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 policy: str = "largest"):
        super().__init__(engine, max_batch, max_wait_ms, max_queue)
        if policy not in POLICIES:
            raise bad_value("policy", policy, f"use one of {', '.join(POLICIES)}")
        self.policy = policy
        #: rows waiting at each layer, oldest first
        self._pool: list[list[Row]] = [[] for _ in range(engine.num_layers)]
        self._skipped = [0] * engine.num_layers  # consecutive steps each non-empty layer was passed over

    def _admit(self) -> None:
        room = self.max_batch - len(self._pool[0])
        if room <= 0 or not self._queue:
            return
        rows = self._take(room)
        try:
            self.engine.embed(rows)
        except Exception as err:  # noqa: BLE001
            self._fail(rows, err)
            return
        self._pool[0].extend(rows)

    def pick(self) -> int | None:
        """The layer to run next under the policy, or None when no row is waiting."""
        waiting = [layer for layer, rows in enumerate(self._pool) if rows]
        if not waiting:
            return None
        starved = [layer for layer in waiting if self._skipped[layer] >= self.engine.num_layers]
        if starved:
            return max(starved)
        if self.policy == "deepest":
            return max(waiting)
        return max(waiting, key=lambda layer: (len(self._pool[layer]), layer))

    def _work(self) -> None:
        self._admit()
        layer = self.pick()
        if layer is None:
            return
        for other in range(len(self._pool)):
            self._skipped[other] = 0 if other == layer or not self._pool[other] else self._skipped[other] + 1
        group = self._pool[layer]
        rows, self._pool[layer] = group[: self.max_batch], group[self.max_batch :]
        moved = self._step(rows, layer)
        if moved:
            self._pool[layer + 1].extend(moved)


def make_scheduler(name: str, engine: Engine, max_batch: int = 64, max_wait_ms: float = 5.0,
                   max_queue: int = 1024, policy: str = "largest") -> Scheduler:
    """Build a scheduler by name: ``none``, ``batch`` or ``layer`` (``policy`` applies to ``layer``)."""
    if name == "none":
        return NoneScheduler(engine, max_batch, max_wait_ms, max_queue)
    if name == "batch":
        return BatchScheduler(engine, max_batch, max_wait_ms, max_queue)
    if name == "layer":
        return LayerScheduler(engine, max_batch, max_wait_ms, max_queue, policy)
    raise bad_value("scheduler", name, f"use one of {', '.join(SCHEDULERS)}")

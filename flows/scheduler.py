"""Who runs when: the only place that decides how many runs go at once, and on which CPUs.

One loop over a queue asks one question of the run at its head: *is there room for this
run now?* Room is, in this order:

1. a free slot: fewer than ``cap`` runs running (the flow sets ``cap`` to
   min(max_parallel, usable CPUs // cores per run));
2. memory, when runs declare it (``MemoryGate``): checked before CPUs, so a run waiting
   for memory holds no CPU;
3. its own CPUs, when runs are pinned (``CpuSets``, shared with the stack's other flow
   runs on this host through file locks, so the loop re-checks every ``RECHECK_SECONDS``
   even when nothing here ended).

A run shared with other flow runs (the children of a spread batch, flows/spread.py) is
claimed only when there is room for it (``claim``): a run another flow run holds is
dropped from this queue (``on_skip``), so a slow host never holds runs it cannot start.

``has_room``/``admit``/``release`` keep the books under one lock. A run that fails and has
retries left goes back to the head of the queue after ``retry_delay`` seconds; while it
waits it holds nothing. The loop runs in the caller's thread (the flow's main thread, so a
SIGTERM reaches it); each admitted attempt executes in a worker thread. No Prefect here:
the scheduler knows runs, not task runs.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from flows.resources import CpuSets, MemoryGate, format_size

Run = TypeVar("Run")
Result = TypeVar("Result")

# How often a waiting head re-checks room that may free up elsewhere (another flow run's
# CPUs, the host's memory).
RECHECK_SECONDS = 0.2
# A run held back this long (memory, CPUs) is reported, once, by ``on_wait``.
REPORT_WAIT_SECONDS = 2.0


@dataclass(frozen=True)
class Placement:
    """What the scheduler gave one attempt."""

    attempt: int  # 1 for the first, 2 for the first retry, ...
    cpus: tuple[int, ...] | None = None


class Scheduler(Generic[Run, Result]):
    """Run ``execute(run, placement)`` for every queued run, in order, within the room.

    ``on_start(run, placement)`` is called when an attempt of a run is admitted, ``on_done(run,
    result)`` when its last attempt ends (``on_error(run, exc)`` builds a result when
    ``execute`` raised), ``on_retry(run, result, placement)`` when an attempt failed
    (``failed(result)``) and another follows, ``on_wait(run, reason)`` when a run has been
    held back for ``REPORT_WAIT_SECONDS``. No slot stays idle while a run waits.
    ``stop()`` (e.g. from a SIGTERM handler) admits nothing more and retries nothing.
    """

    _claim: Callable | None = None
    _on_skip: Callable = staticmethod(lambda run: None)

    def __init__(self, cap: int, cpus: CpuSets | None = None, memory: MemoryGate | None = None,
                 retries: int = 0, retry_delay: float = 0.0) -> None:
        if cap < 1:
            raise ValueError(f"cap must be at least 1, not {cap}")
        if retries < 0 or retry_delay < 0:
            raise ValueError(f"retries ({retries}) and retry_delay ({retry_delay}) must be >= 0")
        self.cap, self.cpus, self.memory = cap, cpus, memory
        self.retries, self.retry_delay = retries, retry_delay
        self.running = 0
        self.most_at_once = 0
        self.waiting_reason: str | None = None
        self._room = threading.Condition()
        self._next_cpus: tuple[int, ...] | None = None  # found by has_room, taken by admit
        self._attempts: dict[int, int] = {}  # id(run) -> attempts admitted
        self._held: dict[int, tuple[int, ...] | None] = {}  # id(run) -> its CPUs
        self._pending: deque = deque()
        self._retrying = 0
        self._stopping = threading.Event()

    def stop(self) -> None:
        """No more admissions or retries; running attempts end as their runs end."""
        self._stopping.set()

    def has_room(self, run: Run) -> bool:
        """Whether ``run`` may start now. Called with the lock held; when CPUs are pinned,
        the CPUs it found are already taken for ``admit`` to hand over."""
        if self.running >= self.cap:
            return False
        if self.memory is not None:
            fits, free = self.memory.fits()
            if not fits:
                self.waiting_reason = (f"memory: {format_size(max(free, 0))} free of the "
                                       f"{format_size(self.memory.per_run)} a run needs")
                return False
        if self.cpus is not None and self._next_cpus is None:
            self._next_cpus = self.cpus.take()
            if self._next_cpus is None:
                self.waiting_reason = (f"CPUs: all {len(self.cpus.cpus)} are taken by runs "
                                       "of this or another batch on this host")
                return False
        return True

    def admit(self, run: Run) -> Placement:
        """Take the room ``run`` needs (with the lock held, right after ``has_room``)."""
        self.running += 1
        cpus, self._next_cpus = self._next_cpus, None
        attempt = self._attempts.get(id(run), 0) + 1
        self._attempts[id(run)] = attempt
        self._held[id(run)] = cpus
        if self.memory is not None:
            self.memory.admit(id(run))
        return Placement(attempt, cpus)

    def release(self, run: Run) -> None:
        """Give back what ``admit`` took (with the lock held)."""
        self.running -= 1
        cpus = self._held.pop(id(run), None)
        if cpus and self.cpus is not None:
            self.cpus.give(cpus)
        if self.memory is not None:
            self.memory.release(id(run))

    def run(
        self,
        queue: Iterable[Run],
        execute: Callable[[Run, Placement], Result],
        on_done: Callable[[Run, Result], None],
        on_error: Callable[[Run, BaseException], Result],
        on_start: Callable[[Run, Placement], None] = lambda run, placement: None,
        failed: Callable[[Result], bool] = lambda result: False,
        on_retry: Callable[[Run, Result, Placement], None] = lambda run, result, placement: None,
        on_wait: Callable[[Run, str], None] = lambda run, reason: None,
        claim: Callable[[Run], bool] | None = None,
        on_skip: Callable[[Run], None] = lambda run: None,
    ) -> None:
        self._pending = deque(queue)
        self._claim, self._on_skip = claim, on_skip
        hooks = (execute, on_start, on_done, on_error, failed, on_retry)
        # One thread more than the cap: a thread that just gave its slot back may still
        # be on its way out when the next run is admitted.
        try:
            with ThreadPoolExecutor(max_workers=self.cap + 1, thread_name_prefix="run") as pool:
                while (admitted := self._next_admission(on_wait)) is not None:
                    # In the caller's context (its Prefect settings and run context), so
                    # hooks that log or call Prefect from a run's thread reach its server.
                    pool.submit(contextvars.copy_context().run, self._one, *admitted, *hooks)
        finally:
            with self._room:
                if self._next_cpus and self.cpus is not None:
                    self.cpus.give(self._next_cpus)
                self._next_cpus = None

    def _next_admission(self, on_wait) -> tuple[Run, Placement] | None:
        """Wait for room for the head of the queue and admit it; None when all is done."""
        with self._room:
            held_since, reported = None, False
            while not self._stopping.is_set():
                if not self._pending:
                    # Done unless a retry waits or a running attempt may still fail into one.
                    if not self._retrying and (self.running == 0 or not self.retries):
                        return None
                    self._room.wait()
                    continue
                head = self._pending[0]
                self.waiting_reason = None
                if self.has_room(head):
                    self._pending.popleft()
                    if self._claim is not None and not self._claim(head):
                        self._on_skip(head)  # another flow run has it; the room stays
                        continue
                    placement = self.admit(head)
                    self.most_at_once = max(self.most_at_once, self.running)
                    return head, placement
                if not self.waiting_reason:  # only a slot here frees it: our runs' end wakes us
                    self._room.wait()
                    continue
                held_since = held_since or time.monotonic()
                if not reported and time.monotonic() - held_since >= REPORT_WAIT_SECONDS:
                    on_wait(head, self.waiting_reason)
                    reported = True
                self._room.wait(RECHECK_SECONDS)  # room that frees up elsewhere
            return None

    def _one(self, run, placement, execute, on_start, on_done, on_error, failed, on_retry) -> None:
        result = None
        try:
            on_start(run, placement)
            result = execute(run, placement)
        except Exception as exc:  # the attempt failed to run: report it, go on
            result = on_error(run, exc)
        finally:
            with self._room:
                self.release(run)
                # Counted before the loop can see an empty queue, so it waits for the retry.
                # (No result: on_error raised, and that propagates from here.)
                again = (result is not None and placement.attempt <= self.retries
                         and not self._stopping.is_set() and failed(result))
                self._retrying += again
                if not again:  # its last attempt: forget it (a batch may hold 20,000 runs)
                    self._attempts.pop(id(run), None)
                self._room.notify_all()
        if again:
            try:
                on_retry(run, result, placement)
            finally:
                timer = threading.Timer(self.retry_delay, self._requeue, (run,))
                timer.daemon = True
                timer.start()
        else:
            on_done(run, result)

    def _requeue(self, run) -> None:
        """A retry goes back to the head of the queue; it held nothing while it waited."""
        with self._room:
            self._retrying -= 1
            if not self._stopping.is_set():
                self._pending.appendleft(run)
            self._room.notify_all()

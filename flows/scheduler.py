"""Who runs when: the only place that decides how many runs go at once.

One loop over a queue asks one question of each run at the head: *is there room for
this run now?* Today room means "fewer than ``cap`` runs running"; cores per run, memory
admission and retries are the same question with more terms (``has_room``, with
``admit``/``release`` keeping the books under the same lock), answered in
the same loop, so a run waiting for memory never holds a CPU slot.

The loop runs in the caller's thread (the flow's main thread, so a SIGTERM reaches it);
each admitted run executes in a worker thread and gives its room back when it ends. No
Prefect here: the scheduler knows runs, not task runs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Run = TypeVar("Run")
Result = TypeVar("Result")


class Scheduler(Generic[Run, Result]):
    """Run ``execute`` for every queued run, in order, at most ``cap`` at once.

    ``on_start(run)`` is called when a run is admitted, ``on_done(run, result)`` when it
    ends (``on_error(run, exc)`` builds a result when ``execute`` raised), both from the
    thread that ran it. No slot stays idle while a run waits: a run's end wakes the loop.
    """

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"cap must be at least 1, not {cap}")
        self.cap = cap
        self.running = 0
        self.most_at_once = 0
        self._room = threading.Condition()

    def has_room(self, run: Run) -> bool:
        """Whether ``run`` may start now. Called with the lock held."""
        return self.running < self.cap

    def admit(self, run: Run) -> None:
        """Take the room ``run`` needs (with the lock held, right after ``has_room``)."""
        self.running += 1

    def release(self, run: Run) -> None:
        """Give back what ``admit`` took (with the lock held)."""
        self.running -= 1

    def run(
        self,
        queue: Iterable[Run],
        execute: Callable[[Run], Result],
        on_done: Callable[[Run, Result], None],
        on_error: Callable[[Run, BaseException], Result],
        on_start: Callable[[Run], None] = lambda run: None,
    ) -> None:
        pending = deque(queue)
        # One thread more than the cap: a thread that just gave its slot back may still
        # be on its way out when the next run is admitted.
        with ThreadPoolExecutor(max_workers=self.cap + 1, thread_name_prefix="run") as pool:
            while pending:
                head = pending[0]
                with self._room:
                    self._room.wait_for(lambda run=head: self.has_room(run))
                    pending.popleft()
                    self.admit(head)
                    self.most_at_once = max(self.most_at_once, self.running)
                pool.submit(self._one, head, execute, on_start, on_done, on_error)

    def _one(self, run, execute, on_start, on_done, on_error) -> None:
        try:
            try:
                on_start(run)
                result = execute(run)
            except Exception as exc:  # the attempt failed to run: report it, go on
                result = on_error(run, exc)
        finally:
            with self._room:
                self.release(run)
                self._room.notify_all()
        on_done(run, result)

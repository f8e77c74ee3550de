"""Spreading one batch over the workers of a pool (``spread=N``).

The parent flow run splits the runs still to do into N chunks and keeps each chunk
scheduled as a child flow run of the same deployment, so every worker polling the pool
can take one. A worker runs one child of a batch at a time (a lock file per worker and
batch under the scratch root): a child that lands on a worker already busy with a
sibling declines at once, and the parent schedules its chunk again a little later, for
whichever worker polls next. So the cap (each child's ``max_parallel``, by default its
host's CPUs) holds per worker, and workers that join late still get a share.

Prefect's workers take every scheduled flow run they see; this is what makes a plain
``prefect worker start --pool sierra-pool`` on another host share the batch.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flows.plan import STATE_DIR, RunSpec, is_done, run_dir
from flows.summary import BatchSummary, FailedRun, read_summary

POLL_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 8.0


def worker_name() -> str:
    """The worker running this flow run (Prefect sets it), else the host."""
    return os.environ.get("PREFECT__WORKER_NAME") or socket.gethostname()


@contextmanager
def worker_slot(scratch: Path, group: str, worker: str) -> Iterator[bool]:
    """Hold this batch's slot on this worker; yields False if a sibling holds it.

    An flock is released by the kernel when its holder dies, so a crashed child never
    blocks the slot.
    """
    directory = scratch / STATE_DIR / "spread" / group
    directory.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", worker)
    with open(directory / f"{safe}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class _Chunk:
    runs: list[RunSpec]
    declined: int = 0
    not_before: float = 0.0


@dataclass
class FanOut:
    """The parent's side: schedule chunks as child flow runs until all have run."""

    deployment: str
    parameters: dict
    job_variables: dict | None
    scratch: Path
    logger: object
    tags: list[str] = field(default_factory=list)  # the parent's: the batch's tag
    succeeded: int = 0
    failed_runs: list[FailedRun] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)

    def run(self, todo: list[RunSpec], spread: int) -> None:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        pending = deque(_Chunk(todo[i::spread]) for i in range(spread) if todo[i::spread])
        active: dict = {}
        with get_client(sync_client=True) as client:
            try:
                while pending or active:
                    now = time.monotonic()
                    for _ in range(len(pending)):
                        chunk = pending.popleft()
                        if chunk.not_before > now:
                            pending.append(chunk)
                            continue
                        child = run_deployment(
                            self.deployment,
                            parameters={**self.parameters,
                                        "only_runs": [r.index for r in chunk.runs]},
                            job_variables=self.job_variables,
                            tags=self.tags,
                            timeout=0,
                            as_subflow=True,
                        )
                        active[child.id] = chunk
                    time.sleep(POLL_SECONDS)
                    for child_id in list(active):
                        state = client.read_flow_run(child_id).state
                        if state and state.is_final():
                            self._collect(client, child_id, state, active.pop(child_id), pending)
            finally:
                self._cancel(client, active)

    def _collect(self, client, child_id, state, chunk: _Chunk, pending: deque) -> None:
        summary = read_summary(client, child_id)
        if summary is not None and summary.declined:
            chunk.declined += 1
            chunk.not_before = time.monotonic() + min(2.0 ** chunk.declined, MAX_BACKOFF_SECONDS)
            pending.append(chunk)
            return
        if summary is not None:
            self.succeeded += summary.succeeded
            self.failed_runs += summary.failed_runs
            for worker, count in summary.workers.items():
                self.workers[worker] = self.workers.get(worker, 0) + count
            return
        # The child died without a summary: its runs that have no marker failed.
        self.logger.error("child flow run %s ended %s without a summary", child_id, state.type.value)
        for run in chunk.runs:
            if is_done(self.scratch, run):
                self.succeeded += 1
            else:
                self.failed_runs.append(FailedRun(
                    name=run.name, run_id=run.run_id, command=run.command, exit_code=None,
                    stdout=str(run_dir(self.scratch, run)),
                    stderr=f"child flow run {child_id} ended {state.type.value}",
                ))

    @staticmethod
    def _cancel(client, active: dict) -> None:
        from prefect.states import Cancelling

        for child_id in active:
            try:
                client.set_flow_run_state(child_id, Cancelling(), force=True)
            except Exception:  # best effort while the parent is going down
                pass


def declined_summary(base: BatchSummary, worker: str) -> BatchSummary:
    return base.model_copy(update={"declined": True, "workers": {worker: 0}})

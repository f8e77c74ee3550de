"""Spreading one batch over the workers of a pool (``spread=N``).

The parent flow run schedules N child flow runs of the same deployment (``FanOut``, in a
thread) and meanwhile runs runs itself; the parent and every child are offered every run
still to do and share them through **claims** on the scratch root (the shared file
system every worker host sees): before a run starts, its flow run creates the run's claim
file exclusively; a run claimed by a live sibling is left to it. So the parent works
through the batch at its cap from the start, as a batch without spread would, and each
worker that takes a child joins the same queue at once: spreading is never slower than
one host, however late the others poll.

Our worker type (sierra_prefect/worker_types.py) takes at most one child of a batch at a
time, and leaves the others Scheduled for other workers; a child that still lands on a
worker busy with a sibling (another worker type) declines, and the parent schedules it
again later (the lock file per worker and batch).

A lost host: every flow run of the batch renews a **lease** (a counter in a file under
the scratch root) every ``LEASE_SECONDS``. An owner whose lease has not changed for
``lost_after`` seconds (``SIERRA_PREFECT_HOST_LOST_AFTER``, default 30), as seen by the
observer's own clock, is set Crashed on the server (so every other observer agrees at
once); its claims may then be taken over, and the parent schedules the runs a lost child
left (no success marker, no failure reported) as a new child. A run that was in flight on
the lost host starts again elsewhere (a new attempt, its own logs). Without resume only
markers of this batch (the parent's id, recorded in each marker) count as done.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flows.plan import STATE_DIR, RunSpec, done_in, read_marker, run_dir, write_atomically
from flows.summary import BatchSummary, FailedRun, read_summary
from sierra_prefect.wake import wake_own_worker

POLL_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 8.0
LEASE_SECONDS = 2.0
LOST_AFTER_ENV = "SIERRA_PREFECT_HOST_LOST_AFTER"
DEFAULT_LOST_AFTER = 30.0
# New children for runs left by lost ones, at most (then the runs are reported failed).
MAX_RECOVERIES = 3


def lost_after() -> float:
    """Seconds without a lease renewal after which a child's host counts as lost."""
    value = os.environ.get(LOST_AFTER_ENV)
    try:
        seconds = float(value) if value else DEFAULT_LOST_AFTER
    except ValueError:
        raise ValueError(f"{LOST_AFTER_ENV}={value!r} is not a number of seconds: "
                         f"unset it or pass e.g. 30") from None
    if seconds < 3 * LEASE_SECONDS:
        raise ValueError(f"{LOST_AFTER_ENV}={value} is below {3 * LEASE_SECONDS:g} s "
                         f"(three lease renewals): pass more")
    return seconds


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


def spread_dir(scratch: Path) -> Path:
    return scratch / STATE_DIR / "spread"


class Lease:
    """This child's lease: a counter rewritten every ``LEASE_SECONDS`` by a thread.

    A counter, not a time stamp, so the observer judges staleness with its own clock and
    hosts with skewed clocks (or a file server's) cannot fool it."""

    def __init__(self, scratch: Path, owner: str) -> None:
        self.path = spread_dir(scratch) / "leases" / owner
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)
        self._count = 0

    def _renew(self) -> None:
        self._count += 1
        write_atomically(self.path, str(self._count))

    def _loop(self) -> None:
        while not self._stop.wait(LEASE_SECONDS):
            try:
                self._renew()
            except OSError:  # a full or flaky file system: the next renewal may work
                pass

    def __enter__(self) -> Lease:
        self._renew()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


class Liveness:
    """Whether a flow run (a claim's owner) is still alive: its state on the server is not
    final, and its lease, once seen, has changed within ``lost_after`` seconds."""

    def __init__(self, scratch: Path, client, lost_after: float, cache_seconds: float = 2.0):
        self.leases = spread_dir(scratch) / "leases"
        self.client, self.lost_after, self.cache_seconds = client, lost_after, cache_seconds
        self._seen: dict[str, tuple[str, float]] = {}  # owner -> (lease text, first seen)
        self._answer: dict[str, tuple[bool, float]] = {}  # owner -> (live, when)
        self._dead: set[str] = set()

    def lease_stale(self, owner: str) -> bool:
        """The owner's lease exists and has not changed for ``lost_after`` seconds."""
        try:
            text = (self.leases / owner).read_text()
        except OSError:
            return False  # no lease (yet, or it ended): the server's state decides
        now = time.monotonic()
        seen = self._seen.get(owner)
        if seen is None or seen[0] != text:
            self._seen[owner] = (text, now)
            return False
        return now - seen[1] > self.lost_after

    def declare_lost(self, owner: str) -> None:
        """Set the owner Crashed on the server: every other observer (a child that would
        see the lease for the first time, a re-trigger, `sierra-prefect run` following
        it) learns it at once, not after Prefect's 90 s heartbeat verdict."""
        from prefect.states import Crashed

        try:
            self.client.set_flow_run_state(owner, Crashed(
                message=f"no lease renewal for {self.lost_after:g} s: its host is lost (or its "
                        "process is gone)"), force=True)
        except Exception:  # the verdict stands here; the next observer tries again
            pass

    def mark_dead(self, owner: str) -> None:
        self._dead.add(owner)
        self._answer.pop(owner, None)

    def is_live(self, owner: str) -> bool:
        if owner in self._dead:
            return False
        now = time.monotonic()
        cached = self._answer.get(owner)
        if cached and now - cached[1] < self.cache_seconds:
            return cached[0]
        stale = self.lease_stale(owner)
        try:
            state = self.client.read_flow_run(owner).state
            live = not (state and state.is_final())
        except Exception:  # unknown to this server: nothing vouches for it
            live = False
        if live and stale:
            self.declare_lost(owner)
            live = False
        if not live:
            self._dead.add(owner)
        self._answer[owner] = (live, now)
        return live


class Claims:
    """Who runs which run of a spread batch: ``<run dir>/claims/<generation>`` files made
    exclusively (``O_EXCL``, atomic on local and NFS file systems), holding the owner's
    flow-run id. The newest generation holds the run; a claim of an owner that is no
    longer live is taken over by making the next generation."""

    def __init__(self, scratch: Path, owner: str, liveness: Liveness,
                 batch: str | None = None) -> None:
        """``batch``: the spread batch's id when earlier markers do not count (no resume)."""
        self.scratch, self.owner, self.liveness, self.batch = scratch, owner, liveness, batch

    def _dir(self, run: RunSpec) -> Path:
        return run_dir(self.scratch, run) / "claims"

    def holder(self, run: RunSpec) -> tuple[int, str] | None:
        """(generation, owner) of the run's newest claim, None if unclaimed."""
        try:
            generations = [int(p.name) for p in self._dir(run).iterdir() if p.name.isdigit()]
        except OSError:
            return None
        while generations:
            newest = max(generations)
            try:
                return newest, (self._dir(run) / str(newest)).read_text().strip()
            except OSError:  # being written: the owner's name follows at once
                time.sleep(0.01)
        return None

    def _make(self, run: RunSpec, generation: int) -> bool:
        directory = self._dir(run)
        directory.mkdir(parents=True, exist_ok=True)
        # Written under a temp name and linked into place: the claim never exists empty.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".claim.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.owner)
            os.link(tmp, directory / str(generation))
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def claim(self, run: RunSpec) -> bool:
        """True if this flow run may run ``run`` now (it holds the newest claim)."""
        for _ in range(100):  # each pass loses only to another claimant: bounded anyway
            if done_in(self.scratch, run, self.batch):
                return False
            held = self.holder(run)
            if held is None:
                if self._make(run, 0):
                    return True
                continue
            generation, owner = held
            if owner == self.owner:
                return True
            if self.liveness.is_live(owner):
                return False
            if self._make(run, generation + 1):
                return True
        return False


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
    batch: str | None = None  # set without resume: only this batch's markers count
    succeeded: int = 0
    failed_runs: list[FailedRun] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)
    _ended: set[str] = field(default_factory=set)  # run ids reported failed by a child
    _lost_children: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def run_catching(self, todo: list[RunSpec], spread: int) -> None:
        """``run`` in a thread: an error is kept for ``raise_error`` in the flow's thread."""
        try:
            self.run(todo, spread)
        except BaseException as exc:
            self._error = exc

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """The parent is going down: cancel the children and return."""
        self._stop.set()

    def ended_here(self, failed: list[FailedRun]) -> None:
        """Runs the parent itself ran and that failed: ended, not left to anyone."""
        self._ended.update(run.run_id for run in failed)

    def run(self, todo: list[RunSpec], spread: int) -> None:
        from prefect.client.orchestration import get_client

        lost = lost_after()
        # Every child is offered every run; the claims decide who runs which.
        pending = deque(_Chunk(list(todo)) for _ in range(min(spread, len(todo))))
        active: dict = {}
        recoveries = 0
        with get_client(sync_client=True) as client:
            liveness = Liveness(self.scratch, client, lost)
            claims = Claims(self.scratch, "parent", liveness, self.batch)
            try:
                while not self._stop.is_set():
                    self._submit_due(pending, active)
                    if self._stop.wait(POLL_SECONDS):
                        break
                    found_lost = self._poll_children(client, liveness, active, pending, lost)
                    left = [r for r in todo
                            if not done_in(self.scratch, r, self.batch)
                            and r.run_id not in self._ended]
                    if not left:
                        # Every run is done: children with no lease (not taken yet, still
                        # starting, or lost before they took a run) would find nothing
                        # to do; cancel them rather than wait for a poll or a heartbeat.
                        pending.clear()
                        self._cancel_idle(client, active, liveness)
                    if not left and not active:
                        self._count_from_markers(todo)
                        return
                    if active and not found_lost:
                        continue
                    held = [r for r in left if (h := claims.holder(r)) and liveness.is_live(h[1])]
                    free = [r for r in left if r not in held]
                    if not free or (pending and not found_lost):
                        continue  # live owners (children, or an earlier batch's) hold the rest
                    if recoveries >= MAX_RECOVERIES:
                        self.logger.error("%d runs left by lost child flow runs after %d "
                                          "recoveries: reporting them failed", len(free), recoveries)
                        self._give_up(free)
                        continue
                    recoveries += 1
                    self.logger.warning("%d runs left by a lost child flow run: scheduling "
                                        "them again (recovery %d of %d)", len(free), recoveries,
                                        MAX_RECOVERIES)
                    pending.append(_Chunk(free))
            finally:
                self._cancel(client, active)

    def _submit_due(self, pending: deque, active: dict) -> None:
        from prefect.deployments import run_deployment

        now = time.monotonic()
        scheduled = False
        for _ in range(len(pending)):
            chunk = pending.popleft()
            if chunk.not_before > now:
                pending.append(chunk)
                continue
            scheduled = True
            child = run_deployment(
                self.deployment,
                parameters={**self.parameters, "only_runs": [r.index for r in chunk.runs]},
                job_variables=self.job_variables,
                tags=self.tags,
                timeout=0,
                as_subflow=True,
            )
            active[child.id] = chunk
        if scheduled:
            wake_own_worker()

    def _poll_children(self, client, liveness: Liveness, active: dict, pending: deque,
                       lost: float) -> bool:
        """Collect the children that ended; set Crashed those whose lease went stale (True
        if any did)."""
        found_lost = False
        for child_id in list(active):
            state = client.read_flow_run(child_id).state
            if state and state.is_final():
                self._collect(client, child_id, state, active.pop(child_id), pending)
            elif liveness.lease_stale(str(child_id)):
                self.logger.warning("child flow run %s: no lease renewal for %g s: its host is "
                                    "lost; setting it Crashed", child_id, lost)
                liveness.declare_lost(str(child_id))
                liveness.mark_dead(str(child_id))
                (liveness.leases / str(child_id)).unlink(missing_ok=True)  # nobody renews it
                found_lost = True
        return found_lost

    def _count_from_markers(self, todo: list[RunSpec]) -> None:
        """Succeeded runs and who ran them, from the ledger: it also knows the runs a lost
        child finished before it was lost, which no summary reports."""
        self.succeeded, self.workers = 0, {}
        for run in todo:
            record = read_marker(self.scratch, run)
            if record is not None and (self.batch is None or record.get("batch") == self.batch):
                self.succeeded += 1
                worker = record.get("worker") or "unknown"
                self.workers[worker] = self.workers.get(worker, 0) + 1

    def _give_up(self, runs: list[RunSpec]) -> None:
        for run in runs:
            self._ended.add(run.run_id)
            self.failed_runs.append(FailedRun(
                name=run.name, run_id=run.run_id, command=run.command, exit_code=None,
                stdout=str(run_dir(self.scratch, run)), stderr=str(run_dir(self.scratch, run)),
                reason="its child flow runs were lost, again and again",
            ))

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
            self._ended.update(run.run_id for run in summary.failed_runs)
            for worker, count in summary.workers.items():
                self.workers[worker] = self.workers.get(worker, 0) + count
            return
        # The child died without a summary (host lost, killed): the runs it did not finish
        # are run again by a sibling or a new child (see run()); what it finished counts.
        self.logger.error("child flow run %s ended %s without a summary: %s", child_id,
                          state.type.value, state.message or "")
        self._lost_children.append(str(child_id))

    @staticmethod
    def _cancel_idle(client, active: dict, liveness: Liveness) -> None:
        from prefect.states import Cancelled

        for child_id in list(active):
            if (liveness.leases / str(child_id)).exists():
                continue  # it runs (or ran) runs: it ends by itself, or its lease goes stale
            state = client.read_flow_run(child_id).state
            if state is not None and state.is_final():
                continue  # collected at the next poll
            client.set_flow_run_state(
                child_id, Cancelled(message="every run of the batch is done"), force=True)
            del active[child_id]

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

"""What the Prefect UI shows while a batch runs, written in batches.

An experimental run is not a Prefect task run (that cost ~9 ms of CPU in the flow process
and 6-7 ms on the server per run, and left the server writing events for minutes after a
big batch). Instead, per flow run:

- one task run per experiment (``c1-exp3``; a batch without SIERRA's names is one
  experiment named after its directory), Completed or Failed with its runs;
- a progress artifact "N of M runs done: S succeeded, F failed, K skipped", the live bar;
- per experiment, table artifacts of its runs (run, state, exit code, reason, seconds,
  attempts made by this flow run, the number of the last attempt's logs, CPUs it was
  pinned to, peak memory, stdout, stderr), at most ``PAGE_ROWS`` rows each, linked to the
  experiment's task run;
- while the next run waits for room (memory, CPUs held by another batch), the progress
  artifact's description says what it waits for.

Runs only touch memory (``started``/``finished``); one background thread writes what
changed every ``FLUSH_SECONDS`` (a PATCH of the progress artifact and of each table page
that changed), so the cost on the server is per flush, not per run, and a slow or busy
server slows the UI's view, never the runs. The ledger under the scratch root stays the
truth; what fails to reach the server is retried at the next flush.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
from dataclasses import dataclass, field
from uuid import UUID

from flows.execute import RunRecord
from flows.plan import RunSpec
from flows.resources import cpu_list, format_size
from flows.summary import progress_text

FLUSH_SECONDS = 1.0
PAGE_ROWS = 500

log = logging.getLogger(__name__)


def row_of(record: RunRecord) -> dict:
    return {
        "run": record.name, "state": record.state, "exit code": record.exit_code,
        "reason": record.reason, "seconds": record.seconds, "attempts": record.attempts,
        "attempt": record.attempt, "cpus": record.cpus,
        "peak memory": format_size(record.peak_memory) if record.peak_memory else None,
        "stdout": record.stdout, "stderr": record.stderr,
    }


@dataclass
class _Page:
    experiment: str
    number: int
    rows: dict[int, dict] = field(default_factory=dict)  # by run index
    artifact_id: UUID | None = None
    dirty: bool = False
    size: int = 0  # runs on this page
    ended: int = 0  # of them, ended


class Tracker:
    """The UI's view of one flow run's runs; thread-safe, flushed by its own thread."""

    def __init__(self, flow_run_id: UUID, todo: list[RunSpec], total: int, skipped: int,
                 flush_seconds: float | None = None, page_rows: int | None = None) -> None:
        flush_seconds = flush_seconds or FLUSH_SECONDS
        page_rows = page_rows or PAGE_ROWS
        self.flow_run_id = flow_run_id
        self.total, self.skipped = total, skipped
        self.succeeded = self.failed = 0
        self.ran_elsewhere = 0  # runs of a spread batch a sibling flow run holds
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._task_runs: dict[str, UUID] = {}
        self._page_of: dict[int, _Page] = {}
        self._pages: list[_Page] = []
        positions: dict[str, int] = {}
        current: dict[str, _Page] = {}
        for run in todo:
            k = positions.get(run.experiment, 0)
            positions[run.experiment] = k + 1
            if k % page_rows == 0:
                current[run.experiment] = _Page(run.experiment, k // page_rows + 1)
                self._pages.append(current[run.experiment])
            self._page_of[run.index] = current[run.experiment]
            current[run.experiment].size += 1
        self._progress_id: UUID | None = None
        self._progress_dirty = True
        self._waiting: str | None = None
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._loop,), name="tracker", daemon=True)

    # -- called by the flow, the experiment tasks and the runs (memory only) ----------

    def task_started(self, experiment: str, task_run_id: UUID) -> None:
        with self._lock:
            self._task_runs[experiment] = task_run_id

    def started(self, run: RunSpec, placement) -> None:
        """An attempt of ``run`` starts with ``placement`` (flows/scheduler.py:Placement)."""
        with self._lock:
            page = self._page_of[run.index]
            page.rows[run.index] = {
                "run": run.name, "state": "RUNNING", "exit code": None, "reason": None,
                "seconds": None, "attempts": placement.attempt, "attempt": None,
                "cpus": cpu_list(placement.cpus) if placement.cpus else "", "peak memory": None,
                "stdout": None, "stderr": None}
            page.dirty = True
            if self._waiting:
                self._waiting, self._progress_dirty = None, True

    def retrying(self, record: RunRecord, delay: float) -> None:
        with self._lock:
            page = self._page_of[record.index]
            page.rows[record.index] = {**row_of(record), "state": f"RETRYING in {delay:g} s"}
            page.dirty = True

    def waiting(self, reason: str) -> None:
        """The next run waits for room that frees up elsewhere (memory, CPUs)."""
        with self._lock:
            self._waiting, self._progress_dirty = reason, True

    def elsewhere(self, run: RunSpec) -> None:
        """Another flow run of the spread batch holds ``run``: counted as skipped here."""
        with self._lock:
            page = self._page_of[run.index]
            page.ended += 1
            self.ran_elsewhere += 1
            self.skipped += 1
            self._progress_dirty = True

    def finished(self, record: RunRecord) -> None:
        with self._lock:
            page = self._page_of[record.index]
            page.rows[record.index] = row_of(record)
            page.dirty = True
            page.ended += 1
            if record.ok:
                self.succeeded += 1
            else:
                self.failed += 1
            self._progress_dirty = True

    # -- the writer -----------------------------------------------------------------

    def __enter__(self) -> Tracker:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while True:
                stopping = self._stop.wait(self.flush_seconds)
                try:
                    self.flush(client)
                except Exception as exc:  # the server is busy or gone: next flush retries
                    log.warning("could not update the UI's view of the runs: %s", exc)
                if stopping:
                    return

    def flush(self, client) -> None:
        """Write what changed since the last flush."""
        with self._lock:
            pages = [(p, json.dumps([p.rows[i] for i in sorted(p.rows)]))
                     for p in self._pages if p.dirty]
            for page, _ in pages:
                page.dirty = False
            progress = self._progress_dirty
            self._progress_dirty = False
            counts = (self.total, self.succeeded, self.failed, self.skipped, self._waiting)
        try:
            if progress or self._progress_id is None:
                self._write_progress(client, *counts)
            for page, rows in pages:
                self._write_page(client, page, rows)
                with self._lock:  # a full page, written: the server keeps it, not us
                    if page.ended == page.size and not page.dirty:
                        page.rows = {}
        except BaseException:
            with self._lock:  # not written: try again next time
                for page, _ in pages:
                    page.dirty = True
                self._progress_dirty = True
            raise

    def _write_progress(self, client, total: int, succeeded: int, failed: int,
                        skipped: int, waiting: str | None) -> None:
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        done = succeeded + failed + skipped
        percent = 100.0 * done / total if total else 100.0
        text = progress_text(total, succeeded, failed, skipped)
        if waiting:
            text += f"; next run waits for {waiting}"
        if self._progress_id is None:
            self._progress_id = client.create_artifact(ArtifactCreate(
                type="progress", data=percent, description=text,
                flow_run_id=self.flow_run_id)).id
        else:
            client.update_artifact(self._progress_id,
                                   ArtifactUpdate(data=percent, description=text))

    def _write_page(self, client, page: _Page, rows: str) -> None:
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        if page.artifact_id is None:
            page.artifact_id = client.create_artifact(ArtifactCreate(
                type="table", data=rows, flow_run_id=self.flow_run_id,
                task_run_id=self._task_runs.get(page.experiment),
                description=f"{page.experiment}: runs (page {page.number})")).id
        else:
            client.update_artifact(page.artifact_id, ArtifactUpdate(data=rows))

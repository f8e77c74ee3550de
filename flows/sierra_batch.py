"""The ``sierra`` flow: run every experimental run of a SIERRA batch or experiment.

Deployed by ``prefect.yaml`` as ``sierra/local`` (process pool) and
``sierra/dockerremote`` (Docker pool). Its parameters are compatible with SIERRA's own
flow (``input_root``, ``scratch_root``; runs are the non-empty lines of
``<input_root>/commands.txt``), plus:

- ``max_parallel``: the cap; never more runs at once, no idle slot while runs wait.
  Default: the CPUs of the worker host. It is a local thread pool, so it is exact and
  costs no server round trips.
- ``cores_per_run`` (default 1): CPUs each run needs. Runs at once = min(max_parallel,
  usable CPUs of the worker // cores_per_run), at least 1; each run is pinned to its own
  CPUs, never shared with another run of this stack on the host (other batches included),
  and gets ``OMP_NUM_THREADS`` (and siblings) = cores_per_run.
- ``memory_per_run`` (e.g. ``"2G"``): a run starts only when the host's available memory,
  less what running runs may still grow into, covers it, and is killed and reported
  "memory limit 2.0G exceeded" if its process tree grows past it.
- ``retries`` (default 0), ``retry_delay`` (seconds, default 0): a failed or timed-out run
  runs again up to ``retries`` times, after ``retry_delay``, holding no CPU while it waits;
  every attempt keeps its own logs.
- ``resume`` (default true): skip runs whose success marker is already under
  ``scratch_root``, so a crash or a cancel costs only the unfinished runs.
- ``run_timeout``: seconds; a run that takes longer has its whole process group killed
  and counts as failed.
- ``workdir``: where commands run (default ``input_root``); SIERRA's plugin passes the
  directory SIERRA was started in, like ``hpc.local`` does.

On the worker side, ``SIERRA_PREFECT_ALLOWED_ROOTS`` (paths separated by ``:``) confines
the roots a trigger may name; anything outside, after resolving ``..`` and symlinks, is
refused before any command runs.

The pieces: ``flows/plan.py`` (which runs, which are done), ``flows/scheduler.py`` (who
runs when: the cap), ``flows/execute.py`` (one run: process group, attempt logs, marker),
``flows/tracking.py`` (what the UI shows: a task run per experiment, a progress artifact,
per-run tables, written in batches), ``flows/summary.py`` (the outcome). An experimental
run is not a Prefect task run: that cost ~9 ms of CPU per run here and as much again on
the server. One failing run never stops the others; the flow run ends Failed if any run
failed. The summary is the flow's result and two artifacts: ``sierra-summary`` (markdown,
for people, with the last lines of each failed run's stderr) and ``sierra-summary-json``
(for ``sierra-prefect run``).

Call it directly (tests, debugging)::

    from flows.sierra_batch import sierra
    sierra(input_root="/abs/batch", scratch_root="/abs/scratch", max_parallel=4)
"""

from __future__ import annotations

import contextvars
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.context import get_run_context
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.execute import (
    MEMORY_WATCHDOG,
    TASKSET,
    LiveRuns,
    RunLimits,
    RunRecord,
    end_processes,
    execute_run,
    find_stragglers,
)
from flows.plan import (
    ALLOWED_ROOTS_ENV,
    RunSpec,
    check_allowed,
    check_roots,
    is_done,
    plan_runs,
    prepare_scratch,
    read_commands,
    run_dir,
    tail,
)
from flows.resources import (
    CpuSets,
    MemoryGate,
    check_resources,
    cpu_list,
    format_size,
    private_dir,
    runs_at_once,
    usable_cpus,
)
from flows.scheduler import Placement, Scheduler
from flows.spread import (
    Claims,
    FanOut,
    Lease,
    Liveness,
    declined_summary,
    lost_after,
    worker_name,
    worker_slot,
)
from flows.summary import SUMMARY_JSON_KEY, SUMMARY_KEY, BatchSummary, FailedRun
from flows.tracking import Tracker
from sierra_prefect.versions import mismatch


class RunResources(BaseModel):
    """What each run of a flow run gets: decided once, on the worker host."""

    cap: int  # runs at once
    cores_per_run: int
    cpus: list[int]  # the host's usable CPUs
    memory: int | None  # bytes per run
    retries: int
    retry_delay: float
    timeout: float | None

    @property
    def pinned(self) -> bool:
        return TASKSET is not None

    @classmethod
    def on_this_host(cls, max_parallel, cores_per_run, memory_per_run, retries, retry_delay,
                     run_timeout, logger) -> RunResources:
        """Validate the flow's parameters (ValueError with one line) and size the slots."""
        import psutil

        if max_parallel is not None and max_parallel < 1:
            raise ValueError(f"max_parallel {max_parallel} is below 1: pass 1 or more")
        memory = check_resources(cores_per_run, memory_per_run, retries, retry_delay)
        total = psutil.virtual_memory().total
        if memory and memory > total:
            raise ValueError(f"memory_per_run {memory_per_run} is more than this host's "
                             f"{format_size(total)}: no run could ever start; pass less")
        cpus = usable_cpus()
        cap = runs_at_once(max_parallel, cores_per_run, len(cpus))
        if cores_per_run > len(cpus):
            logger.warning("%d cores per run is more than the %d usable CPUs here: one run at "
                           "a time, on all of them", cores_per_run, len(cpus))
        elif max_parallel and max_parallel > cap:
            logger.info("max_parallel %d: %d CPUs at %d per run fit %d runs at once",
                        max_parallel, len(cpus), cores_per_run, cap)
        return cls(cap=cap, cores_per_run=cores_per_run, cpus=cpus, memory=memory,
                   retries=retries, retry_delay=retry_delay, timeout=run_timeout)

    def cpu_sets(self) -> CpuSets:
        return CpuSets(self.cpus, self.cores_per_run, cpu_lock_dir())


def cpu_lock_dir() -> Path:
    """Where the CPU locks of this stack's flow runs on this host live: its Prefect home
    (every flow run a stack's worker starts shares it), else the user's runtime directory,
    else a per-user temp directory. Each must be private (flows/resources.py:private_dir)."""
    import tempfile

    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home).expanduser() / "sierra-prefect-cpus"
    try:
        return private_dir(home)
    except OSError:  # e.g. a container user without a writable home
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        fallback = (Path(runtime) / "sierra-prefect-cpus" if runtime
                    else Path(tempfile.gettempdir()) / f"sierra-prefect-cpus-{os.getuid()}")
        return private_dir(fallback)


class _Experiments:
    """Which runs of each experiment are still to end; the failed ones, once ended.

    Only counts and failed runs are kept: at 20,000 runs a record per run is memory the
    worker side would pay for nothing (the ledger and the UI's tables hold them).
    """

    def __init__(self, todo: list[RunSpec]) -> None:
        self._lock = threading.Lock()
        self.left: dict[str, int] = {}
        for run in todo:
            self.left[run.experiment] = self.left.get(run.experiment, 0) + 1
        self.ended: dict[str, int] = dict.fromkeys(self.left, 0)
        self.elsewhere: dict[str, int] = dict.fromkeys(self.left, 0)  # run by a sibling
        self.failed: dict[str, list[RunRecord]] = {name: [] for name in self.left}
        self._ended = {name: threading.Event() for name in self.left}

    def finished(self, experiment: str, record: RunRecord) -> None:
        with self._lock:
            self.ended[experiment] += 1
            if not record.ok:
                self.failed[experiment].append(record)
            if self.ended[experiment] + self.elsewhere[experiment] == self.left[experiment]:
                self._ended[experiment].set()

    def skipped(self, experiment: str) -> None:
        """Another flow run of a spread batch holds this run: not ours to end."""
        with self._lock:
            self.elsewhere[experiment] += 1
            if self.ended[experiment] + self.elsewhere[experiment] == self.left[experiment]:
                self._ended[experiment].set()

    def release(self) -> None:
        """The batch is over (or going down): nobody waits any longer."""
        for event in self._ended.values():
            event.set()

    def wait(self, experiment: str) -> tuple[int, int, list[RunRecord]]:
        """(runs ended, runs left to siblings, the failed ones) once the experiment is over."""
        self._ended[experiment].wait()
        with self._lock:
            return (self.ended[experiment], self.elsewhere[experiment],
                    list(self.failed[experiment]))


# The batches running in this process, by flow-run id: how an experiment's task run finds
# its runs (task parameters are data shown in the UI, not live objects).
_BATCHES: dict[str, tuple[_Experiments, Tracker]] = {}


@task(name="experiment", task_run_name="{experiment}", cache_policy=NO_CACHE,
      persist_result=False)
def experiment_runs(experiment: str, runs: int, batch: str) -> dict:
    """One SIERRA experiment: waits for its runs (run by the flow's scheduler) to end."""
    experiments, tracker = _BATCHES[batch]
    tracker.task_started(experiment, get_run_context().task_run.id)
    ended, elsewhere, failed = experiments.wait(experiment)
    result = {"experiment": experiment, "runs": runs, "ended": ended,
              "succeeded": ended - len(failed), "failed": len(failed)}
    if elsewhere:
        result["run elsewhere"] = elsewhere
    if failed or ended + elsewhere < runs:
        names = ", ".join(r.name for r in failed[:5]) + (", ..." if len(failed) > 5 else "")
        return Failed(message=f"{experiment}: {len(failed)} of {runs} runs failed ({names}), "
                              f"{runs - ended} did not end", data=result)
    return result


@contextmanager
def _runs_end_with_the_flow(live: LiveRuns, scheduler: Scheduler) -> Iterator[None]:
    """On cancel (SIGTERM from the worker) or any exit, admit nothing more and end the runs
    still going.

    Runs live in their own sessions, so without this they would outlive a cancelled
    flow run.
    """
    previous = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        def on_sigterm(signum, frame):
            scheduler.stop()
            live.terminate_all()
            if callable(previous):
                previous(signum, frame)
            else:
                raise SystemExit(128 + signum)

        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        scheduler.stop()
        live.terminate_all()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _require_server_version() -> None:
    """Refuse to run under a Prefect the server's may not work with (e.g. a stale image).

    The same rule as the shim's (sierra_prefect/versions.py: same major.minor), checked
    again here because the flow run's Prefect is the worker's or the image's, which the
    shim cannot always see (a client without Docker).
    """
    import prefect

    with get_client(sync_client=True) as client:
        response = client.request("GET", "/admin/version")
    server = response.json() if response.status_code == 200 else None
    reason = mismatch(prefect.__version__, server, who="flow run")
    if reason:
        raise RuntimeError(reason)


def _end_stragglers(scratch: Path, runs: list[RunSpec], logger) -> None:
    """End processes of these runs left by flow runs that are no longer running.

    A flow-run process killed outright (worker or host lost) cannot end its runs; they
    would race the new attempt for the same outputs. Runs of flow runs that are still
    running (e.g. a sibling of a spread batch) are left alone.
    """
    # Only a run that an earlier flow run started (its directory exists: it has attempt
    # logs) can have stragglers; a fresh batch skips the scan of every process's environment.
    started = [str(run_dir(scratch, r)) for r in runs if run_dir(scratch, r).is_dir()]
    found = find_stragglers(started) if started else {}
    if not found:
        return
    flow_run_ids = {fr for procs in found.values() for _, fr in procs}
    live = set()
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                state = client.read_flow_run(flow_run_id).state
            except Exception:  # unknown to this server: nothing vouches for it
                continue
            if state and not state.is_final():
                live.add(flow_run_id)
    orphans = [pid for procs in found.values() for pid, fr in procs if fr not in live]
    if orphans:
        logger.warning("ending %d processes left by an ended flow run: %s", len(orphans), orphans)
        end_processes(orphans)


def _publish(summary: BatchSummary) -> None:
    """The summary as artifacts: markdown for the UI, JSON for the shim."""
    create_markdown_artifact(
        markdown=summary.to_markdown(), key=SUMMARY_KEY, description=summary.headline()
    )
    context = get_run_context()
    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                key=SUMMARY_JSON_KEY,
                type="json",
                data=summary.model_dump(mode="json"),
                description=summary.headline(),
                flow_run_id=context.flow_run.id,
            )
        )


def _failed_run(record: RunRecord) -> FailedRun:
    return FailedRun(
        name=record.name, run_id=record.run_id, command=record.command,
        exit_code=record.exit_code, timed_out=record.timed_out, attempt=record.attempt,
        attempts=record.attempts, reason=record.reason, peak_memory=record.peak_memory,
        stdout=record.stdout,
        stderr=f"{record.stderr} ({record.error})" if record.error else record.stderr,
        stderr_tail=record.error or tail(Path(record.stderr)),
    )


def _crashed_record(run: RunSpec, scratch: Path, error: BaseException) -> RunRecord:
    logs = str(run_dir(scratch, run))
    return RunRecord(run.index, run.name, run.run_id, run.command, None, False, 0.0, 0,
                     logs, logs, error=repr(error))


def _run_here(todo: list[RunSpec], scratch: Path, workdir: str, resources: RunResources,
              tracker: Tracker, logger, claims: Claims | None = None, batch: str | None = None,
              ) -> tuple[int, list[FailedRun], dict[str, int]]:
    """Run ``todo`` in this flow run under the scheduler; (succeeded, failed runs, runs that
    succeeded after a retry with their attempts).

    The flow's main thread runs the scheduler's loop; one task run per experiment shows
    the grouping in the UI and ends with its experiment's runs.
    """
    flow_run_id = str(get_run_context().flow_run.id)
    experiments = _Experiments(todo)
    _BATCHES[flow_run_id] = (experiments, tracker)
    memory = MemoryGate(resources.memory) if resources.memory else None
    retried: dict[str, int] = {}
    live = LiveRuns()

    def execute(run: RunSpec, placement: Placement) -> RunRecord:
        limits = RunLimits(resources.timeout, placement.cpus, resources.memory,
                           on_memory=(lambda rss: memory.seen(id(run), rss)) if memory else None)
        return execute_run(run, scratch, Path(workdir), limits, flow_run_id, placement.attempt,
                           live, batch)

    def done(run: RunSpec, record: RunRecord) -> None:
        if record.ok and record.attempts > 1:
            retried[record.name] = record.attempts
        tracker.finished(record)
        experiments.finished(run.experiment, record)

    def retry(run: RunSpec, record: RunRecord, placement: Placement) -> None:
        logger.warning("%s: attempt %d failed (%s); retry %d of %d in %g s", run.name,
                       placement.attempt, record.reason or f"exit code {record.exit_code}",
                       placement.attempt, resources.retries, resources.retry_delay)
        tracker.retrying(record, resources.retry_delay)

    def wait(run: RunSpec, reason: str) -> None:
        logger.info("%s waits for %s", run.name, reason)
        tracker.waiting(reason)

    def skip(run: RunSpec) -> None:
        tracker.elsewhere(run)
        experiments.skipped(run.experiment)

    cpus = resources.cpu_sets()
    scheduler = Scheduler(resources.cap, cpus, memory, resources.retries, resources.retry_delay)
    try:
        with ThreadPoolTaskRunner(max_workers=max(1, len(experiments.left))) as runner:
            tasks = [runner.submit(experiment_runs, parameters={
                        "experiment": name, "runs": count, "batch": flow_run_id})
                     for name, count in experiments.left.items()]
            try:
                with _runs_end_with_the_flow(live, scheduler):
                    scheduler.run(
                        todo, execute=execute, on_start=tracker.started, on_done=done,
                        on_error=lambda run, exc: _crashed_record(run, scratch, exc),
                        failed=lambda record: not record.ok, on_retry=retry, on_wait=wait,
                        claim=claims.claim if claims else None, on_skip=skip,
                    )
            finally:
                experiments.release()
            for future in tasks:
                future.wait()
    finally:
        cpus.close()
        _BATCHES.pop(flow_run_id, None)
    failed = sorted((r for group in experiments.failed.values() for r in group),
                    key=lambda r: r.index)
    return (sum(experiments.ended.values()) - len(failed), [_failed_run(r) for r in failed],
            retried)


@flow(name="sierra", log_prints=False, persist_result=False)
def sierra(
    input_root: str,
    scratch_root: str,
    max_parallel: int | None = None,
    resume: bool = True,
    run_timeout: float | None = None,
    workdir: str | None = None,
    spread: int | None = None,
    only_runs: list[int] | None = None,
    spread_group: str | None = None,
    cores_per_run: int = 1,
    memory_per_run: str | None = None,
    retries: int = 0,
    retry_delay: float = 0.0,
):
    """Run every experimental run in ``<input_root>/commands.txt`` under a cap.

    ``spread`` > 1 fans the batch out to that many child flow runs on the pool's workers
    (flows/spread.py); ``only_runs`` and ``spread_group`` are how the parent tells a child
    its share.
    """
    logger = get_run_logger()
    _require_server_version()
    inp, scratch = check_roots(input_root, scratch_root)
    named = {"input_root": input_root, "scratch_root": scratch_root}
    if workdir:
        named["workdir"] = workdir
    check_allowed(named, os.environ.get(ALLOWED_ROOTS_ENV))
    runs = plan_runs(inp, read_commands(inp))
    resources = RunResources.on_this_host(max_parallel, cores_per_run, memory_per_run, retries,
                                          retry_delay, run_timeout, logger)
    if spread is not None and spread < 1:
        raise ValueError(f"spread must be at least 1, not {spread}")
    prepare_scratch(scratch)
    if only_runs is not None:
        share = set(only_runs)
        runs = [r for r in runs if r.index in share]

    todo: list[RunSpec] = [r for r in runs if not (resume and is_done(scratch, r))]
    skipped = len(runs) - len(todo)
    summary = BatchSummary(
        input_root=str(inp), scratch_root=str(scratch), total=len(runs), succeeded=0,
        failed=0, skipped=skipped, max_parallel=resources.cap,
        cores_per_run=resources.cores_per_run, memory_per_run=resources.memory,
        retries=resources.retries, pinned=resources.pinned,
    )
    worker = worker_name()
    if spread and spread > 1 and only_runs is None:
        deployment = _deployment_name()
        if not deployment:
            raise ValueError("spread needs a deployment: trigger it with `sierra-prefect run --spread N`")
        logger.info("%d runs (%d already done) spread over this flow run and %d child flow "
                    "runs", len(runs), skipped, spread)
        _end_stragglers(scratch, todo, logger)
        fan = FanOut(
            deployment=deployment,
            parameters={"input_root": input_root, "scratch_root": scratch_root,
                        "max_parallel": max_parallel, "resume": resume,
                        "run_timeout": run_timeout, "workdir": workdir,
                        "cores_per_run": cores_per_run, "memory_per_run": memory_per_run,
                        "retries": retries, "retry_delay": retry_delay,
                        "spread_group": str(get_run_context().flow_run.id)},
            job_variables=get_run_context().flow_run.job_variables or None,
            scratch=scratch, logger=logger, tags=list(get_run_context().flow_run.tags or []),
            batch=None if resume else str(get_run_context().flow_run.id),
        )
        flow_run_id = get_run_context().flow_run.id
        # The children are scheduled and watched from a thread; meanwhile this flow run
        # takes runs from the same queue on its own host, at once: spreading never waits
        # for a worker's poll to start, and any host that joins only adds to it.
        watcher = threading.Thread(target=contextvars.copy_context().run,
                                   args=(fan.run_catching, todo, spread), name="fan-out")
        watcher.start()
        try:
            with _shared(scratch, str(flow_run_id), str(flow_run_id), resume) as claims, \
                    Tracker(flow_run_id, todo, total=len(runs), skipped=skipped) as tracker:
                _, own_failed, retried = _run_here(todo, scratch, workdir or str(inp), resources,
                                                   tracker, logger, claims, str(flow_run_id))
            fan.ended_here(own_failed)
        except BaseException:
            fan.stop()
            raise
        finally:
            watcher.join()
        fan.raise_error()
        succeeded, workers = fan.succeeded, fan.workers
        failed_runs = sorted([*own_failed, *fan.failed_runs], key=lambda r: r.run_id)
    else:
        with worker_slot(scratch, spread_group, worker) if spread_group else nullcontext(True) as slot:
            if not slot:
                logger.info("a sibling of this batch already runs on %s: declining", worker)
                _publish(declined_summary(summary, worker))
                return summary.model_dump(mode="json")
            logger.info("%d runs (%d already done), at most %d at once on %s, %d CPU(s) each "
                        "(%s of CPUs %s)%s%s", len(runs), skipped, resources.cap, worker,
                        min(resources.cores_per_run, len(resources.cpus)),
                        "pinned" if TASKSET else "NOT pinned: no taskset on this host;",
                        cpu_list(resources.cpus),
                        f", {format_size(resources.memory)} memory each, enforced by "
                        f"{MEMORY_WATCHDOG}" if resources.memory else "",
                        f", up to {resources.retries} retries" if resources.retries else "")
            _end_stragglers(scratch, todo, logger)
            flow_run_id = get_run_context().flow_run.id
            with (_shared(scratch, str(flow_run_id), spread_group, resume) if spread_group
                  else nullcontext()) as claims, \
                    Tracker(flow_run_id, todo, total=len(runs), skipped=skipped) as tracker:
                succeeded, failed_runs, retried = _run_here(todo, scratch, workdir or str(inp),
                                                            resources, tracker, logger, claims,
                                                            spread_group)
                skipped += tracker.ran_elsewhere
        workers = {worker: succeeded + len(failed_runs)}

    summary = summary.model_copy(update={
        "succeeded": succeeded, "skipped": skipped, "failed": len(failed_runs), "failed_runs": failed_runs,
        "workers": workers, "retried": retried,
    })
    _publish(summary)
    logger.info(summary.headline())
    if not summary.ok:
        return Failed(message=summary.headline(), data=summary.model_dump(mode="json"))
    return summary.model_dump(mode="json")


@contextmanager
def _shared(scratch: Path, flow_run_id: str, batch: str, resume: bool) -> Iterator[Claims]:
    """A spread batch's flow run's side of the shared queue: its lease, renewed while it
    runs, and the claims through which it takes runs (flows/spread.py). Without resume,
    only markers of this batch (``batch``: the parent's id) count as done."""
    with get_client(sync_client=True) as client, Lease(scratch, flow_run_id):
        yield Claims(scratch, flow_run_id, Liveness(scratch, client, lost_after()),
                     None if resume else batch)


def _deployment_name() -> str | None:
    from prefect.runtime import deployment, flow_run

    name = deployment.name
    return f"{flow_run.flow_name}/{name}" if name else None


"""Triggering a deployment by name and following its flow run to the end.

``trigger`` validates the inputs as the flow will (same code: ``flows.plan``), checks the
server, the deployment and its pool, starts a flow run with Prefect's ``run_deployment``
(tagged with the batch, ``flows.plan.batch_tag``) and ``follow`` shows progress (the
flow's progress artifacts, read with the public API) until the run is final, then reads
the summary artifact the flow wrote. Ctrl-C cancels the flow run.

A busy server (HTTP 429/502/503/504, no answer in time, refused connections) never ends
in a traceback: every call waits for it with a visible reason ("server busy (HTTP 503)
..., retrying for up to N s") until ``busy_deadline`` (setting
``SIERRA_PREFECT_BUSY_DEADLINE``), then fails with one line. Prefect's own silent retries
are off inside ``trigger`` (they hid a 115 s wait behind one call), and the flow run is
created with an idempotency key, so a retried create never starts the batch twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows import resources

# Prefect itself (and the flow module, which imports it) is imported only once the
# inputs are known to be good: bad input fails fast.
from flows.plan import (
    BatchInputError,
    batch_tag,
    check_roots,
    is_done,
    iter_runs,
    prepare_scratch,
    read_commands,
)
from flows.summary import BatchSummary, parse_progress, read_summary
from sierra_prefect.connection import Connection
from sierra_prefect.errors import ShimError
from sierra_prefect.versions import check_versions
from sierra_prefect.worker import wake_workers

# Pool types whose flow runs run in containers: ours, and Prefect's own.
DOCKER_POOL_TYPES = frozenset({"sierra-docker", "docker"})

POLL_SECONDS = 0.25  # how soon the end is seen; two light API reads per poll
FINISHING_POLL_SECONDS, FINISHING_POLLS = 0.05, 40  # once every run has ended: 2 s at most
CANCEL_DEADLINE_SECONDS = 60.0
CRASHED_GRACE_SECONDS = 15.0
# How long `run` keeps following while the server does not answer (e.g. a restart).
OUTAGE_DEADLINE_SECONDS = 300.0
# How long `run` waits for a busy server before the flow run exists (default of the
# setting SIERRA_PREFECT_BUSY_DEADLINE).
BUSY_DEADLINE_SECONDS = 120.0
# Answers that mean "busy, ask again": too many requests, bad gateway, unavailable, timeout.
BUSY_STATUS = frozenset({429, 502, 503, 504})
# One request gets at most this long (and a third of the deadline) before it counts as
# "no answer in time"; after SLOW_NOTICE_SECONDS without an answer the user is told.
REQUEST_TIMEOUT_SECONDS = 30.0
SLOW_NOTICE_SECONDS = 5.0


@dataclass
class Trigger:
    """One request to run a batch (or one experiment) through a deployment."""

    deployment: str
    input_root: str
    scratch_root: str
    max_parallel: int | None = None
    run_timeout: float | None = None
    cores_per_run: int | None = None
    memory_per_run: str | None = None
    retries: int | None = None
    retry_delay: float | None = None
    resume: bool = True
    workdir: str | None = None
    spread: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    job_variables: dict[str, Any] = field(default_factory=dict)
    work_pool: str | None = None
    work_queue: str | None = None
    # Docker deployments only: image for this run, run as the caller's uid:gid, extra mounts.
    image: str | None = None
    host_user: bool = False
    mounts: list[str] = field(default_factory=list)
    busy_deadline: float = BUSY_DEADLINE_SECONDS
    # The state file of the stack whose own workers to wake once the flow run exists.
    stack_state: Path | None = None

    @property
    def tags(self) -> list[str]:
        return [batch_tag(self.input_root)]

    @property
    def wants_docker(self) -> bool:
        return bool(self.image or self.host_user or self.mounts)

    def parameters(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "input_root": self.input_root,
            "scratch_root": self.scratch_root,
            "resume": self.resume,
        }
        if self.max_parallel is not None:
            values["max_parallel"] = self.max_parallel
        if self.run_timeout is not None:
            values["run_timeout"] = self.run_timeout
        for name in ("cores_per_run", "memory_per_run", "retries", "retry_delay"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        if self.workdir is not None:
            values["workdir"] = self.workdir
        if self.spread is not None:
            values["spread"] = self.spread
        return {**values, **self.params}


@dataclass
class Outcome:
    flow_run_id: UUID
    state: str
    message: str | None
    summary: BatchSummary | None
    ui_url: str

    @property
    def exit_code(self) -> int:
        if self.state == "CANCELLED":
            return 130
        if self.state == "COMPLETED" and self.summary is not None and self.summary.ok:
            return 0
        return 1


def parse_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; VALUE is JSON when it parses (numbers, true, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ShimError(f"--param '{text}' is not KEY=VALUE: write it like --param run_timeout=60")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def plan_locally(trigger: Trigger) -> tuple[int, int]:
    """Validate the roots and commands.txt; return (runs, runs already done)."""
    try:
        inp, scratch = check_roots(trigger.input_root, trigger.scratch_root)
        commands = read_commands(inp)
        # The flow creates it too; creating it here means a Docker bind mount of it is ours.
        prepare_scratch(scratch)
    except BatchInputError as exc:
        raise ShimError(str(exc)) from exc
    if trigger.max_parallel is not None and trigger.max_parallel < 1:
        raise ShimError(f"--max-parallel {trigger.max_parallel} is below 1: pass 1 or more")
    if trigger.spread is not None and trigger.spread < 1:
        raise ShimError(f"--spread {trigger.spread} is below 1: pass the number of child flow runs")
    if trigger.run_timeout is not None and trigger.run_timeout <= 0:
        raise ShimError(f"--run-timeout {trigger.run_timeout} is not positive: pass seconds > 0")
    check_resources(trigger.cores_per_run, trigger.memory_per_run, trigger.retries,
                    trigger.retry_delay)
    # Counted one run at a time: a batch of 20,000 is never held here as runs.
    done = sum(is_done(scratch, r) for r in iter_runs(inp, commands)) if trigger.resume else 0
    return len(commands), done


def check_resources(cores_per_run: int | None = None, memory_per_run: str | None = None,
                    retries: int | None = None, retry_delay: float | None = None) -> None:
    """One-line errors for per-run resources the flow would refuse (the flow's own check,
    flows/resources.py, with the options spelled as the CLI's)."""
    try:
        resources.check_resources(cores_per_run, memory_per_run, retries, retry_delay,
                                  spell=lambda name: "--" + name.replace("_", "-"))
    except ValueError as exc:
        raise ShimError(str(exc)) from None


def check_deployment(client, connection: Connection, name: str, work_pool: str | None = None,
                     image: str | None = None, console: Console | None = None):
    """The deployment and its pool exist (and match ``work_pool`` if given), and the
    Prefect versions of this client, the server and (Docker pools) the image may work
    together (sierra_prefect/versions.py); ``image`` overrides the deployment's. Returns
    the deployment and its pool."""
    from prefect import __version__ as client_version
    from prefect.exceptions import ObjectNotFound

    api_url = connection.api_url
    # Raises one clear line if our credentials are refused; no answer: is it up at all?
    server_version = connection.server_version()
    if server_version is None:
        connection.require_healthy()
    check_versions(client_version, server_version, api_url=api_url)
    if "/" not in name:
        raise ShimError(f"deployment '{name}' is not FLOW/NAME: use e.g. sierra/local")
    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ShimError(
            f"deployment '{name}' does not exist on {api_url}: run `sierra-prefect up` "
            "(or `prefect deploy --all` in the sierra-prefect checkout)"
        ) from None
    try:
        pool = client.read_work_pool(deployment.work_pool_name)
    except ObjectNotFound:
        raise ShimError(
            f"work pool '{deployment.work_pool_name}' of {name} does not exist: run "
            "`sierra-prefect pools apply`"
        ) from None
    if work_pool and work_pool != deployment.work_pool_name:
        raise ShimError(
            f"{name} runs on pool '{deployment.work_pool_name}', not '{work_pool}': drop "
            "--work-pool or deploy it to that pool"
        )
    if pool.type in DOCKER_POOL_TYPES:
        _check_image(name, deployment, pool, image, client_version, server_version, api_url,
                     console or Console(stderr=True, soft_wrap=True))
    return deployment, pool


def _image_of(deployment, pool, image: str | None) -> str | None:
    """The image a Docker flow run of ``deployment`` uses: ``image``, else the deployment's,
    else the pool's default."""
    return (
        image
        or (deployment.job_variables or {}).get("image")
        or pool.base_job_template["variables"]["properties"].get("image", {}).get("default")
    )


def _check_image(name: str, deployment, pool, image: str | None, client_version: str,
                 server_version: str | None, api_url: str, console: Console) -> None:
    from sierra_prefect import docker

    image = _image_of(deployment, pool, image)
    if not image:
        raise ShimError(f"{name} names no image: pass --image IMAGE")
    try:
        in_image = docker.image_prefect_version(image)
    except docker.DockerUnavailable as exc:
        # A client without Docker (e.g. a laptop triggering a lab server): the flow
        # checks its own Prefect against the server's before any run starts.
        console.print(f"[yellow]not checking image {image} here: {exc}[/yellow]")
        return
    check_versions(client_version, server_version, api_url=api_url, image=image,
                   image_version=in_image)


def _check_params(deployment, params: dict[str, Any]) -> None:
    known = set((deployment.parameter_openapi_schema or {}).get("properties", {}))
    unknown = sorted(set(params) - known) if known else []
    if unknown:
        raise ShimError(
            f"{deployment.name} has no parameter {', '.join(unknown)}: "
            f"known parameters are {', '.join(sorted(known))}"
        )


def busy_reason(exc: BaseException) -> str | None:
    """Why a call failed if the server is busy or unreachable (worth waiting for), else None."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(exc, PrefectHTTPStatusError | httpx.HTTPStatusError):
        code = exc.response.status_code
        return f"HTTP {code}" if code in BUSY_STATUS else None
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx.TransportError):
        return f"cannot connect: {exc.__class__.__name__}"
    return None


@dataclass
class Patience:
    """Calls to a server that may be busy: wait with a visible reason, up to a deadline."""

    api_url: str
    deadline: float
    console: Console

    def call(self, what: str, fn, *args, **kwargs):
        started = time.monotonic()
        delay, told = 0.5, None
        while True:
            try:
                return self._once(what, started, fn, *args, **kwargs)
            except Exception as exc:
                reason = busy_reason(exc)
                if reason is None:
                    raise
                waited = time.monotonic() - started
                if waited >= self.deadline:
                    raise ShimError(
                        f"Prefect server at {self.api_url} stayed busy ({reason}) for "
                        f"{waited:.0f} s while {what}; nothing was started: try again later, or "
                        "wait longer with SIERRA_PREFECT_BUSY_DEADLINE=SECONDS"
                    ) from None
                if reason != told:
                    self.console.print(
                        f"[yellow]server busy ({reason}) while {what}: retrying for up to "
                        f"{self.deadline - waited:.0f} s[/yellow]", highlight=False)
                    told = reason
                time.sleep(min(delay, max(0.0, self.deadline - waited)))
                delay = min(delay * 2, 5.0)

    def _once(self, what: str, started: float, fn, *args, **kwargs):
        """One attempt; if the server is slow to answer, say so while waiting."""
        def slow() -> None:
            left = self.deadline - (time.monotonic() - started)
            self.console.print(f"[yellow]server slow (no answer for {SLOW_NOTICE_SECONDS:.0f} s) "
                               f"while {what}: waiting for up to {max(left, 0):.0f} s[/yellow]",
                               highlight=False)

        timer = threading.Timer(SLOW_NOTICE_SECONDS, slow)
        timer.daemon = True
        timer.start()
        try:
            return fn(*args, **kwargs)
        finally:
            timer.cancel()


@contextmanager
def _our_retries(connection: Connection, deadline: float):
    """Prefect's client pointed at the server, its own retries off (``Patience`` retries,
    visibly), and no request waiting longer than the deadline allows."""
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES

    timeout = min(PREFECT_API_REQUEST_TIMEOUT.value(), REQUEST_TIMEOUT_SECONDS,
                  max(deadline / 3, 1.0))
    with connection.prefect_settings({PREFECT_CLIENT_MAX_RETRIES: 0,
                                      PREFECT_API_REQUEST_TIMEOUT: timeout}):
        yield


def trigger(connection: Connection, request: Trigger, console: Console) -> Outcome:
    total, done = plan_locally(request)
    patience = Patience(connection.api_url, request.busy_deadline, console)
    with _our_retries(connection, request.busy_deadline):
        try:
            return _trigger(connection, request, console, patience, total, done)
        except ShimError:
            raise
        except Exception as exc:
            reason = busy_reason(exc) or _status_of(exc)
            if reason is None:
                raise
            raise ShimError(f"Prefect server at {connection.api_url} failed the request "
                            f"({reason}): see its log; the batch's ledger is under "
                            f"{request.scratch_root}") from None


def _status_of(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code else None


def _trigger(connection: Connection, request: Trigger, console: Console, patience: Patience,
             total: int, done: int) -> Outcome:
    with connection.client() as client:
        deployment, pool = patience.call(
            f"checking {request.deployment}", check_deployment, client, connection,
            request.deployment, request.work_pool, image=request.image, console=console)
        _check_params(deployment, request.parameters())
        _docker_job_variables(pool, request)
        # One key for every attempt: a create the server did but could not confirm
        # (timeout, 503) is found again, not repeated.
        key = str(uuid.uuid4())
        flow_run = patience.call(
            "creating the flow run", client.create_flow_run_from_deployment, deployment.id,
            parameters=request.parameters(), job_variables=request.job_variables or None,
            work_queue_name=request.work_queue, tags=request.tags, idempotency_key=key)
        if request.stack_state is not None:  # now, not at the worker's next poll
            wake_workers(request.stack_state, deployment.work_pool_name, connection.api_url)
        # After the create, not before it: the flow run is on its way either way.
        if not patience.call("reading the workers", _pool_has_workers, client,
                             deployment.work_pool_name):
            console.print(
                f"[yellow]no worker is polling pool '{deployment.work_pool_name}' yet: the run "
                f"waits until one starts (`prefect worker start --pool "
                f"{deployment.work_pool_name}` or `sierra-prefect up`)[/yellow]"
            )
        ui_url = f"{connection.ui_url}/runs/flow-run/{flow_run.id}"
        console.print(f"flow run {flow_run.name} ({flow_run.id}) of {request.deployment}: {ui_url}")
        console.print(f"batch tag {request.tags[0]} (filter the UI's flow runs by it)",
                      highlight=False)
        return follow(client, flow_run.id, total, done, console, ui_url, patience)


def _docker_job_variables(pool, request: Trigger) -> None:
    """For a Docker deployment: mount the roots, apply image/user/mounts."""
    from sierra_prefect import docker

    if pool.type not in DOCKER_POOL_TYPES:
        if request.wants_docker:
            raise ShimError(
                f"--image/--host-user/--mount are for Docker deployments; {request.deployment} "
                f"runs on '{pool.name}' ({pool.type}): drop them or use sierra/dockerremote"
            )
        return
    request.job_variables = {
        **request.job_variables,
        **docker.job_variables(request.input_root, request.scratch_root, request.image,
                               request.host_user, request.mounts),
    }


def _pool_has_workers(client, pool: str) -> bool:
    return any(
        str(w.status).upper().endswith("ONLINE") for w in client.read_workers_for_work_pool(pool)
    )


def progress_counts(client, flow_run_id: UUID) -> tuple[int, int]:
    """Runs finished so far (succeeded, failed), from the progress artifacts of the flow run
    and, with --spread, of its child flow runs: one read of Prefect's public API."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
        flow_run_filter=FlowRunFilter(
            operator="or_", id=FlowRunFilterId(any_=[flow_run_id]),
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])),
    )
    ok = bad = 0
    for artifact in artifacts:
        counts = parse_progress(artifact.description)
        if counts:
            ok, bad = ok + counts[1], bad + counts[2]
    return ok, bad


def follow(client, flow_run_id: UUID, total: int, done: int, console: Console, ui_url: str,
           patience: Patience) -> Outcome:
    """Wait for the flow run to end, showing progress; Ctrl-C cancels it.

    The last progress shown comes from the flow's summary, not from the polls: the flow
    writes its progress artifact in batches (about once a second).
    """
    with _ProgressView(console, total, done) as view, EndWatch(flow_run_id) as end:
        try:
            state = _poll(client, flow_run_id, view.show, console, remaining=total - done,
                          ended=end.ended)
        except KeyboardInterrupt:
            console.print(f"[yellow]cancelling flow run {flow_run_id}...[/yellow]")
            state = patience.call("cancelling the flow run", cancel, client, flow_run_id)
        summary = patience.call("reading the summary", read_summary, client, flow_run_id)
        if summary is not None:
            view.finish(summary)
    return Outcome(flow_run_id, state.type.value, state.message, summary, ui_url)


class _ProgressView:
    """Runs done so far: a bar on a terminal, else a line each time the counts change."""

    def __init__(self, console: Console, total: int, skipped: int) -> None:
        self.console, self.total, self.skipped = console, total, skipped
        self._last: tuple[int, int, int, int] | None = None
        self._progress: Progress | None = None
        if console.is_terminal:
            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn()]
            self._progress = Progress(*columns, console=console, transient=False)
            self._bar = self._progress.add_task("runs", total=total, completed=skipped, failed=0)

    def __enter__(self) -> _ProgressView:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress:
            self._progress.stop()

    def show(self, ok: int, bad: int) -> None:
        """Counts of runs finished in this flow run (on top of the skipped ones)."""
        self._draw(self.total, self.skipped, ok, bad)

    def finish(self, summary: BatchSummary) -> None:
        """The final counts: what the flow run reports it finished."""
        self._draw(summary.total, summary.skipped, summary.succeeded, summary.failed)

    def _draw(self, total: int, skipped: int, ok: int, bad: int) -> None:
        if (total, skipped, ok, bad) == self._last:
            return
        self._last = (total, skipped, ok, bad)
        if self._progress:
            self._progress.update(self._bar, total=total, completed=skipped + ok + bad, failed=bad)
            return
        self.console.print(f"progress: {skipped + ok + bad}/{total} runs done "
                           f"({bad} failed, {skipped} skipped)")


class EndWatch:
    """Wakes the follow loop the moment Prefect says the flow run ended.

    Polls see the end up to ``POLL_SECONDS`` late, and a SIERRA stage 2 waits for it once
    per batch (per experiment in the per-experiment paradigm). This thread listens on
    Prefect's events websocket for the flow run's final-state event and sets ``ended``; the
    polls stay the truth (``_poll`` reads the state itself), so if the websocket fails or
    is refused nothing changes but the wait."""

    FINAL = ("Completed", "Failed", "Crashed", "Cancelled")

    def __init__(self, flow_run_id: UUID) -> None:
        self.flow_run_id = flow_run_id
        self.ended = threading.Event()
        self._lock = threading.Lock()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=contextvars.copy_context().run,
                                        args=(self._run,), name="end-watch", daemon=True)

    def __enter__(self) -> EndWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:  # before or after the thread's loop exists: it stops either way
            self._closing = True
            loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # its loop has already ended
                pass
        self._thread.join(timeout=1)  # a daemon thread: never holds the CLI's exit

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:  # never the batch's concern: the polls go on
            pass

    async def _main(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        await self._watch()

    async def _watch(self) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

        names = [f"prefect.flow-run.{state}" for state in self.FINAL]
        wanted = EventFilter(event=EventNameFilter(name=names),
                             resource=EventResourceFilter(id=[f"prefect.flow-run.{self.flow_run_id}"]))
        async with get_events_subscriber(filter=wanted, reconnection_attempts=2) as events:
            async for _ in events:
                self.ended.set()
                return


def _poll(client, flow_run_id: UUID, show, console: Console, remaining: int | None = None,
          ended: threading.Event | None = None) -> Any:
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    ended = ended or threading.Event()

    down_since: float | None = None
    fast_polls = 0
    while True:
        try:
            flow_run = client.read_flow_run(flow_run_id)
            ok, bad = progress_counts(client, flow_run_id)
        except (httpx.HTTPError, PrefectHTTPStatusError) as exc:
            # The batch goes on without the server; keep following until it is back.
            reason = busy_reason(exc) or _status_of(exc) or exc.__class__.__name__
            if down_since is None:
                down_since = time.monotonic()
                console.print(f"[yellow]server busy ({reason}): the batch goes on; following "
                              f"again when it answers, for up to {OUTAGE_DEADLINE_SECONDS:.0f} s"
                              "[/yellow]", highlight=False)
            if time.monotonic() - down_since > OUTAGE_DEADLINE_SECONDS:
                raise ShimError(
                    f"lost the Prefect server for {OUTAGE_DEADLINE_SECONDS:.0f} s ({reason}): "
                    f"the batch may still be running; re-run the same command to resume it"
                ) from None
            time.sleep(1.0)
            continue
        down_since = None
        show(ok, bad)
        if flow_run.state and flow_run.state.is_final():
            return flow_run.state
        # Every run has ended: only the flow's last writes remain, so look more often for
        # a moment (SIERRA waits for this), then as usual (a busy server is not pressed).
        all_ended = remaining is not None and ok + bad >= remaining
        if (ended.is_set() or all_ended) and fast_polls < FINISHING_POLLS:
            fast_polls += 1
            time.sleep(FINISHING_POLL_SECONDS)
        elif ended.is_set():
            time.sleep(POLL_SECONDS)
        else:
            ended.wait(POLL_SECONDS)  # a poll interval, cut short when Prefect says it ended


def cancel(client, flow_run_id: UUID):
    """Ask Prefect to cancel the flow run (the worker stops it) and wait until it has."""
    from prefect.states import Cancelling

    client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
    deadline = time.monotonic() + CANCEL_DEADLINE_SECONDS
    crashed_at = None
    while time.monotonic() < deadline:
        state = client.read_flow_run(flow_run_id).state
        # The engine, signalled, reports Crashed first; the worker then records Cancelled
        # (~2 s later). Completed or Failed mean the flow run ended before the cancel.
        if state and state.is_final() and not state.is_crashed():
            return state
        if state and state.is_crashed():
            crashed_at = crashed_at or time.monotonic()
            if time.monotonic() - crashed_at > CRASHED_GRACE_SECONDS:
                return state  # no worker left to record the cancel
        time.sleep(POLL_SECONDS)
    return client.read_flow_run(flow_run_id).state

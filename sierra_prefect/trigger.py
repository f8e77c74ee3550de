"""Triggering a deployment by name and following its flow run to the end.

``trigger`` validates the inputs as the flow will (same code: ``flows.plan``), checks the
server, the deployment and its pool, starts a flow run with Prefect's ``run_deployment``
and ``follow`` shows progress (task-run counts by state, from the API) until the run is
final, then reads the summary artifact the flow wrote. Ctrl-C cancels the flow run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Prefect itself (and the flow module, which imports it) is imported only once the
# inputs are known to be good: bad input fails fast.
from flows.plan import BatchInputError, check_roots, is_done, plan_runs, prepare_scratch, read_commands
from flows.summary import BatchSummary, read_summary
from sierra_prefect.connection import Connection
from sierra_prefect.errors import ShimError
from sierra_prefect.versions import check_versions

POLL_SECONDS = 0.25  # how soon the end is seen; two light API reads per poll
CANCEL_DEADLINE_SECONDS = 60.0
CRASHED_GRACE_SECONDS = 15.0
# How long `run` keeps following while the server does not answer (e.g. a restart).
OUTAGE_DEADLINE_SECONDS = 300.0


@dataclass
class Trigger:
    """One request to run a batch (or one experiment) through a deployment."""

    deployment: str
    input_root: str
    scratch_root: str
    max_parallel: int | None = None
    run_timeout: float | None = None
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
        runs = plan_runs(inp, read_commands(inp))
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
    done = sum(is_done(scratch, r) for r in runs) if trigger.resume else 0
    return len(runs), done


def check_deployment(client, connection: Connection, name: str, work_pool: str | None = None,
                     image: str | None = None, console: Console | None = None):
    """The deployment and its pool exist (and match ``work_pool`` if given), and the
    Prefect versions of this client, the server and (Docker pools) the image may work
    together (sierra_prefect/versions.py); ``image`` overrides the deployment's."""
    from prefect import __version__ as client_version
    from prefect.exceptions import ObjectNotFound

    api_url = connection.api_url
    connection.require_healthy()
    # Raises one clear line if our credentials are refused.
    server_version = connection.server_version()
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
    if pool.type == "docker":
        _check_image(name, deployment, pool, image, client_version, server_version, api_url,
                     console or Console(stderr=True, soft_wrap=True))
    return deployment


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


def trigger(connection: Connection, request: Trigger, console: Console) -> Outcome:
    total, done = plan_locally(request)
    from prefect.deployments import run_deployment

    with connection.client() as client:
        deployment = check_deployment(client, connection, request.deployment, request.work_pool,
                                      image=request.image, console=console)
        _check_params(deployment, request.parameters())
        _docker_job_variables(client, deployment, request)
        if not _pool_has_workers(client, deployment.work_pool_name):
            console.print(
                f"[yellow]no worker is polling pool '{deployment.work_pool_name}' yet: the run "
                f"waits until one starts (`prefect worker start --pool "
                f"{deployment.work_pool_name}` or `sierra-prefect up`)[/yellow]"
            )
        with connection.prefect_settings():
            flow_run = run_deployment(
                request.deployment,
                parameters=request.parameters(),
                job_variables=request.job_variables or None,
                work_queue_name=request.work_queue,
                timeout=0,
                as_subflow=False,
            )
        ui_url = f"{connection.ui_url}/runs/flow-run/{flow_run.id}"
        console.print(f"flow run {flow_run.name} ({flow_run.id}) of {request.deployment}: {ui_url}")
        return follow(client, flow_run.id, total, done, console, ui_url)


def _docker_job_variables(client, deployment, request: Trigger) -> None:
    """For a Docker deployment: mount the roots, apply image/user/mounts."""
    from sierra_prefect import docker

    pool = client.read_work_pool(deployment.work_pool_name)
    if pool.type != "docker":
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


def task_counts(client, flow_run_id: UUID) -> dict[str, int]:
    """Task runs of a flow run (and its children) by state type, in one request."""
    response = client.request(
        "POST",
        "/ui/task_runs/count",
        # The flow run and, with --spread, its child flow runs.
        json={"flow_runs": {"operator": "or_", "id": {"any_": [str(flow_run_id)]},
                            "parent_flow_run_id": {"any_": [str(flow_run_id)]}},
              # Not the parent's stand-in task runs for its child flow runs.
              "task_runs": {"subflow_runs": {"exists_": False}}},
    )
    response.raise_for_status()
    return {k.upper(): v for k, v in response.json().items()}


def follow(client, flow_run_id: UUID, total: int, done: int, console: Console, ui_url: str) -> Outcome:
    """Wait for the flow run to end, showing progress; Ctrl-C cancels it.

    The last progress shown comes from the flow's summary, not from the polls: the server
    records task-run states asynchronously (events), so the poll that sees the flow run
    final may still count some finished runs as running.
    """
    with _ProgressView(console, total, done) as view:
        try:
            state = _poll(client, flow_run_id, view.show)
        except KeyboardInterrupt:
            console.print(f"[yellow]cancelling flow run {flow_run_id}...[/yellow]")
            state = cancel(client, flow_run_id)
        summary = read_summary(client, flow_run_id)
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


def _poll(client, flow_run_id: UUID, show) -> Any:
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    down_since: float | None = None
    while True:
        try:
            flow_run = client.read_flow_run(flow_run_id)
            counts = task_counts(client, flow_run_id)
        except (httpx.HTTPError, PrefectHTTPStatusError) as exc:
            # The batch goes on without the server; keep following until it is back.
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > OUTAGE_DEADLINE_SECONDS:
                raise ShimError(
                    f"lost the Prefect server for {OUTAGE_DEADLINE_SECONDS:.0f} s "
                    f"({exc.__class__.__name__}): "
                    f"the batch may still be running; re-run the same command to resume it"
                ) from None
            time.sleep(1.0)
            continue
        down_since = None
        show(counts.get("COMPLETED", 0), counts.get("FAILED", 0) + counts.get("CRASHED", 0))
        if flow_run.state and flow_run.state.is_final():
            return flow_run.state
        time.sleep(POLL_SECONDS)


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

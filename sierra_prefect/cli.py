"""The ``sierra-prefect`` command: bring the stack up, trigger SIERRA batches, bring it down.

Typical use::

    sierra-prefect up                      # server + pools + deployments + worker
    eval "$(sierra-prefect env)"           # point `prefect ...` at the same server
    sierra-prefect auth-string             # the stack's credential, for the UI's login
    sierra-prefect run sierra/local --input-root /abs/batch --scratch-root /abs/scratch
    sierra-prefect down

Every error is one line naming the thing and the fix, with a non-zero exit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

try:  # typer 0.26+ carries its own copy of click; older ones use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from sierra_prefect.errors import ShimError
from sierra_prefect.settings import SLURM_DEPLOYMENT, Settings

PROG = "sierra-prefect"

# --home, which every command that works on one stack takes.
HomeOption = Annotated[
    Path | None, typer.Option(metavar="DIR", help="State directory (SIERRA_PREFECT_HOME).")]

app = typer.Typer(
    help="Run SIERRA stage 2 on Prefect 3: bring the stack up, trigger deployments by name.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help, as other Unix commands print it: no boxes padded to the terminal's
    # width (SIERRA logs it), no type column (a flag takes no <bool>).
    rich_markup_mode=None,
)
pools_app = typer.Typer(help="Work pools from workpools/.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(pools_app, name="pools")
image_app = typer.Typer(help="The worker image (Dockerfile).", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(image_app, name="image")
slurm_app = typer.Typer(help="Batches inside a SLURM allocation (sierra/slurm).", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(slurm_app, name="slurm")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _settings(**overrides) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**values)
    except Exception as exc:  # pydantic's ValidationError, in one line
        first = str(exc).splitlines()
        raise ShimError(f"invalid setting: {' '.join(first[:3])}") from exc


def _stack(settings: Settings, quiet: bool = False):
    from sierra_prefect.stack import Stack

    return Stack(settings, say=(lambda _: None) if quiet else err.print)


def _port(value: str | None):
    if value is None or value == "auto":
        return value
    if value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    raise ShimError(f"--port '{value}' is not a port: pass a number 1-65535 or 'auto'")


@app.command(short_help="Start or reuse the stack: server, pools, deployments, worker.")
def up(
    port: str | None = typer.Option(
        None, metavar="PORT|auto",
        help="Server port, or 'auto' (default: 4200 if free, else any free port)."),
    docker: bool = typer.Option(False, "--docker", help="Also start a Docker worker on sierra-docker-pool."),
    no_worker: bool = typer.Option(
        False, "--no-worker",
        help="Start no worker here (a server host: workers run on other hosts)."),
    host: str | None = typer.Option(
        None, metavar="ADDRESS",
        help="Bind address (default 127.0.0.1), e.g. this host's address for workers on other "
        "hosts; they send the stack's credential (`sierra-prefect auth-string`)."),
    database: str | None = typer.Option(
        None, metavar="URL",
        help="Server database URL without a password, e.g. postgresql+asyncpg://u@127.0.0.1:5432/prefect "
        "(default SQLite); one with a password goes in SIERRA_PREFECT_DATABASE_URL."),
    home: HomeOption = None,
) -> None:
    """Start (or reuse) the embedded stack: server, pools, deployments, worker."""
    _require_no_password(database)
    settings = _settings(port=_port(port), home=home, host=host, database_url=database)
    stack = _stack(settings)
    if docker and no_worker:
        raise ShimError("--docker starts a Docker worker and --no-worker starts none: pass one of them")
    connection = stack.up(docker=docker, worker=not no_worker)
    out.print(f"ready: {connection.api_url}  (UI: {connection.ui_url})")
    credential = settings.credential()
    if credential and credential.file:
        out.print(f"UI login: the stack's auth string, printed by `{PROG} auth-string` "
                  f"(kept in {credential.file}, mode 0600)", highlight=False)
    elif credential and not settings.api_url:
        out.print(f"UI login: your {credential.describe()}", highlight=False)
    out.print('point Prefect at it: eval "$(sierra-prefect env)"')


def _require_no_password(database: str | None) -> None:
    """A command line is readable by every user of the machine (``ps``, /proc): a
    password has no place on one."""
    from sierra_prefect.redact import url_password

    if database and url_password(database):
        raise ShimError(
            "--database holds a password, which any user of this machine can read from the "
            "process list: put the URL in SIERRA_PREFECT_DATABASE_URL instead, e.g. "
            'export SIERRA_PREFECT_DATABASE_URL="$(cat FILE)" with FILE of mode 0600'
        )


@app.command(short_help="Stop exactly what `up` started.")
def down(home: HomeOption = None) -> None:
    """Stop exactly the processes `up` started (by pid), and wait until they exit."""
    lines = _stack(_settings(home=home)).down()
    for line in lines or ["nothing running for this stack"]:
        out.print(line)


@app.command(short_help="Server, versions, processes, pools, workers, deployments.")
def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    home: HomeOption = None,
) -> None:
    """Server URL and health, Prefect versions, pools, workers online, deployments."""
    report = _stack(_settings(home=home), quiet=True).status()
    if as_json:
        out.print_json(json.dumps(report))
        return
    out.print(f"api url:      {report['api_url'] or '(none: run sierra-prefect up)'}")
    out.print(f"healthy:      {report['healthy']}")
    out.print(f"prefect:      client {report['prefect_client_version']}, "
              f"server {report['prefect_server_version']}")
    out.print(f"processes:    {_processes(report['pids'])}", highlight=False)
    if report["ui_url"]:
        out.print(f"ui:           {report['ui_url']}", highlight=False)
    for name, pool in report["pools"].items():
        online = ", ".join(pool["workers_online"]) or "none online"
        out.print(f"pool:         {name} ({pool['type']}): {online}")
    out.print(f"deployments:  {', '.join(report['deployments']) or 'none'}")
    if report["credential"]:
        out.print(f"credential:   {report['credential']} (print it: {PROG} auth-string)",
                  highlight=False)
    out.print(f"home:         {report['home']}")
    if not report["healthy"]:
        raise typer.Exit(1)


def _processes(pids: dict) -> str:
    """``server 12, warm engine 34, workers 56 78``: what this home started and still runs."""
    parts = [f"server {pids['server']}" if pids.get("server") else "",
             f"warm engine {pids['warm_engine']}" if pids.get("warm_engine") else "",
             ("workers " + " ".join(map(str, pids["workers"]))) if pids.get("workers") else ""]
    return ", ".join(p for p in parts if p) or "none running from this home"


@app.command(short_help="`export PREFECT_API_URL=...` and the credential, for eval.")
def env(home: HomeOption = None) -> None:
    """Print `export PREFECT_API_URL=...` and `export PREFECT_API_AUTH_STRING=...` for this
    stack (use with eval). The credential is read from its file when the shell evaluates
    the lines, so they never show it."""
    settings = _settings(home=home)
    connection = _stack(settings, quiet=True).connection()
    out.print(f"export PREFECT_API_URL={connection.api_url}", highlight=False)
    out.print("export PREFECT_SERVER_ANALYTICS_ENABLED=false", highlight=False)
    credential = settings.credential()
    if credential:
        out.print(credential.shell_export(), highlight=False, markup=False)


@app.command("auth-string", short_help="Print the stack's credential (the UI's login asks for it).")
def auth_string(home: HomeOption = None) -> None:
    """Print the auth string this stack's server requires: what the Prefect UI's login
    asks for. `up` makes it once, at random, and keeps it in the home (mode 0600);
    SIERRA_PREFECT_AUTH_STRING, when set, wins."""
    settings = _settings(home=home)
    credential = settings.credential()
    if credential is None:
        where = ("PREFECT_API_URL's server: set PREFECT_API_AUTH_STRING to the one its owner gave you"
                 if settings.api_url else f"{settings.home}: run `{PROG} up`")
        raise ShimError(f"no credential for {where}")
    print(credential.value)


@app.command(short_help="Start this host's worker for a server on another host.")
def worker(
    api_url: str = typer.Option(
        ..., "--api-url", metavar="URL", envvar="PREFECT_API_URL",
        help="The server's API, e.g. http://10.0.0.1:4200/api (default: $PREFECT_API_URL)."),
    auth_string_file: Path = typer.Option(
        ..., "--auth-string-file", metavar="FILE",
        help="A file (mode 0600) holding the server's credential: `sierra-prefect auth-string` "
        "on the server host prints it."),
    pool: str = typer.Option("sierra-pool", "--pool", help="The work pool."),
    name: str | None = typer.Option(None, "--name", help="The worker's name (default: this host's name)."),
    query_seconds: float = typer.Option(
        2.0, "--query-seconds", min=0.1,
        help="How often it looks for flow runs (Prefect's default is 10): a spread batch's "
        "share reaches this host at its next look."),
) -> None:
    """Run `prefect worker start --pool sierra-pool` on this host for a server elsewhere,
    with the credential read from FILE into the worker's environment (never onto a command
    line). It replaces this process: stop it with Ctrl-C or SIGTERM."""
    import os
    import socket

    from sierra_prefect.credential import CLIENT_ENV, Credential

    credential = Credential.read(auth_string_file.expanduser().absolute())
    if credential is None:
        raise ShimError(f"--auth-string-file '{auth_string_file}' does not exist: write the "
                        "output of `sierra-prefect auth-string` (on the server host) into it, mode 0600")
    if not credential.is_private():
        raise ShimError(f"--auth-string-file '{auth_string_file}' can be read by other users: "
                        f"chmod 600 '{auth_string_file}'")
    if not api_url.startswith(("http://", "https://")):
        raise ShimError(f"--api-url '{api_url}' is not a URL: pass e.g. http://SERVER:4200/api")
    env = {**os.environ, "PREFECT_API_URL": api_url, CLIENT_ENV: credential.value,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": f"{query_seconds:g}"}
    for secret in ("SIERRA_PREFECT_AUTH_STRING", "SIERRA_PREFECT_DATABASE_URL"):
        env.pop(secret, None)
    # This venv's prefect, and its python for the flow runs (the pool's job command).
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    argv = [str(bindir / "prefect"), "worker", "start", "--pool", pool,
            "--name", name or socket.gethostname()]
    err.print(f"starting worker {argv[-1]} on pool {pool} for {api_url} "
              f"(credential from {credential.describe()})", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


@app.command(short_help="Exit 0 if DEPLOYMENT can run here (SIERRA's check).")
def check(
    deployment: str = typer.Argument(..., metavar="DEPLOYMENT", help="FLOW/NAME, e.g. sierra/local."),
    work_pool: str | None = typer.Option(
        None, metavar="POOL", help="Fail unless the deployment uses this pool."),
    image: str | None = typer.Option(
        None, metavar="IMAGE", help="Docker deployments: check this image's Prefect instead."),
    mount: list[str] = typer.Option(
        [], metavar="SRC:DST[:MODE]", help="Docker deployments: validate SRC:DST[:MODE] (repeatable)."),
    memory_per_run: str | None = typer.Option(
        None, metavar="SIZE", help="Validate a --memory-per-run SIZE (e.g. 2G)."),
) -> None:
    """Exit 0 if the server is reachable, DEPLOYMENT exists, the Prefect versions may work
    together and the mounts and sizes are valid (used by SIERRA plugins before stage 2)."""
    from sierra_prefect.docker import parse_mount
    from sierra_prefect.trigger import check_deployment, check_resources

    for m in mount:
        parse_mount(m)
    check_resources(memory_per_run=memory_per_run)
    connection = _stack(_settings(), quiet=True).connection()
    with connection.client() as client:
        check_deployment(client, connection, deployment, work_pool, image=image, console=err)
    out.print(f"{deployment} is deployed on {connection.api_url}")


@app.command(short_help="Trigger DEPLOYMENT for a batch and follow it.")
def run(
    deployment: str = typer.Argument(
        ..., metavar="DEPLOYMENT", help="FLOW/NAME, e.g. sierra/local or sierra/dockerremote."),
    input_root: str = typer.Option(..., metavar="DIR", help="Absolute directory holding commands.txt."),
    scratch_root: str = typer.Option(
        ..., metavar="DIR", help="Absolute directory for logs and resume markers."),
    max_parallel: int | None = typer.Option(
        None, metavar="N",
        help="Cap on runs at once (default and upper bound: worker host CPUs // cores per run)."),
    run_timeout: float | None = typer.Option(
        None, metavar="SECONDS", help="Seconds before a run's process group is killed."),
    cores_per_run: int | None = typer.Option(
        None, metavar="N", help="CPUs one run needs (default 1): runs at once = min(--max-parallel, "
        "CPUs // N); each run is pinned to its own N CPUs, OMP_NUM_THREADS=N."),
    memory_per_run: str | None = typer.Option(
        None, metavar="SIZE", help="Memory one run needs, e.g. 2G: a run starts when that much "
        "is free and is killed (failed) if it grows past it."),
    retries: int | None = typer.Option(
        None, metavar="N", help="Run a failed or timed-out run again, up to N times (default 0)."),
    retry_delay: float | None = typer.Option(
        None, metavar="SECONDS", help="Wait before each retry (default 0); a waiting run holds no CPU."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip runs that already succeeded."),
    workdir: str | None = typer.Option(
        None, metavar="DIR", help="Directory the commands run in (default: input root)."),
    spread: int | None = typer.Option(
        None, metavar="N", help="Fan the batch out to N child flow runs, shared by the pool's workers."),
    param: list[str] = typer.Option(
        [], metavar="KEY=VALUE", help="Extra flow parameter KEY=VALUE (repeatable)."),
    work_pool: str | None = typer.Option(
        None, metavar="POOL", help="Expected pool (must be the deployment's)."),
    work_queue: str | None = typer.Option(
        None, metavar="QUEUE", help="Queue of the deployment's pool to use."),
    image: str | None = typer.Option(
        None, metavar="IMAGE", help="Docker deployments: image for this flow run."),
    host_user: bool = typer.Option(False, "--host-user", help="Docker deployments: run as your uid:gid."),
    mount: list[str] = typer.Option(
        [], metavar="SRC:DST[:MODE]", help="Docker deployments: extra SRC:DST[:MODE] mount (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Trigger DEPLOYMENT for a batch, follow it, print the summary; exit 0 iff all runs succeeded."""
    from sierra_prefect.docker import parse_mount
    from sierra_prefect.trigger import Trigger, parse_param, trigger

    if deployment == SLURM_DEPLOYMENT:  # its queue is the allocation's (the module is heavy)
        from sierra_prefect.slurm import queue_for

        work_queue = queue_for(deployment, work_queue)
    settings = _settings()
    connection = _stack(settings, quiet=True).connection()
    request = Trigger(
        busy_deadline=settings.busy_deadline,
        deployment=deployment,
        input_root=input_root,
        scratch_root=scratch_root,
        max_parallel=max_parallel,
        run_timeout=run_timeout,
        cores_per_run=cores_per_run,
        memory_per_run=memory_per_run,
        retries=retries,
        retry_delay=retry_delay,
        resume=resume,
        workdir=workdir,
        spread=spread,
        params=dict(parse_param(p) for p in param),
        work_pool=work_pool,
        work_queue=work_queue,
        image=image,
        host_user=host_user,
        mounts=[parse_mount(m) for m in mount],
        stack_state=settings.state_file,
    )
    progress = err if as_json else out
    outcome = trigger(connection, request, progress)
    _report(outcome, as_json)
    raise typer.Exit(outcome.exit_code)


def _report(outcome, as_json: bool) -> None:
    summary = outcome.summary
    if as_json:
        payload = summary.model_dump(mode="json") if summary else {}
        payload.update(flow_run_id=str(outcome.flow_run_id), state=outcome.state,
                       message=outcome.message, ui_url=outcome.ui_url)
        out.print_json(json.dumps(payload))
        if summary is None:
            err.print(f"flow run ended {outcome.state} without a summary: {outcome.message}")
        return
    if summary is None:
        err.print(f"[red]flow run ended {outcome.state} without a summary: {outcome.message}[/red]")
        err.print(f"see {outcome.ui_url}")
        return
    style = "green" if summary.ok and outcome.state == "COMPLETED" else "red"
    out.print(f"[{style}]{outcome.state}: {summary.headline()}[/{style}]")
    if len(summary.workers) > 1:
        shares = ", ".join(f"{name} {count}" for name, count in sorted(summary.workers.items()))
        out.print(f"runs per worker: {shares}", highlight=False)
    for failed in summary.failed_runs:
        code = "timed out" if failed.timed_out else f"exit {failed.exit_code}"
        out.print(f"  FAILED {failed.name} ({code}): {failed.command}", highlight=False)
        out.print(f"         stdout {failed.stdout}", highlight=False)
        out.print(f"         stderr {failed.stderr}", highlight=False)
        for line in failed.stderr_tail.splitlines():
            out.print(f"         | {line}", highlight=False, markup=False)
    out.print(f"details: {outcome.ui_url}")


@app.command("plugin-path")
def plugin_path() -> None:
    """Print the folder to add to SIERRA_PLUGIN_PATH."""
    project = _settings().require_project()
    print(project / "sierra_plugins")


@pools_app.command("apply", short_help="Create or repair the pools of workpools/.")
def pools_apply() -> None:
    """Create or update the pools of workpools/ (and the crash automation) on the server."""
    from sierra_prefect import automations, pools

    settings = _settings()
    connection = _stack(settings, quiet=True).connection()
    connection.require_healthy()
    specs = pools.WorkPoolSpec.load_all(settings.require_project() / "workpools")
    with connection.client() as client:
        changes = pools.apply(client, specs) + automations.apply(client)
    for line in changes or [f"pools up to date: {', '.join(s.name for s in specs)}"]:
        out.print(line)


@image_app.command("build")
def image_build(
    tag: str | None = typer.Option(
        None, metavar="TAG", help="Image tag (default: the one sierra/dockerremote uses)."),
    base_image: str | None = typer.Option(
        None, metavar="IMAGE", help="BASE_IMAGE: a Python 3.11 image (default: python:3.11-slim)."),
) -> None:
    """Build the worker image with exactly the Prefect version of uv.lock."""
    from sierra_prefect import docker

    settings = _settings(base_image=base_image)
    tag = tag or docker.DEFAULT_TAG
    docker.build_image(settings.require_project(), tag, settings.base_image)
    out.print(f"built {tag} with Prefect {docker.image_prefect_version(tag)}")


@slurm_app.command("workers", short_help="Start one worker per allocated node (srun).")
def slurm_workers() -> None:
    """In an sbatch script or salloc shell: `srun` one `sierra-prefect slurm worker` per node of
    the allocation, each with all the CPUs the job has on its node. Runs until the step or
    the job ends (start it in the background with `&`)."""
    import os

    from sierra_prefect.slurm import Allocation, workers_argv

    allocation = Allocation.from_environment()
    argv = workers_argv(allocation, str(Path(sys.executable).parent / PROG))
    err.print(f"{PROG}: {' '.join(argv)}", highlight=False, markup=False)
    sys.stderr.flush()
    os.execv(argv[0], argv)  # srun itself: SLURM's signals reach it directly


@slurm_app.command("worker", short_help="The allocation's worker on this node (run by srun).")
def slurm_worker() -> None:
    """Run the allocation's Prefect worker on this node, on the queue slurm-<SLURM_JOB_ID> of
    sierra-slurm-pool, until SLURM ends the step or the job. Connects to the stack of
    SIERRA_PREFECT_HOME (or PREFECT_API_URL) with its credential."""
    from sierra_prefect.slurm import Allocation, SlurmWorker, connect

    allocation = Allocation.from_environment()
    settings = _settings()
    where = f"node {allocation.node_name} of SLURM job {allocation.job_id}"
    connection = connect(settings, _stack(settings, quiet=True).connection(), where)
    worker = SlurmWorker(settings, connection, allocation, say=err.print)
    raise typer.Exit(worker.run())


@slurm_app.command("check", short_help="Exit 0 once the allocation's workers are online (SIERRA's check).")
def slurm_check(
    deployment: str = typer.Argument("sierra/slurm", metavar="DEPLOYMENT", help="FLOW/NAME."),
    work_pool: str | None = typer.Option(
        None, metavar="POOL", help="Fail unless the deployment uses this pool."),
    memory_per_run: str | None = typer.Option(
        None, metavar="SIZE", help="Validate a --memory-per-run SIZE (e.g. 2G)."),
    timeout: float | None = typer.Option(
        None, metavar="SECONDS", help="How long to wait for one worker per allocated node "
        "(default: SIERRA_PREFECT_SLURM_WORKER_TIMEOUT, 90)."),
) -> None:
    """Inside an allocation: the server answers with our credential, DEPLOYMENT is deployed,
    and one worker per allocated node is online on the allocation's queue."""
    from sierra_prefect.slurm import Allocation, connect, wait_for_workers
    from sierra_prefect.trigger import check_deployment, check_resources

    allocation = Allocation.from_environment()
    check_resources(memory_per_run=memory_per_run)
    settings = _settings()
    connection = connect(settings, _stack(settings, quiet=True).connection(),
                         f"SLURM job {allocation.job_id}")
    with connection.client() as client:
        check_deployment(client, connection, deployment, work_pool, console=err)
    workers = wait_for_workers(connection, allocation, timeout or settings.slurm_worker_timeout,
                               say=err.print)
    out.print(f"{deployment} is deployed on {connection.api_url}; workers of SLURM job "
              f"{allocation.job_id} online: {', '.join(workers)}", highlight=False)


@app.command(short_help="A sample batch through sierra/local on the stack.")
def demo(home: HomeOption = None) -> None:
    """Bring the stack up, run a small sample batch through sierra/local, print the summary."""
    from sierra_prefect.demo import run_demo

    settings = _settings(home=home)
    outcome = run_demo(settings, _stack(settings), out)
    _report(outcome, as_json=False)
    raise typer.Exit(outcome.exit_code)


def _error(message: str) -> None:
    err.print(f"{PROG}: error: {message}", highlight=False, markup=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command (``argv``, default ``sys.argv[1:]``); its exit code.

    Every error is one line on stderr: a bad option or argument exits 2 and names the
    command's ``--help``."""
    command = typer.main.get_command(app)
    try:
        # prog_name, not the interpreter's guess: forked from the warm engine this code
        # runs as `python -m sierra_prefect.cli`, and usage lines must still say PROG.
        code = command.main(args=argv, prog_name=PROG, standalone_mode=False)
    except NoArgsIsHelpError as exc:  # a bare `sierra-prefect` or `sierra-prefect pools`
        exc.show()  # the help, on stderr
        return exc.exit_code
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else PROG
        _error(f"{exc.format_message().rstrip('.')}: see `{where} --help`")
        return exc.exit_code
    except ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except typer.Abort:
        _error("aborted")
        return 1
    except ShimError as exc:
        _error(str(exc))
        return exc.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())

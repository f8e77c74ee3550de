"""Running one experimental run as a subprocess in its own process group.

Each run gets a new session, so a timeout or a cancelled flow run can end the run and
everything it started (``killpg``), and nothing else. ``LiveRuns`` remembers the groups
that are still running so the flow can end them all when it is cancelled or crashes.

If the flow-run process itself is killed (SIGKILL, a lost host), nothing in it can clean
up: the run's leader gets SIGKILL from the kernel when its parent dies (``setpriv
--pdeathsig``), and every process of a run carries ``SIERRA_PREFECT_RUN`` (its run
directory) and ``SIERRA_PREFECT_FLOW_RUN`` in its environment, so the next flow run of the
batch can find stragglers of a dead flow run (``find_stragglers``) and end exactly those.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# bash like GNU parallel under SIERRA's hpc.local, so the same commands behave the same.
SHELL = shutil.which("bash") or "/bin/sh"
# util-linux's setpriv: the run's leader dies with the flow-run process (PR_SET_PDEATHSIG).
SETPRIV = shutil.which("setpriv")
RUN_ENV = "SIERRA_PREFECT_RUN"
FLOW_RUN_ENV = "SIERRA_PREFECT_FLOW_RUN"
# Credentials of the flow-run process that experimental runs must never see (a run that
# prints its environment would write them into its log).
SECRET_ENV = frozenset({
    "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY", "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_PASSWORD",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_PASSWORD",
    "SIERRA_PREFECT_AUTH_STRING", "SIERRA_PREFECT_DATABASE_URL",
})
# How long a run gets between SIGTERM and SIGKILL when it must be stopped.
KILL_GRACE_SECONDS = 5.0


@dataclass
class RunOutcome:
    exit_code: int | None
    timed_out: bool
    seconds: float


class LiveRuns:
    """The process groups of runs still running in this flow run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: set[int] = set()

    def add(self, pgid: int) -> None:
        with self._lock:
            self._groups.add(pgid)

    def discard(self, pgid: int) -> None:
        with self._lock:
            self._groups.discard(pgid)

    def terminate_all(self) -> None:
        with self._lock:
            groups = list(self._groups)
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        for pgid in groups:
            while _group_exists(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal_group(pgid, signal.SIGKILL)


LIVE_RUNS = LiveRuns()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_command(
    command: str,
    cwd: Path,
    stdout: Path,
    stderr: Path,
    timeout: float | None,
    identity: dict[str, str] | None = None,
) -> RunOutcome:
    """Run ``command`` with output appended to the given files; kill its group on timeout.

    ``identity`` (e.g. ``{RUN_ENV: run_dir, FLOW_RUN_ENV: id}``) goes into the
    environment of the run and everything it starts.
    """
    started = time.monotonic()
    argv = [SHELL, "-c", command]
    if SETPRIV:
        argv = [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env.update(identity or {})
    with open(stdout, "ab") as out, open(stderr, "ab") as err:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    # With start_new_session the child is the leader of a group whose id is its pid.
    LIVE_RUNS.add(proc.pid)
    try:
        try:
            code = proc.wait(timeout=timeout)
            return RunOutcome(code, False, time.monotonic() - started)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            # SIGKILL the whole group even if the leader went: its children may linger.
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            return RunOutcome(None, True, time.monotonic() - started)
    finally:
        LIVE_RUNS.discard(proc.pid)


def find_stragglers(run_dirs: Iterable[str]) -> dict[str, list[tuple[int, str]]]:
    """Processes still running for these run directories: {run_dir: [(pid, flow_run_id)]}.

    Found by the identity in their environment, so only processes of these runs match.
    """
    import psutil

    wanted = set(run_dirs)
    found: dict[str, list[tuple[int, str]]] = {}
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        run = env.get(RUN_ENV)
        if run in wanted:
            found.setdefault(run, []).append((proc.pid, env.get(FLOW_RUN_ENV, "")))
    return found


def end_processes(pids: Iterable[int]) -> None:
    """SIGTERM, then SIGKILL after the grace period, the given processes."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=KILL_GRACE_SECONDS)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=KILL_GRACE_SECONDS)


@dataclass
class RunRecord:
    """What one attempt of one run did: the ledger's view, the UI's row, the summary's line."""

    index: int
    name: str
    run_id: str
    command: str
    exit_code: int | None
    timed_out: bool
    seconds: float
    attempt: int
    stdout: str
    stderr: str
    error: str | None = None  # the attempt could not even start (e.g. its logs)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.error

    @property
    def state(self) -> str:
        if self.ok:
            return "COMPLETED"
        return "TIMED OUT" if self.timed_out else "FAILED"


def execute_run(run, scratch: Path, workdir: Path, timeout: float | None,
                flow_run_id: str) -> RunRecord:
    """One attempt of ``run``: new attempt logs, the command in its own process group,
    the success marker (atomically) if it exited 0."""
    from datetime import UTC, datetime

    from flows.plan import attempt_number, mark_done, new_attempt_logs, run_dir

    directory = run_dir(scratch, run)
    try:
        stdout, stderr = new_attempt_logs(directory)
    except OSError as exc:
        return RunRecord(run.index, run.name, run.run_id, run.command, None, False, 0.0, 0,
                         str(directory), str(directory), error=f"cannot create its logs: {exc}")
    identity = {RUN_ENV: str(directory), FLOW_RUN_ENV: flow_run_id}
    outcome = run_command(run.command, workdir, stdout, stderr, timeout, identity)
    record = RunRecord(run.index, run.name, run.run_id, run.command, outcome.exit_code,
                       outcome.timed_out, round(outcome.seconds, 3), attempt_number(stdout),
                       str(stdout), str(stderr))
    if record.ok:
        mark_done(scratch, run, {
            "name": run.name, "run_id": run.run_id, "exit_code": 0, "timed_out": False,
            "seconds": record.seconds, "attempt": record.attempt, "stdout": record.stdout,
            "stderr": record.stderr, "finished": datetime.now(UTC).isoformat(),
        })
    return record

"""Running one experimental run as a subprocess in its own process group.

Each run gets a new session, so a timeout or a cancelled flow run can end the run and
everything it started (``killpg``), and nothing else. ``LiveRuns`` (one per flow run)
remembers the groups that are still running so the flow can end them all when it is
cancelled or crashes; once it is closed, a run that starts anyway is ended at once.

If the flow-run process itself is killed (SIGKILL, a lost host), nothing in it can clean
up: the run's leader gets SIGKILL from the kernel when its parent dies (``setpriv
--pdeathsig``), and every process of a run carries ``SIERRA_PREFECT_RUN`` (its run
directory) and ``SIERRA_PREFECT_FLOW_RUN`` in its environment, so the next flow run of the
batch can find stragglers of a dead flow run (``find_stragglers``) and end exactly those.

``RunLimits`` says what one attempt may use: its CPUs (the command starts under
``taskset``, so its threads and children inherit the affinity from the first instruction,
with ``OMP_NUM_THREADS`` and its siblings set to the CPU count), a timeout, and a memory
size. Memory is enforced by a watchdog over the run's process tree (sampled every
``MEMORY_POLL_SECONDS``; works without root and on cgroup v1 or v2): past the size the
group is killed and the attempt fails with "memory limit SIZE exceeded". Each attempt's
peak memory is the larger of the watchdog's samples and the kernel's ``ru_maxrss``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flows.resources import THREAD_ENV, cpu_list, format_size, process_tree, rss, tree_sum
from sierra_prefect.redact import SECRET_ENV, scrub_env

# bash like GNU parallel under SIERRA's hpc.local, so the same commands behave the same.
SHELL = shutil.which("bash") or "/bin/sh"
# util-linux's setpriv: the run's leader dies with the flow-run process (PR_SET_PDEATHSIG).
SETPRIV = shutil.which("setpriv")
# util-linux's taskset: the run starts on its CPUs (Popen has no affinity of its own, and a
# preexec_fn is unsafe in a threaded process).
TASKSET = shutil.which("taskset")
RUN_ENV = "SIERRA_PREFECT_RUN"
FLOW_RUN_ENV = "SIERRA_PREFECT_FLOW_RUN"
# The flow-run process holds the stack's credential (to talk to the server); experimental
# runs must never see it, nor a database URL (a run that prints its environment would write
# them into its log): see run_environment.
# How long a run gets between SIGTERM and SIGKILL when it must be stopped.
KILL_GRACE_SECONDS = 5.0
# How often the memory watchdog measures a run's process tree.
MEMORY_POLL_SECONDS = 0.25
MEMORY_WATCHDOG = f"a watchdog over each run's process tree, every {MEMORY_POLL_SECONDS} s"


@dataclass
class RunLimits:
    """What one attempt may use."""

    timeout: float | None = None
    cpus: tuple[int, ...] | None = None
    memory: int | None = None  # bytes
    # Told the tree's resident bytes at every watchdog sample (the scheduler's MemoryGate).
    on_memory: Callable[[int], None] | None = None


@dataclass
class RunOutcome:
    exit_code: int | None
    timed_out: bool
    seconds: float
    peak_memory: int | None = None  # bytes
    memory_exceeded: bool = False


class _Process(subprocess.Popen):
    """Popen that keeps the child's resource usage when it reaps it (``os.wait4``)."""

    max_rss: int | None = None  # bytes, of the largest process of the tree the kernel saw

    def _try_wait(self, wait_flags):  # what wait() reaps with (poll() does not: don't use it)
        try:
            pid, status, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:  # reaped elsewhere, as in Popen's own _try_wait
            return self.pid, 0
        if pid == self.pid:
            self.max_rss = usage.ru_maxrss * 1024  # KiB on Linux
        return pid, status


class LiveRuns:
    """The process groups of runs still running in one flow run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._closed = False

    def add(self, pgid: int) -> bool:
        """Remember a run's group; False (and nothing remembered) once closed."""
        with self._lock:
            if not self._closed:
                self._groups.add(pgid)
            return not self._closed

    def discard(self, pgid: int) -> None:
        with self._lock:
            self._groups.discard(pgid)

    def terminate_all(self) -> None:
        """Close, then end every group still running (SIGTERM, grace, SIGKILL)."""
        with self._lock:
            self._closed = True
            groups = list(self._groups)
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        for pgid in groups:
            while _group_exists(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal_group(pgid, signal.SIGKILL)


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


def run_environment() -> dict[str, str]:
    """The flow-run process's environment for a run, as ``hpc.local`` would pass it (a
    simulator needs ``LD_LIBRARY_PATH``, ``ARGOS_PLUGIN_PATH``, ``ROS_*``...), less every
    secret: the variables Prefect reads one from (``SECRET_ENV``), and any variable whose
    value holds one of their values (a credential, a database URL or its password)."""
    env, _ = scrub_env(os.environ, names=SECRET_ENV)
    return env


def run_command(
    command: str,
    cwd: Path,
    stdout: Path,
    stderr: Path,
    limits: RunLimits | None = None,
    identity: dict[str, str] | None = None,
    live: LiveRuns | None = None,
) -> RunOutcome:
    """Run ``command`` with output appended to the given files, within ``limits``.

    ``identity`` (e.g. ``{RUN_ENV: run_dir, FLOW_RUN_ENV: id}``) goes into the
    environment of the run and everything it starts; ``live`` is its flow run's LiveRuns.
    """
    limits = limits or RunLimits()
    live = live or LiveRuns()
    started = time.monotonic()
    argv = [SHELL, "-c", command]
    env = run_environment()
    if limits.cpus:
        # The run's CPU count, even unpinned (no taskset): its libraries' threads follow it.
        env.update(dict.fromkeys(THREAD_ENV, str(len(limits.cpus))))
        if TASKSET:
            argv = [TASKSET, "--cpu-list", cpu_list(limits.cpus), *argv]
    if SETPRIV:
        argv = [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    env.update(identity or {})
    with open(stdout, "ab") as out, open(stderr, "ab") as err:
        proc = _Process(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    # With start_new_session the child is the leader of a group whose id is its pid.
    if not live.add(proc.pid):  # the flow run is ending: this run must not outlive it
        _signal_group(proc.pid, signal.SIGKILL)
    try:
        code, ended_by, sampled = _wait_within(proc, limits, started)
    finally:
        live.discard(proc.pid)
    peak = max(sampled, proc.max_rss or 0) or None
    if ended_by == "memory":
        with open(stderr, "a") as err:
            err.write(f"\nsierra-prefect: memory limit {format_size(limits.memory)} exceeded "
                      f"(process tree at {format_size(sampled)}); the run was killed "
                      f"(enforced by {MEMORY_WATCHDOG})\n")
    return RunOutcome(code, ended_by == "timeout", time.monotonic() - started, peak,
                      ended_by == "memory")


def _wait_within(proc: _Process, limits: RunLimits,
                 started: float) -> tuple[int | None, str | None, int]:
    """(exit code, "timeout"/"memory" if it had to be ended, peak sampled tree bytes)."""
    deadline = None if limits.timeout is None else started + limits.timeout
    peak = 0
    while True:
        step = MEMORY_POLL_SECONDS if limits.memory else None
        if deadline is not None:
            remaining = max(0.0, deadline - time.monotonic())
            step = remaining if step is None else min(step, remaining)
        try:
            return proc.wait(timeout=step), None, peak
        except subprocess.TimeoutExpired:
            pass
        if limits.memory:
            tree = process_tree(proc.pid)
            used = tree_sum(tree, rss)
            peak = max(peak, used)
            if limits.on_memory:
                limits.on_memory(used)
            if used > limits.memory:
                # No grace: a run past its memory puts the host at risk, as the OOM killer
                # (or SLURM's) would see it. Its group, and what left the group (setsid).
                _signal_group(proc.pid, signal.SIGKILL)
                for member in tree[1:]:
                    with contextlib.suppress(Exception):
                        member.kill()
                proc.wait()
                return None, "memory", peak
        if deadline is not None and time.monotonic() >= deadline:
            _end_group(proc)
            return None, "timeout", peak


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM the run's group, SIGKILL it after the grace period, reap the leader."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    # SIGKILL the whole group even if the leader went: its children may linger.
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


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
    attempt: int  # its number on disk (attempt-00k), counting earlier flow runs'
    stdout: str
    stderr: str
    error: str | None = None  # the attempt could not even start (e.g. its logs)
    attempts: int = 1  # made by this flow run, retries included
    cpus: str = ""  # the CPUs it was pinned to, "0-1"
    peak_memory: int | None = None  # bytes
    memory_exceeded: bool = False
    memory_limit: int | None = None  # bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.error

    @property
    def state(self) -> str:
        if self.ok:
            return "COMPLETED"
        return "TIMED OUT" if self.timed_out else "FAILED"

    @property
    def reason(self) -> str | None:
        """Why it failed when its exit code does not say."""
        if self.memory_exceeded:
            return f"memory limit {format_size(self.memory_limit or 0)} exceeded"
        if self.timed_out:
            return "timed out"
        return self.error


def execute_run(run, scratch: Path, workdir: Path, limits: RunLimits, flow_run_id: str,
                attempts: int = 1, live: LiveRuns | None = None,
                batch: str | None = None) -> RunRecord:
    """One attempt of ``run``: new attempt logs, the command in its own process group,
    the success marker (atomically) if it exited 0. ``attempts`` counts this one."""
    from datetime import UTC, datetime

    from flows.plan import attempt_number, mark_done, new_attempt_logs, run_dir

    directory = run_dir(scratch, run)
    cpus = cpu_list(limits.cpus) if limits.cpus else ""
    try:
        stdout, stderr = new_attempt_logs(directory)
    except OSError as exc:
        return RunRecord(run.index, run.name, run.run_id, run.command, None, False, 0.0, 0,
                         str(directory), str(directory), error=f"cannot create its logs: {exc}",
                         attempts=attempts, cpus=cpus)
    identity = {RUN_ENV: str(directory), FLOW_RUN_ENV: flow_run_id}
    outcome = run_command(run.command, workdir, stdout, stderr, limits, identity, live)
    record = RunRecord(run.index, run.name, run.run_id, run.command, outcome.exit_code,
                       outcome.timed_out, round(outcome.seconds, 3), attempt_number(stdout),
                       str(stdout), str(stderr), attempts=attempts, cpus=cpus,
                       peak_memory=outcome.peak_memory, memory_exceeded=outcome.memory_exceeded,
                       memory_limit=limits.memory)
    if record.ok:
        mark_done(scratch, run, {
            "name": run.name, "run_id": run.run_id, "exit_code": 0, "timed_out": False,
            "seconds": record.seconds, "attempt": record.attempt, "attempts": attempts,
            "cpus": cpus, "peak_memory": record.peak_memory, "stdout": record.stdout,
            "stderr": record.stderr, "finished": datetime.now(UTC).isoformat(),
            # Who ran it, and for which batch (a spread batch's parent flow run): the
            # ledger says so (flows/spread.py).
            "worker": os.environ.get("PREFECT__WORKER_NAME") or socket.gethostname(),
            "flow_run": flow_run_id, "batch": batch or flow_run_id,
        })
    return record

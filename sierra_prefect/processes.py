"""Processes the shim starts, recorded by pid *and* start time, and how they end.

A pid alone can be reused by another program after ours exits; the start time makes the
record unambiguous, so ``down`` and ``up`` never signal a process that is not ours. Each
process is started in its own session, so stopping it stops its children too (its process
group, whose id we recorded), and nothing else.

Use::

    record = ProcessRecord.spawn("server", argv, env, log_path, cwd)
    wait_for(lambda: healthy(), deadline=60, proc=record, what="Prefect server")
    record.stop()            # SIGTERM the group, wait, SIGKILL what is left

``terminate`` is the one SIGTERM-wait-SIGKILL of the package; ``wait_for`` the one
readiness wait (a condition with a deadline, never a fixed sleep).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
from pydantic import BaseModel

from sierra_prefect.errors import ShimError
from sierra_prefect.private import open_private, private_dir

# SIGKILL is final: only the kernel's bookkeeping is left to wait for.
_AFTER_KILL_SECONDS = 10.0


def terminate(procs: Iterable[psutil.Process], grace: float = 30.0,
              signal_all: Callable[[int], None] | None = None) -> list[psutil.Process]:
    """SIGTERM ``procs``, wait up to ``grace`` seconds for them to exit, SIGKILL the rest
    and wait for those too. ``signal_all(signum)``, if given, sends each signal instead
    (once: e.g. to a whole process group). Returns the ones still alive (none, normally)."""
    procs = list(procs)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, _AFTER_KILL_SECONDS)):
        if signal_all is not None:
            signal_all(sig)
        else:
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass  # already gone
        procs = wait_exited(procs, wait)
        if not procs:
            break
    return procs


def wait_exited(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` seconds for ``procs`` to exit; the ones still running.

    An exited process that is not our child stays a zombie until its parent reaps it: for
    what ``up`` started, that is init, which here reaps every ~2 s, so psutil.wait_procs
    (which waits for the pid to vanish) kept every ``down`` waiting ~2 s per process. A
    zombie has exited: it counts as gone (our own children are reaped here)."""
    alive = list(procs)
    end = time.monotonic() + timeout
    while True:
        alive = [proc for proc in alive if not _exited(proc)]
        if not alive or time.monotonic() >= end:
            return alive
        time.sleep(0.02)  # a poll interval: the timeout is what counts


def _exited(proc: psutil.Process) -> bool:
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    try:
        os.waitpid(proc.pid, os.WNOHANG)  # ours: reap it
    except ChildProcessError:
        pass  # another's child: its parent reaps it
    return True


def wait_for(condition: Callable[[], object], deadline: float, proc: ProcessRecord | None,
             what: str) -> None:
    """Poll ``condition`` until true; fail early if ``proc`` died, late at the deadline."""
    end = time.monotonic() + deadline
    delay = 0.05
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and not proc.is_running():
            raise ShimError(f"{what} exited while starting (see {proc.log}): {proc.log_tail()}")
        time.sleep(delay)  # a poll interval, growing to 0.5 s: the deadline is what counts
        delay = min(delay * 1.5, 0.5)
    log = f" (see {proc.log})" if proc else ""
    raise ShimError(f"{what} not ready after {deadline:.0f} s{log}: check the log and retry")


class ProcessRecord(BaseModel):
    role: str
    pid: int
    create_time: float
    argv: list[str]
    log: str

    @classmethod
    def spawn(cls, role: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path,
              umask: int = -1) -> ProcessRecord:
        """Start ``argv`` in its own session, output appended to ``log`` (a private file in
        a private directory); ``umask`` for it (-1: ours)."""
        private_dir(log.parent)
        with open_private(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=umask,
            )
        return cls(
            role=role,
            pid=proc.pid,
            create_time=psutil.Process(proc.pid).create_time(),
            argv=argv,
            log=str(log),
        )

    def process(self) -> psutil.Process | None:
        """This very process (same pid *and* start time), or None."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except psutil.Error:
            pass
        return None

    def is_running(self) -> bool:
        """True only if this pid is still the very process we started."""
        return self.process() is not None

    def stop(self, grace: float = 30.0) -> bool:
        """SIGTERM our process group, wait for all of it, SIGKILL what is left. False if
        the process is not ours (any more)."""
        leader = self.process()
        if leader is None:
            return False
        # Our process leads its own group (start_new_session); if it changed its group,
        # only the process itself is ours to signal.
        group = self.pid if _group_of(self.pid) == self.pid else None
        members = [leader] + ([p for p in _members(group) if p.pid != self.pid] if group else [])
        terminate(members, grace, signal_all=lambda sig: _signal(leader, sig, group))
        return True

    def stop_and_report(self) -> str:
        """``stop``, and the line ``down`` prints about it."""
        if self.stop():
            return f"stopped {self.role} (pid {self.pid})"
        return f"{self.role} pid {self.pid} was already gone (or is now another program's): left alone"

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = Path(self.log).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _members(group: int) -> list[psutil.Process]:
    """Every live process of process group ``group``."""
    members = []
    for proc in psutil.process_iter():
        if _group_of(proc.pid) == group:
            members.append(proc)
    return members


def _signal(leader: psutil.Process, sig: int, group: int | None) -> None:
    # One killpg reaches the whole group, including members started after we listed them.
    try:
        if group is not None:
            os.killpg(group, sig)
        else:
            leader.send_signal(sig)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass  # nothing left to signal

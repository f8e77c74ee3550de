"""Processes the shim starts, recorded by pid *and* start time.

A pid alone can be reused by another program after ours exits; the start time makes the
record unambiguous, so ``down`` and ``up`` never signal a process that is not ours. Each
process is started in its own session, so stopping it stops its children too (one
``killpg`` on a group whose id we recorded), and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from pydantic import BaseModel


class ProcessRecord(BaseModel):
    role: str
    pid: int
    create_time: float
    argv: list[str]
    log: str

    @classmethod
    def spawn(cls, role: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> "ProcessRecord":
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(
            role=role,
            pid=proc.pid,
            create_time=psutil.Process(proc.pid).create_time(),
            argv=argv,
            log=str(log),
        )

    def is_running(self) -> bool:
        """True only if this pid is still the very process we started."""
        try:
            proc = psutil.Process(self.pid)
            return (
                abs(proc.create_time() - self.create_time) < 0.01
                and proc.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.Error:
            return False

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM our process group, wait for it, SIGKILL what is left. False if not ours."""
        if not self.is_running():
            return False
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.is_running() or self._group_alive()):
            time.sleep(0.1)
        if self.is_running() or self._group_alive():
            self._signal(signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.is_running():
                time.sleep(0.05)
        return True

    def _signal(self, sig: signal.Signals) -> None:
        # Our process leads its own group (start_new_session); if it was reparented or
        # changed its group, signal only the process itself.
        try:
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = Path(self.log).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

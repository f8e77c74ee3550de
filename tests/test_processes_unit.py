"""sierra_prefect/processes.py with real processes: the one SIGTERM-wait-SIGKILL, and a
record's stop reaching its whole process group (and nothing else)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from sierra_prefect.processes import ProcessRecord, terminate
from tests.helpers import wait_until

# Ignores SIGTERM, says so, then waits forever: only SIGKILL ends it.
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(600)")


def test_terminate_kills_what_ignores_sigterm_after_the_grace():
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        started = time.monotonic()
        assert terminate([psutil.Process(proc.pid)], grace=1.0) == []
        assert 1.0 <= time.monotonic() - started < 15
        assert not psutil.pid_exists(proc.pid)  # killed and reaped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_ends_the_group_and_leaves_other_processes_alone(tmp_path):
    child_pid = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {STUBBORN!r}]); "
              f"open({str(child_pid)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    bystander = subprocess.Popen(["sleep", "120"])
    record = ProcessRecord.spawn("test", [sys.executable, "-c", script], {}, tmp_path / "log", tmp_path)
    try:
        child = int(wait_until(lambda: child_pid.exists() and child_pid.read_text(), 30,
                               "the group's child to start"))
        assert record.stop(grace=1.0) is True
        assert not record.is_running()
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        assert bystander.poll() is None
        assert record.stop() is False  # not ours any more: nothing signalled
    finally:
        bystander.terminate()
        bystander.wait(timeout=10)

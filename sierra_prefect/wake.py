"""Waking our workers: SIGUSR1 makes one look for flow runs now, not at its next poll.

No imports beyond the standard library and psutil, so the flow (flows/spread.py), the
shim (sierra_prefect/worker.py) and the worker types all use it without import circles::

    if catches(pid, WAKE_SIGNAL):
        os.kill(pid, WAKE_SIGNAL)
    wake_own_worker()   # from a flow run: its own worker, found through WORKER_ENV
"""

from __future__ import annotations

import os
import signal

# Our workers look for flow runs at once on it (worker_types.WakeOnSignal).
WAKE_SIGNAL = signal.SIGUSR1
# "pid:start time" of one of our workers, in its flow runs' environment: a spread batch's
# parent wakes its own worker for the children it schedules (flows/spread.py).
WORKER_ENV = "SIERRA_PREFECT_WORKER_PROCESS"


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux: ``SigCgt`` in
    /proc/PID/status). A process without one would be killed by SIGUSR1."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def wake_own_worker() -> bool:
    """SIGUSR1 to the worker that runs this flow run, if it is ours and still the same
    process (pid and start time) and catches the signal; True if it was sent."""
    import psutil

    try:
        pid, started = os.environ[WORKER_ENV].split(":", 1)
        if psutil.Process(int(pid)).create_time() != float(started):
            return False
        if not catches(int(pid), WAKE_SIGNAL):
            return False
        os.kill(int(pid), WAKE_SIGNAL)
        return True
    except (KeyError, ValueError, psutil.Error, OSError):
        return False

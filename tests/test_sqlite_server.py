"""The stack's SQLite server under write load: the worker channel never fails on a locked
database (sierra_prefect/prefect_server.py explains the fix).

A real stack (``sierra-prefect up``, the embedded SQLite default) takes API writes from four
threads (logs and variables, as a busy batch writes) while a stock Prefect worker with 1 s
heartbeats opens its channel (creating its pool) and heartbeats. Prefect's server as is logs
"database is locked" with a traceback several times in such a window (measured: 8-12 in
15-30 s); ours logs none, and the worker's heartbeats are recorded.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import datetime

import httpx
import pytest

from sierra_prefect import prefect_server
from tests.helpers import stop_group, wait_until

pytestmark = pytest.mark.slow

POOL = "sp-heartbeat-under-load"
HEARTBEATS = 5  # distinct heartbeat times to see recorded while the load runs


def test_the_locked_prefect_has_every_function_the_fix_wraps():
    # A Prefect upgrade that renames one fails here, not silently in users' logs.
    assert prefect_server.begin_read_then_write_immediately() == []
    assert prefect_server.begin_read_then_write_immediately() == []  # applying twice wraps once


def _writes(api_url: str, headers: dict, stop: threading.Event, done: list[int]) -> None:
    with httpx.Client(headers=headers, timeout=60) as client:
        n = 0
        while not stop.is_set():
            logs = [{"name": "load", "level": 20, "message": "x" * 60,
                     "timestamp": datetime.now().astimezone().isoformat()}] * 20
            client.post(f"{api_url}/logs/", json=logs).raise_for_status()
            name = f"load-{threading.get_ident()}-{n}"
            client.post(f"{api_url}/variables/", json={"name": name, "value": n}).raise_for_status()
            n += 1
        done.append(n)


def test_worker_channel_under_write_load_logs_no_locked_database(fresh_stack, tmp_path):
    stack = fresh_stack
    server_log = stack.home / "logs" / "server.log"
    fix_line = [line for line in server_log.read_text().splitlines()
                if "worker-channel and labelling transactions begin IMMEDIATE on SQLite" in line]
    assert fix_line and "not found" not in fix_line[0], fix_line

    stop, done = threading.Event(), []
    writers = [threading.Thread(target=_writes, args=(stack.api_url, stack.headers, stop, done))
               for _ in range(4)]
    for thread in writers:
        thread.start()
    env = {**stack.client_env, "PREFECT_WORKER_HEARTBEAT_SECONDS": "1"}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type",
             "process", "--name", "under-load"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    seen: set[str] = set()

    def heartbeats_recorded() -> bool:
        reply = httpx.post(f"{stack.api_url}/work_pools/{POOL}/workers/filter",
                           headers=stack.headers, json={}, timeout=30)
        if reply.status_code == 200:
            seen.update(w["last_heartbeat_time"] for w in reply.json() if w["name"] == "under-load")
        return len(seen) >= HEARTBEATS

    try:
        wait_until(heartbeats_recorded, 120, f"{HEARTBEATS} heartbeats of a worker under write load")
    finally:
        stop.set()
        for thread in writers:
            thread.join(timeout=120)
        stop_group(worker)
    assert len(done) == len(writers), "a writer thread failed (its traceback is above)"
    assert sum(done) > 0

    text = server_log.read_text(errors="replace")
    assert "database is locked" not in text, text[-4000:]
    assert "| ERROR" not in text, text[-4000:]

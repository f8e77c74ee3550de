"""One batch over several workers: `sierra-prefect run --spread N` with stock workers.

The extra workers are started exactly as a user would on another host
(`prefect worker start --pool sierra-pool`, an activated venv, PREFECT_API_URL), each as
its own process with its own name and working directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import make_batch, wait_until

pytestmark = pytest.mark.slow

RUNS, CAP = 24, 2


def start_stock_worker(stack, name: str, home: Path) -> subprocess.Popen:
    home.mkdir(parents=True)
    env = {k: v for k, v in stack.client_env.items() if not k.startswith("SIERRA_PREFECT_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # activated venv
        PREFECT_HOME=str(home / "prefect"),
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "sierra-pool",
         "--name", name],
        cwd=home, env=env, stdout=open(home / "worker.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # our own worker's group, by pid
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def online(stack, name: str) -> bool:
    return name in stack.status()["pools"]["sierra-pool"]["workers_online"]


def test_one_batch_spreads_over_stock_workers_exactly_once(stack, tmp_path):
    workers = [start_stock_worker(stack, f"extra-worker-{i}", tmp_path / f"host{i}") for i in range(2)]
    try:
        for i in range(2):
            wait_until(lambda: online(stack, f"extra-worker-{i}"), 90, f"extra-worker-{i} online")
        who = tmp_path / "who"
        who.mkdir()
        commands = [f"sleep 1; echo $PREFECT__WORKER_NAME >> {who}/r{i}" for i in range(RUNS)]
        batch, scratch = make_batch(tmp_path, commands)
        result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                           str(scratch), "--spread", "3", "--max-parallel", str(CAP), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads(result.stdout)
        assert (summary["total"], summary["succeeded"], summary["failed"]) == (RUNS, RUNS, 0)

        executions = {f.name: f.read_text().split() for f in who.iterdir()}
        assert sorted(executions) == sorted(f"r{i}" for i in range(RUNS))
        assert all(len(ran_on) == 1 for ran_on in executions.values()), "each run exactly once"
        per_worker = Counter(ran_on[0] for ran_on in executions.values())
        assert per_worker == Counter(summary["workers"])
        assert len(per_worker) >= 2, f"only one worker took a share: {per_worker}"
        print(f"\nspread over workers: {dict(per_worker)}")
    finally:
        for worker in workers:
            stop(worker)

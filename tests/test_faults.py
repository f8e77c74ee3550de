"""Faults in the middle of a batch: a worker killed outright, the server restarted.

Runs count their executions in a file, so "no run that succeeded is executed again" is
checked, not assumed. Each test gets its own stack (it breaks it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.helpers import CLI, make_batch, wait_until

pytestmark = pytest.mark.slow

RUNS, CAP, SECONDS = 16, 2, 2.0


def counting_batch(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Runs that record each execution, then write their output after a while."""
    executions = tmp_path / "executions"
    executions.mkdir()
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    commands = [
        f"echo $$ >> {executions}/r{i}; sleep {SECONDS}; echo result-{i} > {outputs}/r{i}.tmp; "
        f"mv {outputs}/r{i}.tmp {outputs}/r{i}.txt"
        for i in range(RUNS)
    ]
    batch, scratch = make_batch(tmp_path, commands)
    return batch, scratch, outputs


def start_run(stack, batch: Path, scratch: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [CLI, "run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch),
         "--max-parallel", str(CAP), "--json"],
        env=stack.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )


def done_outputs(outputs: Path) -> set[str]:
    return {p.stem for p in outputs.glob("*.txt")}


def marked_done(scratch: Path) -> set[str]:
    names = set()
    for marker in (scratch / "sierra-prefect" / "runs").glob("*/done.json"):
        found = re.search(r"executions/(r\d+);", json.loads(marker.read_text())["command"])
        names.add(found.group(1))
    return names


def executions(tmp_path: Path) -> dict[str, int]:
    return {f.name: len(f.read_text().split()) for f in (tmp_path / "executions").iterdir()}


def test_worker_killed_mid_batch_is_crashed_and_resume_completes(fresh_stack, tmp_path):
    batch, scratch, outputs = counting_batch(tmp_path)
    worker = fresh_stack.status()["pids"]["workers"][0]  # before: `status` takes seconds
    follower = start_run(fresh_stack, batch, scratch, tmp_path / "first.log")
    wait_until(lambda: len(done_outputs(outputs)) >= 3, 120, "a few runs to finish")

    # The whole worker process group (worker + flow-run process), as when a host dies.
    group = os.getpgid(worker)
    assert group == worker, "the shim starts each worker as its own group leader"
    os.killpg(group, signal.SIGKILL)
    # Succeeded = has its success marker (an output written just as the flow-run process
    # died, before its marker, rightly counts as not done and runs again).
    finished_before = marked_done(scratch)

    # The server marks the silent flow run Crashed (heartbeats), and `run` says so.
    assert follower.wait(timeout=240) != 0
    log = (tmp_path / "first.log").read_text()
    assert '"state": "CRASHED"' in log, log

    # Nothing of the dead flow run runs on: the kernel ended the runs' leaders with it.
    # Each run is its own process group, led by the shell whose pid it recorded: look for
    # those groups only (other test files run their own batches at the same time).
    groups = {int(pid) for f in (tmp_path / "executions").iterdir() for pid in f.read_text().split()}
    wait_until(lambda: not _processes_in_groups(groups), 30, "runs of the killed flow run to end")

    fresh_stack.cli("up", check=True)  # a new worker; the server is kept
    second = fresh_stack.cli("run", "sierra/local", "--input-root", str(batch),
                             "--scratch-root", str(scratch), "--max-parallel", str(CAP), "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    summary = json.loads(second.stdout)
    assert summary["skipped"] >= len(finished_before) and summary["failed"] == 0
    assert done_outputs(outputs) == {f"r{i}" for i in range(RUNS)}
    counts = executions(tmp_path)
    for name in finished_before:
        assert counts[name] == 1, f"{name} had succeeded and ran again: {counts}"
    # Every attempt's logs are still there, none truncated to nothing by a later one.
    for run in (scratch / "sierra-prefect" / "runs").iterdir():
        assert (run / "attempt-001.stdout").exists()
    print(f"\nworker kill: {len(finished_before)} runs done before the kill, "
          f"{summary['skipped']} skipped on resume, {summary['succeeded']} re-run, "
          f"executions {sum(counts.values())} for {RUNS} runs")


def test_server_restarted_mid_batch_completes_or_resumes(fresh_stack, tmp_path):
    batch, scratch, outputs = counting_batch(tmp_path)
    server = fresh_stack.status()["pids"]["server"]
    follower = start_run(fresh_stack, batch, scratch, tmp_path / "first.log")
    wait_until(lambda: len(done_outputs(outputs)) >= 2, 120, "a couple of runs to finish")

    os.killpg(os.getpgid(server), signal.SIGTERM)
    wait_until(lambda: not psutil.pid_exists(server), 60, "the server to stop")
    restarted = fresh_stack.cli("up", check=True)
    assert "starting Prefect server" in restarted.stderr
    assert fresh_stack.status()["api_url"] == fresh_stack.api_url, "same address after restart"

    code = follower.wait(timeout=300)
    finished_before = done_outputs(outputs)
    if code != 0 or finished_before != {f"r{i}" for i in range(RUNS)}:
        again = fresh_stack.cli("run", "sierra/local", "--input-root", str(batch),
                                "--scratch-root", str(scratch), "--json")
        assert again.returncode == 0, again.stdout + again.stderr
    assert done_outputs(outputs) == {f"r{i}" for i in range(RUNS)}
    counts = executions(tmp_path)
    assert set(counts) == {f"r{i}" for i in range(RUNS)}, counts
    # A run that had finished before the restart never runs again; one in flight at the
    # restart may run once more, never more.
    assert all(counts[name] == 1 for name in finished_before), counts
    assert all(n in (1, 2) for n in counts.values()), counts
    print(f"\nserver restart: first follower exit {code}, executions {counts}")


def _processes_in_groups(groups: set[int]) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in groups:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive

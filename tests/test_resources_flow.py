"""Cores per run, pinning, memory per run and retries, through the `sierra` flow with real
processes against the session's real Prefect server; and the shim's one-line refusals."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest

from benchmarks.common import max_at_once
from flows.sierra_batch import sierra
from tests.helpers import make_batch, max_overlap, timed_command

CPUS = sorted(os.sched_getaffinity(0))

# A run that spins THREADS busy threads for SECONDS and records, from /proc, the CPUs it
# may run on, with its start and end: what a multi-threaded simulation would do.
BUSY = '''
import json, os, sys, threading, time
out, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.time()
def spin():
    while time.time() - start < seconds:
        pass
workers = [threading.Thread(target=spin) for _ in range(threads)]
for w in workers: w.start()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
allowed = status["Cpus_allowed_list"].strip()
for w in workers: w.join()
json.dump({"start": start, "end": time.time(), "allowed": allowed,
           "affinity": sorted(os.sched_getaffinity(0)),
           "omp": os.environ.get("OMP_NUM_THREADS")}, open(out, "w"))
'''


def busy_batch(tmp_path: Path, runs: int, threads: int, seconds: float) -> tuple[Path, Path, Path]:
    script, out = tmp_path / "busy.py", tmp_path / "out"
    tmp_path.mkdir(parents=True, exist_ok=True)
    script.write_text(BUSY)
    out.mkdir()
    batch, scratch = make_batch(tmp_path, [
        f"{sys.executable} {script} {out}/r{i}.json {threads} {seconds}" for i in range(runs)])
    return batch, scratch, out


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("r*.json"))]


def overlapping_pairs(found: list[dict]):
    for i, a in enumerate(found):
        for b in found[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                yield a, b


def test_concurrent_runs_never_share_a_cpu(prefect_api, tmp_path):
    batch, scratch, out = busy_batch(tmp_path, runs=2 * len(CPUS), threads=1, seconds=0.6)
    state = sierra(input_root=str(batch), scratch_root=str(scratch), cores_per_run=1,
                   return_state=True)
    summary = state.result()
    assert summary["succeeded"] == 2 * len(CPUS) and summary["max_parallel"] == len(CPUS)
    found = reports(out)
    assert len(found) == 2 * len(CPUS)
    for run in found:
        assert len(run["affinity"]) == 1 and run["omp"] == "1"
        assert run["allowed"] == str(run["affinity"][0])  # what /proc says the kernel enforces
    pairs = list(overlapping_pairs(found))
    assert pairs, "runs were expected to overlap (one per CPU)"
    for a, b in pairs:
        assert not set(a["affinity"]) & set(b["affinity"]), (a, b)


def test_more_cores_per_run_than_the_machine_has_runs_one_at_a_time(prefect_api, tmp_path):
    cores = len(CPUS) + 1
    batch, scratch, out = busy_batch(tmp_path, runs=3, threads=cores, seconds=0.4)
    state = sierra(input_root=str(batch), scratch_root=str(scratch), cores_per_run=cores,
                   max_parallel=8, return_state=True)
    summary = state.result()
    assert summary["succeeded"] == 3 and summary["max_parallel"] == 1
    found = reports(out)
    assert max_at_once([(r["start"], r["end"]) for r in found]) == 1
    assert all(r["affinity"] == CPUS and r["omp"] == str(len(CPUS)) for r in found)


def test_two_batches_at_once_share_the_hosts_cpus(prefect_api, tmp_path):
    """Two flow runs of one stack on one host: their runs at once hold disjoint CPUs."""
    import contextvars

    batches = [busy_batch(tmp_path / name, runs=len(CPUS) * 2, threads=1, seconds=0.4)
               for name in ("a", "b")]
    results = []

    def one(batch, scratch):
        results.append(sierra(input_root=str(batch), scratch_root=str(scratch), return_state=True))

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(one, b, s))
               for b, s, _ in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 2 and all(r.is_completed() for r in results)
    found = reports(batches[0][2]) + reports(batches[1][2])
    assert len(found) == 4 * len(CPUS)
    for a, b in overlapping_pairs(found):
        assert not set(a["affinity"]) & set(b["affinity"]), (a, b)
    assert max_at_once([(r["start"], r["end"]) for r in found]) <= len(CPUS)


def test_a_run_past_its_memory_is_ended_and_reported_and_the_others_finish(prefect_api, tmp_path):
    grow = ("python3 -c \"import time; b = bytearray(300 * 1024 * 1024); "
            "[b.__setitem__(i, 1) for i in range(0, len(b), 4096)]; time.sleep(30)\"")
    batch, scratch = make_batch(tmp_path, ["echo small-0", grow, "echo small-2"])
    state = sierra(input_root=str(batch), scratch_root=str(scratch), memory_per_run="100M",
                   retries=1, return_state=True)
    summary = state.result(raise_on_failure=False)
    assert state.is_failed()
    assert (summary["succeeded"], summary["failed"]) == (2, 1)
    [failed] = summary["failed_runs"]
    assert failed["reason"] == "memory limit 100.0M exceeded" and failed["exit_code"] is None
    assert failed["attempts"] == 2  # retried like any failure, ended again
    assert failed["peak_memory"] > 100 * 1024**2
    assert "memory limit 100.0M exceeded" in failed["stderr_tail"]
    logs = sorted(Path(failed["stderr"]).parent.glob("attempt-*.stderr"))
    assert len(logs) == 2 and all("watchdog" in p.read_text() for p in logs)
    assert summary["memory_per_run"] == 100 * 1024**2


def test_a_run_that_fails_once_succeeds_on_retry_and_the_batch_is_green(prefect_api, tmp_path):
    flag = tmp_path / "failed-once"
    flaky = f"if [ -e {flag} ]; then echo second; else touch {flag}; echo first >&2; exit 5; fi"
    batch, scratch = make_batch(tmp_path, ["echo steady", flaky])
    state = sierra(input_root=str(batch), scratch_root=str(scratch), retries=2, retry_delay=0.2,
                   return_state=True)
    summary = state.result()
    assert state.is_completed() and (summary["succeeded"], summary["failed"]) == (2, 0)
    [(name, attempts)] = summary["retried"].items()
    assert attempts == 2
    run_dir = next(p.parent for p in scratch.rglob("attempt-002.stdout"))
    assert (run_dir / "attempt-001.stderr").read_text() == "first\n"
    assert (run_dir / "attempt-002.stdout").read_text() == "second\n"
    assert json.loads((run_dir / "done.json").read_text())["attempts"] == 2
    # The UI's run table shows, per run, its attempts, CPUs and peak memory.
    from tests.test_flow import _artifacts

    [table] = _artifacts(state.state_details.flow_run_id, "table")
    rows = {row["run"]: row for row in json.loads(table.data)}
    assert rows[name]["attempts"] == 2 and rows[name]["attempt"] == 2
    assert all(row["cpus"] and row["peak memory"] for row in rows.values()), rows


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--cores-per-run", "0", "--cores-per-run 0 is below 1"),
    ("--memory-per-run", "2Q", "--memory-per-run '2Q' is not a memory size"),
    ("--retries", "-1", "--retries -1 is below 0"),
    ("--retry-delay", "-2", "--retry-delay -2.0 is not a number of seconds >= 0"),
    ("--retry-delay", "inf", "--retry-delay inf is not a number of seconds >= 0"),
    ("--memory-per-run", "100", "--memory-per-run '100' is not a memory size"),
])
def test_bad_resources_get_one_line_and_nothing_runs(stack, tmp_path, option, value, says):
    marker = tmp_path / "ran"
    batch, scratch = make_batch(tmp_path, [f"touch {marker}"])
    result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                       str(scratch), option, value)
    assert result.returncode == 2 or result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not marker.exists()


@pytest.mark.timeout(180)  # a machine whose free memory shrinks meanwhile would wait on
def test_a_run_waits_for_memory_and_the_wait_is_visible(prefect_api, tmp_path, caplog):
    """Each run reserves its memory: with 60% of what is available per run, only one fits,
    so the others wait (and say so) instead of starting."""
    import logging

    import psutil

    from flows.resources import format_size

    per_run = int(psutil.virtual_memory().available * 0.6) // 1024 * 1024
    times = tmp_path / "times"
    times.mkdir()
    batch, scratch = make_batch(tmp_path, [timed_command(times, f"r{i}", 2.5) for i in range(3)])
    with caplog.at_level(logging.INFO):
        state = sierra(input_root=str(batch), scratch_root=str(scratch), max_parallel=2,
                       memory_per_run=f"{per_run // 1024}K", return_state=True)
    assert state.result()["succeeded"] == 3
    peak, _ = max_overlap(times)
    assert peak == 1
    waits = [r.getMessage() for r in caplog.records if "waits for memory" in r.getMessage()]
    assert waits and f"of the {format_size(per_run)} a run needs" in waits[0], waits


def test_a_timed_out_run_is_retried_and_each_attempt_keeps_its_logs(prefect_api, tmp_path):
    batch, scratch = make_batch(tmp_path, ["echo started; sleep 30"])
    state = sierra(input_root=str(batch), scratch_root=str(scratch), run_timeout=0.5, retries=1,
                   return_state=True)
    summary = state.result(raise_on_failure=False)
    [failed] = summary["failed_runs"]
    assert failed["timed_out"] and failed["reason"] == "timed out" and failed["attempts"] == 2
    logs = sorted(Path(failed["stdout"]).parent.glob("attempt-*.stdout"))
    assert [p.read_text() for p in logs] == ["started\n", "started\n"]


def test_thread_variables_follow_the_cores_unless_the_command_sets_them(prefect_api, tmp_path):
    show = "python3 -c \"import os; print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])\""
    batch, scratch = make_batch(tmp_path, [show, f"OMP_NUM_THREADS=7 {show}"])
    state = sierra(input_root=str(batch), scratch_root=str(scratch), cores_per_run=2,
                   return_state=True)
    assert state.is_completed()
    outputs = sorted(p.read_text() for p in scratch.rglob("attempt-001.stdout"))
    cores = str(min(2, len(CPUS)))
    assert outputs == sorted([f"{cores} {cores}\n", f"7 {cores}\n"])


def test_memory_per_run_beyond_the_host_is_refused_before_any_run(prefect_api, tmp_path):
    marker = tmp_path / "ran"
    batch, scratch = make_batch(tmp_path, [f"touch {marker}"])
    state = sierra(input_root=str(batch), scratch_root=str(scratch), memory_per_run="64T",
                   return_state=True)
    assert state.is_failed() and "is more than this host's" in state.message
    assert not marker.exists()

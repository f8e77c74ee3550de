"""Real SIERRA drives the ``prefectdeploy.local`` plugin against a real stack, end to end."""

from __future__ import annotations

import csv
import itertools
import os

import httpx
import pytest

from benchmarks.common import max_at_once
from flows.plan import batch_tag
from tests import sierra_support as ss
from tests.helpers import base_env

pytestmark = [pytest.mark.sierra, pytest.mark.slow]

N_EXPERIMENTS, N_RUNS = 3, 2
# Seconds each run works: long enough that runs started together overlap even on a
# loaded machine, so "at most the cap at once" can be checked as "exactly the cap".
RUN_SECONDS = "1.5"


def _ok(result):
    assert result.returncode == 0, f"SIERRA exited {result.returncode}:\n{ss.log_tail(result)}"


def _batch_flow_runs(stack, root) -> list[dict]:
    """The flow runs of the one batch under ``root`` (by the batch tag they all carry)."""
    tags = {batch_tag(str(c.parent)) for c in root.rglob("commands.txt")}
    assert len(tags) == 1, tags
    reply = httpx.post(f"{stack.api_url}/flow_runs/filter", timeout=30, headers=stack.headers,
                       json={"flow_runs": {"tags": {"all_": list(tags)}}})
    reply.raise_for_status()
    return reply.json()


def _runs_at_once(batch) -> int:
    """Most runs that overlapped, from the start/end times toysim records per run."""
    intervals = []
    for run_csv in ss.expected_outputs(batch, name="run.csv"):
        with open(run_csv, newline="") as handle:
            row = next(csv.DictReader(handle))
        intervals.append((float(row["start"]), float(row["end"])))
    return max_at_once(intervals)


@pytest.mark.parametrize("paradigm", ["per-batch", "per-exp"])
def test_sierra_stage_1_and_2_through_prefectdeploy_local(stack, tmp_path, paradigm):
    root = tmp_path / "sierra-root"
    result = ss.run_sierra(
        root, execenv="prefectdeploy.local", paradigm=paradigm, n_runs=N_RUNS,
        n_experiments=N_EXPERIMENTS, env=ss.sierra_env(base=stack.env),
        extra_args=["--exec-strict", "--exec-jobs-per-node", "2", "--toysim-duration", RUN_SECONDS],
    )
    _ok(result)
    batch = ss.expected_batch_root(root, N_EXPERIMENTS)
    assert len(ss.expected_outputs(batch)) == N_EXPERIMENTS * N_RUNS
    assert ss.missing_outputs(batch) == []
    # The cap is reached and never passed (per-exp: each experiment's 2 runs together).
    assert _runs_at_once(batch) == 2
    # Our flow ran every run: one success marker each under the scratch root.
    assert len(list(root.rglob("sierra-prefect/runs/*/done.json"))) == N_EXPERIMENTS * N_RUNS
    # The batch's flow runs (one per experiment in the per-exp paradigm) share one tag,
    # so the UI shows them together.
    states = [r["state"]["type"] for r in _batch_flow_runs(stack, root)]
    assert states == ["COMPLETED"] * (N_EXPERIMENTS if paradigm == "per-exp" else 1), states


THREADS = 2  # --physics-n-threads: busy threads per run


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def _check_flow_runs(stack, root, n_flow_runs: int, cores: int) -> None:
    """The flow got cores per run and no cap: a jobs per node filled in for SIERRA stays there."""
    flow_runs = _batch_flow_runs(stack, root)
    assert len(flow_runs) == n_flow_runs
    for fr in flow_runs:
        assert fr["state"]["type"] == "COMPLETED"
        assert fr["parameters"].get("cores_per_run") == cores, fr["parameters"]
        assert fr["parameters"].get("max_parallel") is None, fr["parameters"]


def _check_pinning(batch, label: str, cores: int) -> int:
    """Every run had its own ``cores`` CPUs (all of them if fewer), inherited by its threads,
    OMP_NUM_THREADS = cores, and no two runs that overlapped shared a CPU. Returns the most
    runs at once."""
    want = min(cores, len(os.sched_getaffinity(0)))  # the worker runs on this host, unconfined
    runs = ss.run_resources(batch)
    for run in runs:
        name = "/".join(run["run"].split("/")[-2:])
        print(f"\n[cores] {label} {name}: Cpus_allowed_list {run['cpus_allowed_list']}, "
              f"affinity {run['sched_getaffinity']}, threads {run['thread_affinities']}, "
              f"OMP_NUM_THREADS {run['omp_num_threads']}, {run['start']:.2f}-{run['end']:.2f}")
        assert len(run["cpus_allowed"]) == want, run
        assert run["sched_getaffinity"] == run["cpus_allowed"], run
        assert run["thread_affinities"] == [run["cpus_allowed"]] * THREADS, run
        assert run["omp_num_threads"] == str(cores), run
    for a, b in itertools.combinations(runs, 2):
        if _overlap(a, b):
            assert not set(a["cpus_allowed"]) & set(b["cpus_allowed"]), (a, b)
    return max_at_once((r["start"], r["end"]) for r in runs)


@pytest.mark.parametrize("paradigm", ["per-batch", "per-exp"])
def test_engine_threads_per_run_give_each_run_its_own_cpus(stack, tmp_path, paradigm):
    """The engine declares 2 threads per run and no --exec-jobs-per-node is given: the
    plugin fills jobs per node for SIERRA only, forwards cores per run, and the worker
    runs only as many runs at once as have CPUs of their own."""
    root = tmp_path / "sierra-root"
    result = ss.run_sierra(
        root, execenv="prefectdeploy.local", paradigm=paradigm, n_runs=N_RUNS,
        n_experiments=2, env=ss.sierra_env(base=stack.env),
        extra_args=["--exec-strict", "--physics-n-threads", str(THREADS), "--toysim-duration", "1"],
    )
    _ok(result)
    assert f"Cores per experimental run: {THREADS} (the engine's --physics-n-threads)" in result.stdout
    assert "--exec-jobs-per-node not given" in result.stdout
    batch = ss.expected_batch_root(root, 2)
    assert ss.missing_outputs(batch) == []
    _check_flow_runs(stack, root, 2 if paradigm == "per-exp" else 1, cores=THREADS)

    at_once = _check_pinning(batch, paradigm, cores=THREADS)
    usable = len(os.sched_getaffinity(0))
    assert at_once <= max(1, usable // THREADS), at_once
    if usable // THREADS <= 1:  # this machine (2 CPUs): one run at a time
        assert at_once == 1


def test_exec_cores_per_run_wins_and_pins_concurrent_runs_apart(stack, tmp_path):
    """--exec-cores-per-run 1 overrides the engine's 2 threads: with 2 CPUs or more, a
    per-experiment pair of runs goes together, each pinned to a CPU of its own."""
    usable = len(os.sched_getaffinity(0))
    root = tmp_path / "sierra-root"
    result = ss.run_sierra(
        root, execenv="prefectdeploy.local", paradigm="per-exp", n_runs=N_RUNS,
        n_experiments=2, env=ss.sierra_env(base=stack.env),
        extra_args=["--exec-strict", "--physics-n-threads", str(THREADS),
                    "--exec-cores-per-run", "1", "--toysim-duration", RUN_SECONDS],
    )
    _ok(result)
    assert "Cores per experimental run: 1 (--exec-cores-per-run)" in result.stdout
    batch = ss.expected_batch_root(root, 2)
    assert ss.missing_outputs(batch) == []
    _check_flow_runs(stack, root, 2, cores=1)
    at_once = _check_pinning(batch, "per-exp, --exec-cores-per-run 1", cores=1)
    assert at_once == min(N_RUNS, usable), at_once


def test_exec_retries_reach_the_flow(stack, tmp_path):
    """A run that fails once succeeds on its retry: SIERRA's stage 2 ends green."""
    root = tmp_path / "sierra-root"
    common = dict(execenv="prefectdeploy.local", paradigm="per-batch", n_runs=N_RUNS,
                  n_experiments=2, env=ss.sierra_env(base=stack.env))
    _ok(ss.run_sierra(root, stages=(1,), **common))
    batch = ss.find_batch_root(root)
    marker = ss.make_run_fail_once(ss.run_files(batch)[2])

    result = ss.run_sierra(root, stages=(2,), extra_args=["--exec-strict", "--exec-retries", "1",
                                                          "--exec-retry-delay", "0"], **common)
    _ok(result)
    assert not marker.exists(), "the first attempt ran (and failed)"
    assert ss.missing_outputs(batch) == []
    (flow_run,) = _batch_flow_runs(stack, root)
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["parameters"].get("retries") == 1, flow_run["parameters"]
    # Exactly the victim ran twice, and both attempts kept their logs.
    second = list(root.rglob("sierra-prefect/runs/*/attempt-002.stderr"))
    assert len(second) == 1, second
    first = second[0].with_name("attempt-001.stderr")
    assert "failing once on purpose" in first.read_text()
    assert not list(root.rglob("sierra-prefect/runs/*/attempt-003.*"))


def test_failed_run_fails_sierra_stage_2_and_resume_finishes_it(stack, tmp_path):
    root = tmp_path / "sierra-root"
    env = ss.sierra_env(base=stack.env)
    common = dict(execenv="prefectdeploy.local", paradigm="per-batch", n_runs=N_RUNS,
                  n_experiments=N_EXPERIMENTS, env=env)
    _ok(ss.run_sierra(root, stages=(1,), **common))
    batch = ss.find_batch_root(root)
    victim = ss.run_files(batch)[1]
    marker = ss.make_run_fail(victim)

    strict = ss.run_sierra(root, stages=(2,), extra_args=["--exec-strict"], **common)
    assert strict.returncode != 0, ss.log_tail(strict)
    assert ss.missing_outputs(batch) == [ss.expected_outputs(batch)[1]]

    marker.unlink()
    resumed = ss.run_sierra(root, stages=(2,), extra_args=["--exec-strict", "--exec-resume"], **common)
    _ok(resumed)
    assert ss.missing_outputs(batch) == []
    # Only the failed run ran again: the others kept their first (and only) attempt.
    second_attempts = list(root.rglob("sierra-prefect/runs/*/attempt-002.stdout"))
    assert len(second_attempts) == 1, second_attempts


def test_execenv_check_says_to_run_up_when_there_is_no_stack(tmp_path):
    root = tmp_path / "sierra-root"
    env = ss.sierra_env(base=base_env(tmp_path / "no-stack-home"))
    result = ss.run_sierra(root, execenv="prefectdeploy.local", n_runs=1, n_experiments=2, env=env)
    assert result.returncode != 0
    assert "sierra-prefect up" in result.stdout
    # One line, not SIERRA's "unexpected error" traceback and request for a bug report.
    assert "Traceback" not in result.stdout and "unexpected error" not in result.stdout
    assert ss.missing_outputs(ss.find_batch_root(root)) == ss.expected_outputs(ss.find_batch_root(root))

"""Real SIERRA drives the ``prefectdeploy.local`` plugin against a real stack, end to end."""

from __future__ import annotations

import csv

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
    tags = {batch_tag(str(c.parent)) for c in root.rglob("commands.txt")}
    assert len(tags) == 1, tags
    reply = httpx.post(f"{stack.api_url}/flow_runs/filter", timeout=30,
                       json={"flow_runs": {"tags": {"all_": list(tags)}}})
    states = [r["state"]["type"] for r in reply.json()]
    assert states == ["COMPLETED"] * (N_EXPERIMENTS if paradigm == "per-exp" else 1), states


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
    assert ss.missing_outputs(ss.find_batch_root(root)) == ss.expected_outputs(ss.find_batch_root(root))

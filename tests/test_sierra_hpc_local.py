"""Baseline: real SIERRA, stage 1 and stage 2, the toysim engine, ``hpc.local``.

This proves the test engine/project (``tests/sierra_engine``) work with SIERRA's
own GNU parallel execution environment, so a failure in the Prefect tests is
about Prefect or the plugins, not about the engine.
"""

import csv
import shutil

import pytest

from tests import sierra_support as ss

pytestmark = [
    pytest.mark.sierra,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("parallel") is None, reason="GNU parallel not installed"),
]

N_EXPERIMENTS = 3
N_RUNS = 2
TIMEOUT = 300


def _assert_ok(result):
    assert result.returncode == 0, (
        f"SIERRA exited {result.returncode}; log {result.log_path}:\n{ss.log_tail(result)}"
    )


def _assert_all_outputs(batch_root, steps=5):
    outputs = ss.expected_outputs(batch_root)
    assert len(outputs) == N_EXPERIMENTS * N_RUNS
    assert ss.missing_outputs(batch_root) == []
    for path in outputs:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["step", "value", "noise"]
        assert len(rows) == steps + 1, path


def test_stage1_then_stage2_per_batch(tmp_path):
    """Stage 1 and stage 2 as separate invocations, as users run them."""
    root = tmp_path / "sierra-root"
    common = dict(execenv="hpc.local", paradigm="per-batch", n_runs=N_RUNS,
                  n_experiments=N_EXPERIMENTS, timeout=TIMEOUT)

    stage1 = ss.run_sierra(root, stages=(1,), log_path=tmp_path / "stage1.log", **common)
    _assert_ok(stage1)

    batch = ss.find_batch_root(root)
    assert batch == ss.expected_batch_root(root, N_EXPERIMENTS)
    assert len(ss.run_files(batch)) == N_EXPERIMENTS * N_RUNS
    assert ss.commands_files(batch) == [batch / "commands.txt"]
    assert len(ss.command_lines(batch)) == N_EXPERIMENTS * N_RUNS
    assert len(ss.missing_outputs(batch)) == N_EXPERIMENTS * N_RUNS, "stage 1 ran something"

    stage2 = ss.run_sierra(root, stages=(2,), log_path=tmp_path / "stage2.log", **common)
    _assert_ok(stage2)
    _assert_all_outputs(batch)


def test_stage1_and_2_in_one_invocation_per_exp(tmp_path):
    root = tmp_path / "sierra-root"
    result = ss.run_sierra(
        root, execenv="hpc.local", paradigm="per-exp", n_runs=N_RUNS,
        n_experiments=N_EXPERIMENTS, stages=(1, 2), timeout=TIMEOUT,
        extra_args=["--toysim-steps", "7"],
    )
    _assert_ok(result)
    batch = ss.expected_batch_root(root, N_EXPERIMENTS)
    assert ss.commands_files(batch) == [e / "commands.txt" for e in ss.exp_input_roots(batch)]
    assert all(len(f.read_text().splitlines()) == N_RUNS for f in ss.commands_files(batch))
    _assert_all_outputs(batch, steps=7)


def test_failing_run_fails_stage2_with_exec_strict(tmp_path):
    """toysim's fail marker works, and SIERRA turns a failed command into an error
    only with --exec-strict (without it SIERRA logs and carries on)."""
    root = tmp_path / "sierra-root"
    common = dict(execenv="hpc.local", paradigm="per-batch", n_runs=N_RUNS,
                  n_experiments=N_EXPERIMENTS, timeout=TIMEOUT)
    _assert_ok(ss.run_sierra(root, stages=(1,), **common))
    batch = ss.find_batch_root(root)
    victim = ss.run_files(batch)[1]
    ss.make_run_fail(victim)

    lenient = ss.run_sierra(root, stages=(2,), log_path=tmp_path / "lenient.log", **common)
    _assert_ok(lenient)
    assert ss.missing_outputs(batch) == [ss.expected_outputs(batch)[1]]

    strict = ss.run_sierra(root, stages=(2,), extra_args=["--exec-strict"],
                           log_path=tmp_path / "strict.log", **common)
    assert strict.returncode != 0, ss.log_tail(strict)
    assert ss.missing_outputs(batch) == [ss.expected_outputs(batch)[1]]

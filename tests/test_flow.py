"""The `sierra` flow called directly against a real Prefect server (the session stack)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.sierra_batch import sierra
from tests.helpers import make_batch, wait_until


def run_flow(**params):
    state = sierra(return_state=True, **params)
    return state, state.result(raise_on_failure=False)


def test_failures_are_reported_and_do_not_stop_other_runs(prefect_api, tmp_path):
    batch, scratch = make_batch(tmp_path, [
        "echo ok-0",
        "echo broken >&2; exit 3",
        "echo ok-2",
        "echo ok-3",
    ])
    state, summary = run_flow(input_root=str(batch), scratch_root=str(scratch), max_parallel=2)
    assert state.is_failed()
    assert (summary["total"], summary["succeeded"], summary["failed"], summary["skipped"]) == (4, 3, 1, 0)
    [failed] = summary["failed_runs"]
    assert failed["command"] == "echo broken >&2; exit 3"
    assert failed["exit_code"] == 3
    assert Path(failed["stderr"]).read_text() == "broken\n"
    assert Path(failed["stdout"]).exists()


def test_resume_reruns_only_what_failed_and_keeps_every_log(prefect_api, tmp_path):
    counter = tmp_path / "executions"
    flag = tmp_path / "fixed"
    commands = [f"echo {i} >> {counter}; echo out-{i}" for i in range(5)]
    commands.append(f"echo 5 >> {counter}; echo attempt; test -e {flag}")
    batch, scratch = make_batch(tmp_path, commands)

    state, first = run_flow(input_root=str(batch), scratch_root=str(scratch), max_parallel=3)
    assert state.is_failed() and first["failed"] == 1
    first_stdout = Path(first["failed_runs"][0]["stdout"])

    flag.touch()
    state, second = run_flow(input_root=str(batch), scratch_root=str(scratch), max_parallel=3)
    assert state.is_completed()
    assert (second["succeeded"], second["skipped"], second["failed"]) == (1, 5, 0)
    # Each succeeded run executed exactly once; the failed one twice.
    runs = sorted(counter.read_text().split())
    assert runs == ["0", "1", "2", "3", "4", "5", "5"]
    # The first attempt's log is still there, untouched; the retry got its own.
    assert first_stdout.read_text() == "attempt\n"
    assert (first_stdout.parent / "attempt-002.stdout").read_text() == "attempt\n"


def test_no_resume_runs_everything_again(prefect_api, tmp_path):
    counter = tmp_path / "executions"
    batch, scratch = make_batch(tmp_path, [f"echo {i} >> {counter}" for i in range(3)])
    run_flow(input_root=str(batch), scratch_root=str(scratch))
    state, summary = run_flow(input_root=str(batch), scratch_root=str(scratch), resume=False)
    assert state.is_completed() and summary["skipped"] == 0
    assert len(counter.read_text().split()) == 6


def test_timeout_kills_the_whole_process_group(prefect_api, tmp_path):
    child_pid = tmp_path / "child.pid"
    batch, scratch = make_batch(tmp_path, [
        # The run starts a child that would outlive it, then waits forever.
        f"sleep 300 & echo $! > {child_pid}; wait",
        "echo quick",
    ])
    state, summary = run_flow(
        input_root=str(batch), scratch_root=str(scratch), max_parallel=2, run_timeout=1.5
    )
    assert state.is_failed()
    assert (summary["succeeded"], summary["failed"]) == (1, 1)
    [failed] = summary["failed_runs"]
    assert failed["timed_out"] is True and failed["exit_code"] is None
    pid = int(child_pid.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, 10, f"child pid {pid} of the timed-out run to be killed")


def test_one_experiment_per_experiment_paradigm(prefect_api, tmp_path):
    exp = tmp_path / "batch" / "c1-exp2"
    exp.mkdir(parents=True)
    (exp / "commands.txt").write_text("true\ntrue\n")
    state, summary = run_flow(input_root=str(exp), scratch_root=str(tmp_path / "scratch" / "c1-exp2"))
    assert state.is_completed() and summary["succeeded"] == 2


def test_bad_input_fails_before_any_run(prefect_api, tmp_path):
    batch, _ = make_batch(tmp_path, ["touch should-not-exist"])
    state = sierra(input_root=str(batch), scratch_root="relative/scratch", return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="scratch_root 'relative/scratch' is relative"):
        state.result()
    assert not (batch / "should-not-exist").exists()


def test_commands_not_utf8_end_run_with_one_line(stack, tmp_path):
    """Through the real CLI: the file, the line and the fix; nothing runs, nothing is removed."""
    batch = tmp_path / "batch"
    batch.mkdir()
    content = f"touch {tmp_path}/ran-0\ntouch {tmp_path}/ran-1 # caf\xe9\n".encode("latin-1")
    (batch / "commands.txt").write_bytes(content)
    scratch = tmp_path / "scratch"
    result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"sierra-prefect: error: '{batch / 'commands.txt'}' line 2 is not UTF-8 (byte 0xe9): "
                     "save it as UTF-8 or regenerate it with SIERRA stage 1"], result.stderr
    assert (batch / "commands.txt").read_bytes() == content
    assert not list(tmp_path.glob("ran-*")) and not scratch.exists()

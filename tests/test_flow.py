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


# -- what the UI shows: read back from the real server with Prefect's client ------------

def _flow_run_id(summary_state):
    return summary_state.state_details.flow_run_id


def _artifacts(flow_run_id, kind: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=[kind])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )


def _task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def test_ui_shows_a_task_run_per_experiment_progress_and_run_tables(prefect_api, tmp_path,
                                                                   monkeypatch):
    import json

    import flows.tracking

    monkeypatch.setattr(flows.tracking, "PAGE_ROWS", 2)  # c1-exp0's 3 runs fill 2 pages
    out = tmp_path / "out"
    batch, scratch = make_batch(tmp_path, [
        f"echo c1-exp0 > {out}-0", f"echo c1-exp0 > {out}-1", f"echo c1-exp0 > {out}-2",
        "echo c1-exp1 ok",
        "echo c1-exp1; for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line-$i >&2; done; exit 4",
    ])
    state, summary = run_flow(input_root=str(batch), scratch_root=str(scratch), max_parallel=2)
    assert state.is_failed() and (summary["succeeded"], summary["failed"]) == (4, 1)
    [failed] = summary["failed_runs"]
    # The last lines of its stderr are in the summary (and so in the CLI and the UI).
    assert failed["stderr_tail"] == "\n".join(f"line-{i}" for i in range(3, 13))
    assert failed["attempt"] == 1
    flow_run_id = _flow_run_id(state)

    # One task run per experiment (not one per run), reaching the server through events.
    tasks = wait_until(lambda: (t := _task_runs(flow_run_id)) and
                       all(r.state and r.state.is_final() for r in t.values()) and
                       len(t) == 2 and t, 60, "the experiments' task runs to be final")
    assert sorted(tasks) == ["c1-exp0", "c1-exp1"]
    assert tasks["c1-exp0"].state.is_completed() and tasks["c1-exp1"].state.is_failed()

    [progress] = _artifacts(flow_run_id, "progress")
    assert progress.data == 100.0
    assert progress.description == "5 of 5 runs done: 4 succeeded, 1 failed, 0 skipped"

    tables = {a.description: a for a in _artifacts(flow_run_id, "table")}
    assert sorted(tables) == ["c1-exp0: runs (page 1)", "c1-exp0: runs (page 2)",
                              "c1-exp1: runs (page 1)"]
    rows = {row["run"]: row for a in tables.values() for row in json.loads(a.data)}
    assert sorted(rows) == ["c1-exp0-run0", "c1-exp0-run1", "c1-exp0-run2", "c1-exp1-run0",
                            "c1-exp1-run1"]
    bad = rows["c1-exp1-run1"]
    assert (bad["state"], bad["exit code"], bad["attempt"]) == ("FAILED", 4, 1)
    assert bad["stderr"] == failed["stderr"] and bad["stdout"] == failed["stdout"]
    good = rows["c1-exp0-run2"]
    assert (good["state"], good["exit code"]) == ("COMPLETED", 0) and good["seconds"] >= 0
    assert Path(good["stdout"]).name == "attempt-001.stdout"
    # Each table hangs off its experiment's task run: batch -> experiment -> run.
    assert tables["c1-exp1: runs (page 1)"].task_run_id == tasks["c1-exp1"].id
    assert tables["c1-exp0: runs (page 2)"].task_run_id == tasks["c1-exp0"].id

    [markdown] = _artifacts(flow_run_id, "markdown")
    assert "line-12" in markdown.data and "c1-exp1-run1: last lines of stderr" in markdown.data


def test_progress_and_run_states_are_live_while_the_batch_runs(prefect_api, tmp_path):
    import contextvars
    import json
    import threading

    go = tmp_path / "go"
    batch, scratch = make_batch(tmp_path, [
        "true", "true", "true", f"while [ ! -e {go} ]; do sleep 0.05; done",
    ])
    result = {}
    context = contextvars.copy_context()  # the prefect_api settings, in the thread too
    name = f"live-{tmp_path.name}"  # to find this flow run's artifacts among others
    named = sierra.with_options(flow_run_name=name)
    thread = threading.Thread(target=context.run, args=(lambda: result.update(
        state=named(input_root=str(batch), scratch_root=str(scratch), max_parallel=4,
                    return_state=True)),))
    thread.start()
    try:
        def progress_of_this_batch():
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import (
                ArtifactFilter,
                ArtifactFilterType,
                FlowRunFilter,
                FlowRunFilterName,
            )

            with get_client(sync_client=True) as client:
                found = client.read_artifacts(
                    artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
                    flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
            return [a for a in found if a.description == "3 of 4 runs done: 3 succeeded, "
                    "0 failed, 0 skipped"]

        [progress] = wait_until(progress_of_this_batch, 60, "the progress artifact at 3 of 4")
        assert progress.data == 75.0
        tables = wait_until(lambda: _artifacts(progress.flow_run_id, "table"), 30, "a run table")
        rows = {row["run"]: row["state"] for row in json.loads(tables[0].data)}
        assert rows["batch-run3"] == "RUNNING"
        assert thread.is_alive()
    finally:
        go.touch()
        thread.join(60)
    assert result["state"].is_completed()
    [progress] = _artifacts(progress.flow_run_id, "progress")
    assert progress.description == "4 of 4 runs done: 4 succeeded, 0 failed, 0 skipped"

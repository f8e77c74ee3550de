"""Pure units: commands.txt parsing, run identity, logs, markers, summary, pool files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import max_at_once
from flows.plan import (
    BatchInputError,
    check_roots,
    is_done,
    mark_done,
    new_attempt_logs,
    plan_runs,
    read_commands,
    run_dir,
    run_id_for,
)
from flows.summary import BatchSummary, FailedRun


def test_commands_are_non_empty_lines(tmp_path):
    (tmp_path / "commands.txt").write_text("a\n\n  b  \n\n")
    assert read_commands(tmp_path) == ["a", "b"]


@pytest.mark.parametrize("content", [None, "", "\n  \n"])
def test_missing_or_empty_commands_is_a_clear_error(tmp_path, content):
    if content is not None:
        (tmp_path / "commands.txt").write_text(content)
    with pytest.raises(BatchInputError, match="commands.txt") as info:
        read_commands(tmp_path)
    assert "stage 1" in str(info.value)


def test_roots_must_be_absolute_directories(tmp_path):
    with pytest.raises(BatchInputError, match="input_root 'rel' is relative"):
        check_roots("rel", str(tmp_path))
    with pytest.raises(BatchInputError, match="scratch_root 'x' is relative"):
        check_roots(str(tmp_path), "x")
    with pytest.raises(BatchInputError, match="is not a directory"):
        check_roots(str(tmp_path / "missing"), str(tmp_path))
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(BatchInputError, match="is a file"):
        check_roots(str(tmp_path), str(a_file))
    assert a_file.read_text() == "keep me"


def test_run_identity_is_stable_and_changes_with_the_command():
    assert run_id_for(3, "echo a") == run_id_for(3, "echo a")
    assert run_id_for(3, "echo a") != run_id_for(3, "echo b")
    assert run_id_for(3, "echo a") != run_id_for(4, "echo a")


def test_runs_are_named_after_experiment_and_index(tmp_path):
    commands = [
        "sim --out /b/exp-outputs/c1-exp0/run0",
        "sim --out /b/exp-outputs/c1-exp0/run1",
        "sim --out /b/exp-outputs/c1-exp1/run0",
        "no experiment here",
    ]
    names = [r.name for r in plan_runs(tmp_path / "c2-exp7", commands)]
    assert names == ["c1-exp0-run0", "c1-exp0-run1", "c1-exp1-run0", "c2-exp7-run0"]


def test_attempt_logs_never_overwrite(tmp_path):
    first = new_attempt_logs(tmp_path)
    first[0].write_text("attempt 1 output")
    second = new_attempt_logs(tmp_path)
    assert second[0] != first[0] and second[1] != first[1]
    assert first[0].read_text() == "attempt 1 output"
    assert [p.name for p in second] == ["attempt-002.stdout", "attempt-002.stderr"]


def test_marker_is_for_this_exact_command(tmp_path):
    run = plan_runs(tmp_path, ["echo a"])[0]
    assert not is_done(tmp_path, run)
    mark_done(tmp_path, run, {"exit_code": 0})
    assert is_done(tmp_path, run)
    marker = run_dir(tmp_path, run) / "done.json"
    assert json.loads(marker.read_text())["command"] == "echo a"
    # A half-written or foreign marker never counts as success.
    marker.write_text('{"command": "echo a"')
    assert not is_done(tmp_path, run)
    assert not list(marker.parent.glob(".done.json.*")), "no temp files left behind"


def test_summary_markdown_lists_failed_runs():
    summary = BatchSummary(
        input_root="/in", scratch_root="/s", total=3, succeeded=1, failed=1, skipped=1,
        max_parallel=2,
        failed_runs=[FailedRun(name="c1-exp0-run1", run_id="x", command="sim | tee",
                               exit_code=None, stdout="/s/o", stderr="/s/e", attempts=2,
                               reason="memory limit 2.0G exceeded")],
        retried={"c1-exp0-run2": 3}, cores_per_run=2, memory_per_run=2 * 1024**3, retries=2,
    )
    text = summary.to_markdown()
    assert "| 3 | 1 | 1 | 1 |" in text
    assert "| c1-exp0-run1 | None | memory limit 2.0G exceeded | 2 | `sim \\| tee` |" in text
    assert "| c1-exp0-run2 | 3 |" in text  # succeeded on its third attempt
    assert "2 CPU(s) each (pinned), 2.0G memory each, up to 2 retries" in text
    assert not summary.ok


def test_pool_files_are_valid_and_complete():
    from sierra_prefect.pools import WorkPoolSpec

    specs = {s.name: s for s in WorkPoolSpec.load_all(Path(__file__).parent.parent / "workpools")}
    assert specs["sierra-pool"].type == "sierra-process"
    assert [q.name for q in specs["sierra-pool"].queues] == ["sierra-queue"]
    assert specs["sierra-docker-pool"].type == "sierra-docker"
    template = specs["sierra-docker-pool"].base_job_template()
    assert template["variables"]["properties"]["network_mode"]["default"] == "host"


def test_pool_file_with_unknown_job_variable_is_rejected(tmp_path):
    from sierra_prefect.errors import ShimError
    from sierra_prefect.pools import WorkPoolSpec

    (tmp_path / "p.yaml").write_text("name: p\ntype: process\njob_variables: {nope: 1}\n")
    spec = WorkPoolSpec.load_all(tmp_path)[0]
    with pytest.raises(ShimError, match="'nope' is not a job variable"):
        spec.base_job_template()


def test_allowed_roots_resolve_dotdot_and_symlinks(tmp_path):
    from flows.plan import check_allowed

    allowed = tmp_path / "allowed"
    (allowed / "batch").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (allowed / "sneaky").symlink_to(outside)
    check_allowed({"input_root": str(allowed / "batch")}, str(allowed))
    check_allowed({"input_root": str(outside)}, None)  # no limit configured
    for bad in [outside, allowed / ".." / "outside", allowed / "sneaky"]:
        with pytest.raises(BatchInputError, match="is outside the allowed roots"):
            check_allowed({"input_root": str(bad)}, f"{tmp_path / 'elsewhere'}:{allowed}")


def test_commands_that_are_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "commands.txt"
    path.write_bytes(b"echo one\necho two\necho caf\xe9\necho four\n")
    with pytest.raises(BatchInputError) as info:
        read_commands(tmp_path)
    message = str(info.value)
    assert f"'{path}' line 3 is not UTF-8" in message and "\n" not in message
    assert "save it as UTF-8" in message
    assert path.read_bytes().startswith(b"echo one")  # left as it was


# -- the scheduler: the only place that decides how many runs go at once ---------------

def _schedule(scheduler, durations: list[float]):
    """Run 'runs' that sleep; record (start, end, running-at-start) per run."""
    import threading
    import time

    lock = threading.Lock()
    log, starts = {}, []

    def execute(i, placement):
        started = time.monotonic()
        with lock:
            starts.append(i)
        time.sleep(durations[i])
        return (started, time.monotonic())

    scheduler.run(range(len(durations)), execute=execute,
                  on_done=lambda i, result: log.__setitem__(i, result),
                  on_error=lambda i, exc: exc)
    return log, starts


def test_scheduler_holds_the_cap_exactly_and_leaves_no_slot_idle():
    from flows.scheduler import Scheduler

    # Run 0 is long; the short ones must flow through the other two slots meanwhile.
    class Recording(Scheduler):
        """Admission order, recorded where it is decided (the loop, under its lock); the
        order in which worker threads get going afterwards is the OS's."""

        def __init__(self, cap):
            super().__init__(cap)
            self.admitted = []

        def admit(self, run):
            self.admitted.append(run)
            return super().admit(run)

    durations = [1.5] + [0.05] * 12
    scheduler = Recording(3)
    log, starts = _schedule(scheduler, durations)
    assert sorted(log) == list(range(13)) and sorted(starts) == list(range(13))
    assert scheduler.admitted == list(range(13))  # in queue order
    assert scheduler.most_at_once == 3 and scheduler.running == 0
    assert max_at_once(log.values()) <= 3
    # 12 short runs over 2 free slots take ~6 x 0.05 s: all done before the long one,
    # which they could not be if a slot idled while runs waited.
    assert max(log[i][1] for i in range(1, 13)) < log[0][1]


def test_scheduler_asks_has_room_for_the_run_at_the_head():
    """Admission beyond the cap (e.g. memory) is the same question: a subclass answers it."""
    from flows.scheduler import Scheduler

    class Weighted(Scheduler):
        """Room for runs whose weights sum to at most 2 (run 0 weighs 2)."""

        def __init__(self):
            super().__init__(cap=4)
            self.weight = self.most_weight = 0

        def has_room(self, run):
            return self.weight + (2 if run == 0 else 1) <= 2 and super().has_room(run)

        def admit(self, run):
            placement = super().admit(run)
            self.weight += 2 if run == 0 else 1
            self.most_weight = max(self.most_weight, self.weight)
            return placement

        def release(self, run):
            super().release(run)
            self.weight -= 2 if run == 0 else 1

    def execute(run, placement):
        import time
        time.sleep(0.05)
        return run

    scheduler = Weighted()
    done = []
    scheduler.run(range(5), execute=execute,
                  on_done=lambda run, result: done.append(result), on_error=lambda r, e: e)
    assert sorted(done) == list(range(5))
    assert scheduler.most_weight == 2 and scheduler.most_at_once == 2 and scheduler.weight == 0


def test_scheduler_reports_a_run_that_could_not_execute_and_goes_on():
    from flows.scheduler import Scheduler

    def execute(run, placement):
        if run == 1:
            raise OSError("no space left")
        return "ok"

    results = {}
    Scheduler(2).run(range(3), execute=execute,
                     on_done=lambda run, result: results.__setitem__(run, result),
                     on_error=lambda run, exc: f"error: {exc}")
    assert results == {0: "ok", 1: "error: no space left", 2: "ok"}


def test_batch_tag_is_the_same_for_a_batch_and_each_of_its_experiments(tmp_path):
    from flows.plan import batch_tag

    batch = tmp_path / "toysim-toyparam.C2"
    per_batch = batch_tag(str(batch / "exp-inputs"))
    assert per_batch == batch_tag(str(batch / "exp-inputs" / "c1-exp0"))
    assert per_batch == batch_tag(str(batch / "exp-inputs" / "c1-exp1"))
    assert per_batch.startswith("sierra-batch:toysim-toyparam.C2-")
    assert batch_tag(str(tmp_path / "other" / "exp-inputs")) != per_batch


def test_tail_gives_the_last_lines_of_a_log(tmp_path):
    from flows.plan import tail

    log = tmp_path / "attempt-001.stderr"
    log.write_text("".join(f"line {i}\n" for i in range(1, 5001)))
    assert tail(log, lines=3) == "line 4998\nline 4999\nline 5000"
    assert tail(tmp_path / "missing") == ""
    log.write_bytes(b"\xff\xfebad bytes\n")
    assert tail(log) == "\ufffd\ufffdbad bytes"

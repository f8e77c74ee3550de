"""The stack as a user drives it: `sierra-prefect up/status/run/down` in a temp home."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.helpers import (
    CLI,
    base_env,
    make_batch,
    max_overlap,
    prefect_version,
    sierra_prefect,
    timed_command,
    wait_until,
)


def test_status_reports_versions_pids_pools_and_deployments(stack):
    status = stack.status()
    assert status["healthy"] is True
    assert status["api_url"].startswith("http://127.0.0.1:")
    assert status["prefect_client_version"] == status["prefect_server_version"] == prefect_version()
    assert psutil.pid_exists(status["pids"]["server"])
    assert len(status["pids"]["workers"]) == 1
    assert {"sierra/local", "sierra/dockerremote"} <= set(status["deployments"])
    assert status["pools"]["sierra-pool"]["type"] == "sierra-process"
    assert status["pools"]["sierra-pool"]["workers_online"]
    plain = stack.cli("status").stdout
    assert f"processes:    server {status['pids']['server']}, warm engine " in plain, plain
    assert f"ui:           {status['ui_url']}" in plain


def _engine_pids(home: Path, flow_run_id: str) -> list[int]:
    log = home / "logs" / "warm-engine.log"
    prefix = f"flow run {flow_run_id}: engine pid "
    return [int(line.removeprefix(prefix)) for line in log.read_text().splitlines()
            if line.startswith(prefix)]


def test_flow_runs_fork_from_the_warm_engine(stack, tmp_path):
    """The process worker's flow runs are Prefect's engine forked from the warm engine
    (sierra_prefect/warm_engine.py), not a Python started cold; the exit code comes back."""
    warm = stack.status()["pids"]["warm_engine"]
    assert warm and psutil.pid_exists(warm)
    seen = tmp_path / "engine.pid"
    # setpriv execs the run's bash, so its parent is the flow-run process: the engine.
    batch, scratch = make_batch(tmp_path, [f"echo $PPID > {seen}"])
    result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                       str(scratch), "--json")
    assert result.returncode == 0, result.stderr
    flow_run_id = json.loads(result.stdout)["flow_run_id"]
    assert _engine_pids(stack.home, flow_run_id) == [int(seen.read_text())]
    wait_until(lambda: f"engine pid {seen.read_text().strip()} exited 0" in
               (stack.home / "logs" / "warm-engine.log").read_text(), 30, "the engine's exit 0")
    # `run` itself (what SIERRA calls) was forked from the warm engine as well.
    assert any(line.startswith("sierra-prefect run sierra/local") and ": engine pid" in line
               for line in (stack.home / "logs" / "warm-engine.log").read_text().splitlines())


def test_ctrl_c_cancels_the_flow_run_and_ends_its_runs(stack, tmp_path):
    """Ctrl-C on `run`: the shim cancels the flow run, the worker signals its process (the
    warm engine's client relays it to the engine), and the running command ends."""
    pid_file = tmp_path / "run.pid"
    batch, scratch = make_batch(tmp_path, [f"echo $$ > {pid_file}; exec sleep 300"])
    proc = subprocess.Popen(
        [CLI, "run", "sierra/local", "--input-root", str(batch),
         "--scratch-root", str(scratch), "--json"],
        env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 180, "the run to start")
        run_pid = int(pid_file.read_text())
        os.killpg(proc.pid, signal.SIGINT)  # our own CLI's group: Ctrl-C
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert json.loads(out)["state"] == "CANCELLED", err
    wait_until(lambda: not psutil.pid_exists(run_pid) or psutil.Process(run_pid).status() == "zombie",
               60, "the cancelled run's process to end")


@pytest.mark.parametrize("over", [False, True], ids=["below-cpus", "above-cpus"])
def test_cap_holds_exactly_through_the_deployment(stack, tmp_path, over):
    """Runs at once = min(--max-parallel, CPUs // cores per run): a cap below the CPUs is
    held exactly, one above them is bounded by the CPUs (one core per run by default)."""
    cpus = len(os.sched_getaffinity(0))
    cap = cpus + 2 if over else max(1, cpus - 1)
    expected = cpus if over else cap
    runs, seconds = 4 * expected, 0.5
    times = tmp_path / "times"
    times.mkdir()
    batch, scratch = make_batch(tmp_path, [timed_command(times, f"r{i}", seconds) for i in range(runs)])
    result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                       str(scratch), "--max-parallel", str(cap), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["succeeded"] == runs and summary["max_parallel"] == expected
    peak, span = max_overlap(times)
    ideal = runs / expected * seconds
    print(f"\ncap test: max overlap {peak} (cap {cap}, {cpus} CPUs), runs span {span:.2f} s, "
          f"ideal {ideal:.2f} s")
    assert peak == expected


def test_run_reports_failures_in_json_and_exit_code(stack, tmp_path):
    batch, scratch = make_batch(tmp_path, ["echo fine", "echo bad >&2; exit 7"])
    result = stack.cli("run", "sierra/local", "--input-root", str(batch),
                       "--scratch-root", str(scratch), "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (2, 1, 1)
    [failed] = summary["failed_runs"]
    assert failed["exit_code"] == 7 and failed["command"] == "echo bad >&2; exit 7"
    assert Path(failed["stderr"]).read_text() == "bad\n"
    assert Path(failed["stdout"]).is_file()
    assert summary["state"] == "FAILED"


def test_failed_runs_last_stderr_lines_are_in_the_cli_summary(stack, tmp_path):
    batch, scratch = make_batch(tmp_path, [
        "true", "for i in $(seq 1 30); do echo problem-$i >&2; done; exit 9"])
    result = sierra_prefect("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                            str(scratch), env={**stack.env, "COLUMNS": "300"})
    assert result.returncode == 1
    assert "FAILED batch-run1 (exit 9)" in result.stdout
    shown = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("| ")]
    assert shown == [f"| problem-{i}" for i in range(21, 31)], result.stdout


def test_progress_comes_from_the_flow_while_it_runs(stack, tmp_path):
    """The CLI's progress is the flow's progress artifact, read while runs still go."""
    go = tmp_path / "go"
    batch, scratch = make_batch(tmp_path, [
        "true", "exit 1", f"while [ ! -e {go} ]; do sleep 0.05; done"])
    log = tmp_path / "cli.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [CLI, "run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch),
             "--max-parallel", "3"], env=stack.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "progress: 2/3 runs done (1 failed, 0 skipped)" in log.read_text(),
                   120, "the CLI to show 2 of 3 runs done while the third waits")
        assert proc.poll() is None
    finally:
        go.touch()
        proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 1 and "progress: 3/3 runs done (1 failed, 0 skipped)" in text, text


def test_plain_output_shows_progress_and_summary(stack, tmp_path):
    batch, scratch = make_batch(tmp_path, ["true"] * 3)
    result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch))
    assert result.returncode == 0, result.stderr
    assert "progress: 3/3 runs done" in result.stdout
    assert "COMPLETED: 3 runs: 3 succeeded, 0 failed, 0 skipped" in result.stdout
    # Second time round everything is skipped (resume is on by default).
    again = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch))
    assert again.returncode == 0 and "3 skipped" in again.stdout


@pytest.mark.parametrize(
    "case, expected",
    [
        ("relative input", "input_root 'batch' is relative"),
        ("missing input", "is not a directory: run SIERRA stage 1 first"),
        ("scratch is a file", "is a file, not a directory"),
        ("no commands", "does not exist: run SIERRA stage 1"),
        ("empty commands", "has no commands"),
        ("unknown deployment", "deployment 'sierra/nope' does not exist"),
        ("bad param", "--param 'oops' is not KEY=VALUE"),
        ("unknown param", "has no parameter colour"),
        ("bad mount", "--mount 'x' is not SRC:DST"),
    ],
)
def test_bad_input_is_one_clear_line_and_deletes_nothing(stack, tmp_path, case, expected):
    batch, scratch = make_batch(tmp_path, ["touch ran"])
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    args = ["--input-root", str(batch), "--scratch-root", str(scratch)]
    deployment = "sierra/local"
    if case == "relative input":
        args[1] = "batch"
    elif case == "missing input":
        args[1] = str(tmp_path / "nowhere")
    elif case == "scratch is a file":
        args[3] = str(keep)
    elif case == "no commands":
        (batch / "commands.txt").unlink()
    elif case == "empty commands":
        (batch / "commands.txt").write_text("\n\n")
    elif case == "unknown deployment":
        deployment = "sierra/nope"
    elif case == "bad param":
        args += ["--param", "oops"]
    elif case == "unknown param":
        args += ["--param", "colour=blue"]
    elif case == "bad mount":
        args += ["--mount", "x"]
    result = stack.cli("run", deployment, *args, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sierra-prefect: error: "), result.stderr
    assert expected in lines[0]
    assert keep.read_text() == "precious"
    assert not (batch / "ran").exists()


def test_unreachable_server_is_a_clear_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**base_env(tmp_path / "home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    batch, scratch = make_batch(tmp_path, ["true"])
    result = sierra_prefect("run", "sierra/local", "--input-root", str(batch),
                            "--scratch-root", str(scratch), env=env, timeout=60)
    assert result.returncode != 0
    assert "is unreachable: start it with `sierra-prefect up`" in result.stderr
    check = sierra_prefect("check", "sierra/local", env=env, timeout=60)
    assert check.returncode != 0 and "unreachable" in check.stderr


def test_no_server_known_says_to_run_up(tmp_path):
    result = sierra_prefect("check", "sierra/local", env=base_env(tmp_path / "home"), timeout=60)
    assert result.returncode != 0
    assert "run `sierra-prefect up`" in result.stderr


def test_pools_apply_is_idempotent_and_repairs_drift(stack, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    first = stack.cli("pools", "apply")
    assert first.returncode == 0 and "pools up to date" in first.stdout
    with get_client(sync_client=True) as client:
        client.update_work_pool("sierra-pool", WorkPoolUpdate(description="drifted", concurrency_limit=1))
        queues = client.read_work_queues(work_pool_name="sierra-pool")
        [queue] = [q for q in queues if q.name == "sierra-queue"]
        client.update_work_queue(queue.id, priority=9)
    repaired = stack.cli("pools", "apply")
    assert repaired.returncode == 0
    assert "updated pool sierra-pool: concurrency_limit, description" in repaired.stdout
    assert "updated queue sierra-pool/sierra-queue" in repaired.stdout
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("sierra-pool")
        assert pool.description.startswith("SIERRA") and pool.concurrency_limit is None
    assert "pools up to date" in stack.cli("pools", "apply").stdout


def test_plugin_path_and_env(stack):
    path = Path(stack.cli("plugin-path", check=True).stdout.strip())
    assert (path / "prefectdeploy" / "local" / ".sierraplugin").is_file()
    env = stack.cli("env", check=True).stdout
    assert f"export PREFECT_API_URL={stack.api_url}" in env


def test_lifecycle_restart_worker_down_and_stale_state(fresh_stack, tmp_path):
    before = fresh_stack.status()["pids"]
    worker = before["workers"][0]
    os.kill(worker, signal.SIGKILL)  # our own worker, by pid
    wait_until(lambda: not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie",
               10, "worker to die")

    again = fresh_stack.cli("up", check=True)
    after = fresh_stack.status()["pids"]
    assert after["server"] == before["server"], "the server is kept"
    assert after["workers"] and after["workers"] != [worker], "a new worker is started"
    assert "starting process worker" in again.stderr

    # A batch runs on the repaired stack.
    batch, scratch = make_batch(tmp_path, ["true"])
    run = fresh_stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch))
    assert run.returncode == 0, run.stderr

    socket_file = fresh_stack.home / "warm-engine.sock"
    assert socket_file.is_socket()
    down = fresh_stack.cli("down", check=True)
    assert not socket_file.exists(), "down leaves no warm-engine socket behind"
    assert f"stopped server (pid {after['server']})" in down.stdout
    assert f"stopped warm-engine (pid {after['warm_engine']})" in down.stdout
    for pid in [after["server"], *after["workers"], after["warm_engine"]]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    nothing = fresh_stack.cli("down")
    assert nothing.returncode == 0 and "nothing running" in nothing.stdout

    # A stale state file whose pid now belongs to another program: never signalled.
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        state_file = fresh_stack.home / "stack.json"
        state = json.loads(state_file.read_text())
        state["server"] = {"role": "server", "pid": bystander.pid, "create_time": 12345.0,
                           "argv": ["prefect", "server", "start"], "log": "/nonexistent"}
        state_file.write_text(json.dumps(state))
        result = fresh_stack.cli("down")
        assert result.returncode == 0
        assert f"server pid {bystander.pid} was already gone (or is now another program's)" in result.stdout
        assert bystander.poll() is None, "the bystander must still run"
    finally:
        bystander.terminate()
        bystander.wait(timeout=10)


def test_up_on_a_taken_port_fails_and_touches_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = sierra_prefect("up", "--port", str(port), env=base_env(home), timeout=120)
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is taken by another program" in result.stderr
    assert (home / "notes.txt").read_text() == "mine"
    state = home / "stack.json"
    assert not state.exists() or json.loads(state.read_text())["server"] is None


def _forked_help_count(stack) -> int:
    log = (stack.home / "logs" / "warm-engine.log").read_text()
    return log.count("sierra-prefect run --help: engine pid")


@pytest.mark.parametrize("warm", [True, False], ids=["stack-up-forked", "no-stack"])
def test_cli_usage_names_sierra_prefect_and_a_bad_value_is_one_line(stack, tmp_path, warm):
    """With a stack up, `run` and `check` are forked from its warm engine (there the CLI
    runs as `python -m sierra_prefect.cli`): usage and errors must still say sierra-prefect."""
    env = stack.env if warm else base_env(tmp_path / "no-stack-home")
    forked_before = _forked_help_count(stack)
    for command in ("run", "check"):
        result = sierra_prefect(command, "--help", env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"Usage: sierra-prefect {command} [OPTIONS]" in result.stdout, result.stdout
        assert "python -m" not in result.stdout
    assert (_forked_help_count(stack) > forked_before) == warm, "forked exactly when warm"
    bad = sierra_prefect("run", "sierra/local", "--input-root", str(tmp_path), "--scratch-root",
                         str(tmp_path / "s"), "--max-parallel", "abc", env=env, timeout=120)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    assert lines[0].startswith("sierra-prefect: error: Invalid value for '--max-parallel'")
    assert "see `sierra-prefect run --help`" in lines[0] and "python -m" not in lines[0]
    assert bad.stdout == "" and not (tmp_path / "s").exists()


def test_up_with_another_port_while_up_is_refused_and_stops_nothing(stack):
    before = stack.status()
    running = int(stack.api_url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        other = sock.getsockname()[1]
    result = stack.cli("up", "--port", str(other), timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"already up on port {running}" in lines[0]
    assert "`sierra-prefect down` first" in lines[0] and "drop --port" in lines[0]
    after = stack.status()
    assert after["healthy"] and after["api_url"] == stack.api_url
    assert after["pids"] == before["pids"]
    # The same port, or none: the warm path as before.
    assert stack.cli("up", "--port", str(running), timeout=120).returncode == 0

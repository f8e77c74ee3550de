"""Scale and security, against real servers on 127.0.0.1.

- a stack on a real PostgreSQL (``SIERRA_PREFECT_DATABASE_URL``), then ten batches triggered
  at once on it;
- two stacks side by side on one machine (two values of SIERRA_PREFECT_HOME);
- a server exposed beyond loopback only with an auth string, which never leaks;
- a worker confined to SIERRA_PREFECT_ALLOWED_ROOTS (``..`` and symlinks can't lead out);
- a hung run killed with its children on --run-timeout;
- a scratch root on a read-only or a full filesystem.

Every stack is brought up with ``sierra-prefect up`` in its own temp home and brought down
with ``sierra-prefect down``; PostgreSQL is stopped with ``pg_ctl stop``; tmpfs mounts are
unmounted. Nothing is killed by name.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from uuid import UUID

import httpx
import psutil
import pytest

from tests.helpers import (
    CLI,
    StackHandle,
    base_env,
    make_batch,
    prefect_version,
    sierra_prefect,
    until_two_workers,
    wait_until,
)
from tests.postgres_support import PostgresServer

FLOW_RUN_LINE = re.compile(r"flow run \S+ \(([0-9a-f-]{36})\) of ")


# -- helpers ---------------------------------------------------------------------------


@dataclass
class Started:
    """A stack whose `sierra-prefect up` has run (successfully or not)."""

    home: Path
    env: dict[str, str]
    up: subprocess.CompletedProcess

    def assert_up(self) -> None:
        assert self.up.returncode == 0, f"up exited {self.up.returncode}:\n{self.up.stdout}\n{self.up.stderr}"

    @cached_property
    def handle(self) -> StackHandle:
        self.assert_up()
        status = json.loads(sierra_prefect("status", "--json", env=self.env, check=True).stdout)
        return StackHandle(home=self.home, env=self.env, api_url=status["api_url"])


def up_at_once(*stacks: tuple[Path, list[str], dict[str, str]]) -> list[Started]:
    """Run `sierra-prefect up ARGS` for several homes concurrently; wait for all of them."""
    started = []
    for home, args, extra_env in stacks:
        env = {**base_env(home), **extra_env}
        proc = subprocess.Popen([CLI, "up", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        started.append((home, env, args, proc))
    results = []
    try:
        for home, env, args, proc in started:
            stdout, stderr = proc.communicate(timeout=400)
            results.append(Started(home, env, subprocess.CompletedProcess(
                [CLI, "up", *args], proc.returncode, stdout, stderr)))
    finally:
        for *_, proc in started:  # only after a timeout: our own `up` processes, by handle
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@contextmanager
def prefect_client(api_url: str, auth_string: str | None = None) -> Iterator[object]:
    """Prefect's own sync client for one server, in this process."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth_string}):
        with get_client(sync_client=True) as client:
            yield client


def flow_run_ids(api_url: str, auth_string: str | None = None) -> set[str]:
    with prefect_client(api_url, auth_string) as client:
        return {str(run.id) for run in client.read_flow_runs(limit=200)}


def run_batch(env: dict, batch: Path, scratch: Path, *extra: str, as_json: bool = True,
              timeout: float = 300) -> subprocess.CompletedProcess:
    args = ["run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch), *extra]
    return sierra_prefect(*args, *(["--json"] if as_json else []), env=env, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's single `sierra-prefect: error: ...` line (assert it is exactly one line)."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sierra-prefect: error: "), result.stderr
    return lines[0]


def process_gone(pid: int, name: str | None = None) -> bool:
    """Exited (or a zombie nobody reaped yet, or the pid now belongs to another program)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        return name is not None and proc.name() != name
    except psutil.NoSuchProcess:
        return True


def stack_pids(status: dict) -> list[int]:
    return [status["pids"]["server"], *status["pids"]["workers"]]


# -- 1, 2: PostgreSQL, and load on it ---------------------------------------------------


@pytest.fixture(scope="module")
def pg_stack(postgres: PostgresServer,
             tmp_path_factory) -> Iterator[tuple[StackHandle, subprocess.CompletedProcess]]:
    home = tmp_path_factory.mktemp("pg-home")
    env = base_env(home)
    try:
        # The URL holds a password: in the environment, never on a command line.
        env["SIERRA_PREFECT_DATABASE_URL"] = postgres.url
        up = sierra_prefect("up", env=env, timeout=300)
        assert up.returncode == 0, f"up on PostgreSQL failed:\n{up.stdout}\n{up.stderr}"
        status = json.loads(sierra_prefect("status", "--json", env=env, check=True).stdout)
        yield StackHandle(home=home, env=env, api_url=status["api_url"]), up
    finally:
        # Before PostgreSQL stops (the postgres fixture is torn down after this one).
        sierra_prefect("down", env=env, timeout=120)


def test_postgres_stack_runs_a_batch_and_keeps_the_password_secret(pg_stack, postgres, tmp_path):
    stack, up = pg_stack
    password = postgres.password
    assert password not in up.stdout + up.stderr

    status_json = stack.cli("status", "--json")
    status_text = stack.cli("status")
    for result in (status_json, status_text):
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout + result.stderr
    status = json.loads(status_json.stdout)
    assert status["healthy"] is True and status["prefect_server_version"] == prefect_version()
    assert status["pools"]["sierra-pool"]["workers_online"]

    out = tmp_path / "out"
    out.mkdir()
    runs = 20
    batch, scratch = make_batch(tmp_path, [f"echo run{i} > {out}/run{i}.txt" for i in range(runs)])
    started = time.monotonic()
    result = run_batch(stack.env, batch, scratch, "--max-parallel", "8")
    seconds = time.monotonic() - started
    print(f"\nPostgreSQL stack: batch of {runs} runs in {seconds:.1f} s (trigger to summary)")
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (runs, runs, 0)
    for i in range(runs):
        assert (out / f"run{i}.txt").read_text() == f"run{i}\n"

    # The server really keeps its state in PostgreSQL: the flow run, its experiment's task
    # run and its progress artifact are rows there, read with psql as Prefect's user.
    flow_run_id = summary["flow_run_id"]
    assert int(postgres.psql("SELECT count(*) FROM flow_run")) >= 1
    assert postgres.psql(f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'") == "COMPLETED"
    assert postgres.psql(f"SELECT description FROM artifact WHERE flow_run_id = '{flow_run_id}' "
                         "AND type = 'progress'") == \
        f"{runs} of {runs} runs done: {runs} succeeded, 0 failed, 0 skipped"
    # Task runs reach the database from their events, asynchronously: wait, with a deadline.
    wait_until(lambda: postgres.psql(
        f"SELECT name FROM task_run WHERE flow_run_id = '{flow_run_id}'") == "batch",
        60, "the experiment's one task run in PostgreSQL")

    # Nor does the password land in the stack's own files (state, logs).
    for path in stack.home.rglob("*"):
        if path.is_file() and path.suffix not in (".db", ".db-wal", ".db-shm"):
            assert password.encode() not in path.read_bytes(), f"password found in {path}"


def test_ten_batches_triggered_at_once(pg_stack, postgres, tmp_path):
    stack, _ = pg_stack
    clients, runs = 10, 5
    jobs = []
    for c in range(clients):
        root = tmp_path / f"client{c}"
        out = root / "out"
        out.mkdir(parents=True)
        batch, scratch = make_batch(root, [f"echo {c}-{r} > {out}/run{r}.txt" for r in range(runs)])
        jobs.append((out, batch, scratch))

    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [CLI, "run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch),
             "--max-parallel", str(runs), "--json"],
            env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _, batch, scratch in jobs
    ]
    try:
        results = [proc.communicate(timeout=400) for proc in procs]
    finally:
        for proc in procs:  # only on a timeout: our own client processes, by Popen handle
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - started
    print(f"\nload: {clients} batches x {runs} runs triggered at once by {clients} clients "
          f"(PostgreSQL): all done in {wall:.1f} s wall")

    ids = set()
    for c, (proc, (stdout, stderr)) in enumerate(zip(procs, results, strict=True)):
        assert proc.returncode == 0, f"client {c} exited {proc.returncode}:\n{stderr}"
        summary = json.loads(stdout)
        assert (summary["total"], summary["succeeded"]) == (runs, runs), summary
        ids.add(summary["flow_run_id"])
    assert len(ids) == clients  # ten distinct flow runs, not one shared
    for c, (out, _, _) in enumerate(jobs):
        for r in range(runs):
            assert (out / f"run{r}.txt").read_text() == f"{c}-{r}\n"
    quoted = ", ".join(f"'{i}'" for i in ids)
    assert postgres.psql(
        f"SELECT count(*) FROM flow_run WHERE id IN ({quoted}) AND state_type = 'COMPLETED'"
    ) == str(clients)


# -- 2b: one batch over several workers (--spread), on PostgreSQL ---------------------------


SPREAD_RUNS, SPREAD_CAP = 24, 2


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
    pools = stack.status()["pools"]  # empty while the server does not answer in time
    return name in pools.get("sierra-pool", {}).get("workers_online", [])


def online_or_exited(stack, name: str, worker: subprocess.Popen) -> bool:
    return online(stack, name) or worker.poll() is not None


def test_one_batch_spreads_over_stock_workers_on_postgresql(pg_stack, tmp_path):
    """`run --spread 3` on the PostgreSQL server, with two more workers started the stock way
    (separate processes, names and working directories, an activated venv)."""
    stack = pg_stack[0]
    workers = [start_stock_worker(stack, f"extra-worker-{i}", tmp_path / f"host{i}") for i in range(2)]
    try:
        for i, worker in enumerate(workers):
            name, log = f"extra-worker-{i}", tmp_path / f"host{i}" / "worker.log"
            wait_until(partial(online_or_exited, stack, name, worker), 240, f"{name} online")
            assert worker.poll() is None, f"{name} exited:\n{log.read_text()[-3000:]}"
        who = tmp_path / "who"
        who.mkdir()
        # The parent starts runs at once: without the wait a loaded machine could finish
        # the batch on its worker before another worker's child has started (cold) at all.
        start = until_two_workers(tmp_path / "workers-seen")
        commands = [f"{start}; sleep 1; echo $PREFECT__WORKER_NAME >> {who}/r{i}"
                    for i in range(SPREAD_RUNS)]
        batch, scratch = make_batch(tmp_path, commands)
        result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                           str(scratch), "--spread", "3", "--max-parallel", str(SPREAD_CAP), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads(result.stdout)
        assert (summary["total"], summary["succeeded"], summary["failed"]) == (SPREAD_RUNS, SPREAD_RUNS, 0)

        executions = {f.name: f.read_text().split() for f in who.iterdir()}
        assert sorted(executions) == sorted(f"r{i}" for i in range(SPREAD_RUNS))
        assert all(len(ran_on) == 1 for ran_on in executions.values()), "each run exactly once"
        per_worker = Counter(ran_on[0] for ran_on in executions.values())
        assert per_worker == Counter(summary["workers"])
        assert len(per_worker) >= 2, f"only one worker took a share: {per_worker}"
        print(f"\nspread over workers: {dict(per_worker)}")
    finally:
        for worker in workers:
            stop(worker)


# Brings pg_stack down: keep it after every other test that uses pg_stack (pytest runs a
# module's tests in file order, xdist's loadfile included).
def test_postgres_stack_comes_down(pg_stack, postgres):
    stack, _ = pg_stack
    before = stack.status()
    pids = stack_pids(before)
    flow_runs = postgres.psql("SELECT count(*) FROM flow_run")
    down = stack.cli("down", timeout=120)
    assert down.returncode == 0, down.stderr
    assert f"stopped server (pid {before['pids']['server']})" in down.stdout
    assert all(process_gone(pid) for pid in pids)
    after = stack.cli("status", "--json")
    assert json.loads(after.stdout)["pids"] == {"server": None, "workers": [], "warm_engine": None}
    # The data stays in PostgreSQL, which is still up (only our stack went down).
    assert postgres.psql("SELECT count(*) FROM flow_run") == flow_runs


# -- 3: two stacks on one machine -----------------------------------------------------


def test_two_stacks_side_by_side_stay_independent(tmp_path):
    homes = [tmp_path / "home-a", tmp_path / "home-b"]
    envs = [base_env(home) for home in homes]  # SIERRA_PREFECT_PORT=auto
    try:
        # Both brought up at once.
        for started in up_at_once(*[(home, [], {}) for home in homes]):
            started.assert_up()
        a, b = (json.loads(sierra_prefect("status", "--json", env=env, check=True).stdout) for env in envs)
        assert a["healthy"] and b["healthy"]
        assert a["api_url"] != b["api_url"]
        assert a["api_url"].rsplit(":", 1)[1] != b["api_url"].rsplit(":", 1)[1]
        assert not set(stack_pids(a)) & set(stack_pids(b))
        assert a["pools"]["sierra-pool"]["workers_online"] != b["pools"]["sierra-pool"]["workers_online"]

        # A batch on each runs on its own stack only.
        own: list[str] = []
        for name, env in zip("ab", envs, strict=True):
            out = tmp_path / f"out-{name}"
            batch, scratch = make_batch(tmp_path / name, [f"echo {name} > {out}"])
            result = run_batch(env, batch, scratch)
            assert result.returncode == 0, result.stderr
            own.append(json.loads(result.stdout)["flow_run_id"])
            assert out.read_text() == f"{name}\n"
        credentials = [StackHandle(home, env, "").auth_string for home, env in zip(homes, envs, strict=True)]
        assert credentials[0] != credentials[1], "each stack has its own credential"
        assert flow_run_ids(a["api_url"], credentials[0]) == {own[0]}
        assert flow_run_ids(b["api_url"], credentials[1]) == {own[1]}
        with pytest.raises(Exception, match="401"):  # one stack's credential opens no other
            flow_run_ids(b["api_url"], credentials[0])

        # Down on A leaves B up, with the same pids, and B still runs batches.
        down = sierra_prefect("down", env=envs[0], timeout=120)
        assert down.returncode == 0, down.stderr
        assert all(process_gone(pid) for pid in stack_pids(a))
        b_after = json.loads(sierra_prefect("status", "--json", env=envs[1], check=True).stdout)
        assert b_after["healthy"] is True
        assert b_after["pids"] == b["pids"]
        assert not any(process_gone(pid) for pid in stack_pids(b))
        batch, scratch = make_batch(tmp_path / "b-again", ["echo again"])
        again = run_batch(envs[1], batch, scratch)
        assert again.returncode == 0, again.stderr
        assert flow_run_ids(b["api_url"], credentials[1]) == {own[1], json.loads(again.stdout)["flow_run_id"]}
    finally:
        for env in envs:
            sierra_prefect("down", env=env, timeout=120)


# -- two stacks for 4-7, brought up together ----------------------------------------


@pytest.fixture(scope="module")
def side_stacks(tmp_path_factory) -> Iterator[dict[str, tuple[Started, object]]]:
    """Two stacks brought up at once (it saves a server start-up's worth of time):

    - ``exposed``: bound to 0.0.0.0 with SIERRA_PREFECT_AUTH_STRING (a fresh secret);
    - ``confined``: its worker (and so its flow runs) has SIERRA_PREFECT_ALLOWED_ROOTS.
    """
    secret = f"sierra:{secrets.token_hex(12)}"
    allowed = tmp_path_factory.mktemp("allowed")
    specs = {
        "exposed": ((tmp_path_factory.mktemp("exposed-home"), ["--host", "0.0.0.0"],
                     {"SIERRA_PREFECT_AUTH_STRING": secret}), secret),
        "confined": ((tmp_path_factory.mktemp("confined-home"), [],
                      {"SIERRA_PREFECT_ALLOWED_ROOTS": str(allowed)}), allowed),
    }
    try:
        started = up_at_once(*(spec for spec, _ in specs.values()))
        yield {name: (stack, extra)
               for name, stack, (_, extra) in zip(specs, started, specs.values(), strict=True)}
    finally:
        # Whatever happened to `up` (even a timeout), stop what it recorded in each home.
        for (home, _, extra_env), _ in specs.values():
            sierra_prefect("down", env={**base_env(home), **extra_env}, timeout=120)


@pytest.fixture
def exposed(side_stacks) -> tuple[Started, StackHandle, str]:
    started, secret = side_stacks["exposed"]
    return started, started.handle, secret


@pytest.fixture
def confined(side_stacks) -> tuple[StackHandle, Path]:
    started, allowed = side_stacks["confined"]
    return started.handle, allowed


@pytest.fixture
def allowed_tmp(confined, tmp_path) -> Path:
    """A per-test directory under the confined stack's allowed root."""
    path = confined[1] / tmp_path.name
    path.mkdir()
    return path


# -- 4: auth ----------------------------------------------------------------------------


def test_auth_string_guards_the_server_and_never_leaks(exposed, tmp_path):
    started, stack, secret = exposed
    encoded = base64.b64encode(secret.encode()).decode()
    env = stack.env
    outputs: list[subprocess.CompletedProcess] = [started.up]
    scratches: list[Path] = []
    flow_runs: list[str] = []

    def batch_for(name: str, commands: list[str]) -> tuple[Path, Path]:
        batch, scratch = make_batch(tmp_path / name, commands)
        scratches.append(scratch)
        return batch, scratch

    status = sierra_prefect("status", "--json", env=env)
    outputs += [status, sierra_prefect("status", env=env)]
    report = json.loads(status.stdout)
    assert report["healthy"] is True
    api_url = report["api_url"]
    assert api_url.startswith("http://127.0.0.1:")  # clients here connect via loopback
    port = int(api_url.rsplit(":", 1)[1].split("/")[0])
    server = psutil.Process(report["pids"]["server"])
    listening = {(c.laddr.ip, c.laddr.port) for c in server.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert ("0.0.0.0", port) in listening, listening

    # The shim's own client sends the auth string: a batch runs.
    out = tmp_path / "out-owner"
    batch, scratch = batch_for("owner", [f"echo owner > {out}", "echo to-stdout; echo to-stderr >&2"])
    result = run_batch(env, batch, scratch)
    outputs.append(result)
    assert result.returncode == 0, result.stderr
    flow_runs.append(json.loads(result.stdout)["flow_run_id"])
    assert out.read_text() == "owner\n"

    # A client that knows only the URL is refused, in one clear line.
    client_home = tmp_path / "client-home"  # a fresh home, with only PREFECT_API_URL set
    client_home.mkdir()
    client_env = {**base_env(client_home), "PREFECT_API_URL": api_url}
    check = sierra_prefect("check", "sierra/local", env=client_env, timeout=120)
    assert "PREFECT_API_AUTH_STRING" in one_error_line(check)
    touched = tmp_path / "touched-without-credentials"
    batch, scratch = batch_for("stranger", [f"touch {touched}"])
    refused = run_batch(client_env, batch, scratch, as_json=False, timeout=120)
    assert "PREFECT_API_AUTH_STRING" in one_error_line(refused)
    assert not touched.exists()
    assert httpx.get(f"{api_url}/admin/version", timeout=10).status_code == 401

    # The same client with the auth string works.
    client_env["PREFECT_API_AUTH_STRING"] = secret
    check = sierra_prefect("check", "sierra/local", env=client_env, timeout=120)
    assert check.returncode == 0, check.stderr
    out = tmp_path / "out-client"
    batch, scratch = batch_for("client", [f"echo client > {out}"])
    result = run_batch(client_env, batch, scratch, as_json=False)
    outputs.append(result)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "client\n"
    match = FLOW_RUN_LINE.search(result.stdout)
    assert match, result.stdout
    flow_runs.append(match.group(1))

    # The secret is in no output, no file under the scratch roots, no artifact, no log.
    for output in outputs:
        text = output.stdout + output.stderr
        assert secret not in text and encoded not in text, f"secret in output of {output.args[1:3]}"
    files = [p for scratch in scratches for p in scratch.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".stdout") for p in files)
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data and encoded.encode() not in data, f"secret in {path}"
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    ids = [UUID(i) for i in flow_runs]
    with prefect_client(api_url, secret) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
    assert {a.key for a in artifacts} >= {"sierra-summary", "sierra-summary-json"}
    assert logs, "the flow runs logged nothing"
    for record in [*artifacts, *logs]:
        text = record.model_dump_json()
        assert secret not in text and encoded not in text, f"secret in {type(record).__name__}"
    # Nor in the stack's own state and logs (the server's database aside).
    for path in stack.home.rglob("*"):
        if path.is_file() and not path.name.startswith("prefect.db"):
            data = path.read_bytes()
            assert secret.encode() not in data and encoded.encode() not in data, f"secret in {path}"


def test_runs_never_see_the_auth_string(exposed, tmp_path):
    _, stack, secret = exposed
    batch, scratch = make_batch(tmp_path, ["env"])  # a simulator that logs its environment
    result = run_batch(stack.env, batch, scratch)
    assert result.returncode == 0, result.stderr
    [log] = scratch.rglob("attempt-001.stdout")
    assert "PREFECT_API_URL=" in log.read_text()  # it did print its environment
    assert "AUTH_STRING" not in log.read_text()
    assert secret not in log.read_text()


# -- 5: allowed roots -------------------------------------------------------------------


def test_batch_under_an_allowed_root_runs(confined, allowed_tmp):
    stack, _ = confined
    out = allowed_tmp / "out"
    batch, scratch = make_batch(allowed_tmp, [f"echo inside > {out}"])
    result = run_batch(stack.env, batch, scratch)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "inside\n"


def test_batches_outside_the_allowed_roots_are_refused_before_any_command(confined, tmp_path):
    """Four ways out, triggered at once: each flow run fails before its command runs."""
    stack, allowed = confined
    cases = {}
    for case in ("input outside", "input via ..", "input via symlink", "scratch via symlink"):
        slug = re.sub(r"\W+", "-", case)
        outside = tmp_path / slug  # a pytest temp dir: not under the allowed root
        touched = outside / "touched"
        batch, scratch = make_batch(outside, [f"touch {touched}"])
        inside = allowed / f"{tmp_path.name}-{slug}"
        inside.mkdir()
        input_root, scratch_root = batch, inside / "scratch"
        if case == "input via ..":
            input_root = Path(f"{allowed}/{'/'.join(['..'] * len(allowed.parts[1:]))}{batch}")
            assert os.path.realpath(input_root) == str(batch) and str(input_root).startswith(str(allowed))
        elif case == "input via symlink":
            input_root = inside / "batch-link"
            input_root.symlink_to(batch)
        elif case == "scratch via symlink":
            input_root, _ = make_batch(inside, [f"touch {touched}"])
            scratch.mkdir()
            scratch_root = inside / "scratch-link"
            scratch_root.symlink_to(scratch)
        cases[case] = (input_root, scratch_root, touched)

    procs = {
        case: subprocess.Popen(
            [CLI, "run", "sierra/local", "--input-root", str(inp), "--scratch-root", str(scr)],
            env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case, (inp, scr, _) in cases.items()
    }
    try:
        results = {case: proc.communicate(timeout=300) for case, proc in procs.items()}
    finally:
        for proc in procs.values():  # only after a timeout: our own clients, by handle
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    flow_runs = {}
    for case, (stdout, stderr) in results.items():
        input_root, scratch_root, touched = cases[case]
        text = stdout + stderr
        assert procs[case].returncode == 1, f"{case}: {text}"
        assert "outside the allowed roots" in text and str(allowed.resolve()) in text, f"{case}: {text}"
        assert "FAILED" in text, f"{case}: {text}"
        assert not touched.exists(), case
        assert not (Path(os.path.realpath(scratch_root)) / "sierra-prefect" / "runs").exists(), case
        flow_runs[case] = UUID(FLOW_RUN_LINE.search(stdout).group(1))
    with prefect_client(stack.api_url, stack.auth_string) as client:
        states = {case: client.read_flow_run(i).state for case, i in flow_runs.items()}
    for case, state in states.items():
        assert state.type.value == "FAILED", f"{case}: {state}"
        assert "outside the allowed roots" in (state.message or ""), f"{case}: {state.message}"


# -- 6: a hung run ----------------------------------------------------------------------


def test_hung_run_is_killed_with_its_children(confined, allowed_tmp):
    stack, tmp_path = confined[0], allowed_tmp
    out = tmp_path / "out"
    out.mkdir()
    pidfile = tmp_path / "child.pid"
    hung = f"sleep 300 & echo $! > {pidfile}; wait"
    batch, scratch = make_batch(tmp_path, [hung, *[f"echo ok{i} > {out}/ok{i}" for i in range(3)]])
    started = time.monotonic()
    result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch),
                       "--run-timeout", "2", "--max-parallel", "4", "--json", timeout=200)
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (4, 3, 1)
    [failed] = summary["failed_runs"]
    assert failed["timed_out"] is True and failed["exit_code"] is None and failed["command"] == hung
    for i in range(3):
        assert (out / f"ok{i}").read_text() == f"ok{i}\n"
    child = int(pidfile.read_text())
    wait_until(lambda: process_gone(child, "sleep"), 30, f"the hung run's child (pid {child}) to die")
    print(f"\nhung run: killed after --run-timeout 2, batch done in {seconds:.1f} s")


# -- 7: scratch on a read-only or a full filesystem ------------------------------------


@pytest.fixture
def tmpfs() -> Iterator:
    """Mount small tmpfs filesystems for a test (skip if this machine can't); unmount after."""
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root: run the tests as root")
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            error = " / ".join(result.stderr.strip().splitlines())
            pytest.skip("cannot mount a tmpfs here: it needs CAP_SYS_ADMIN (a container run with "
                        f"--cap-add SYS_ADMIN or --privileged): {error}")
        mounted.append(path)
        return path

    yield mount
    failures = []
    for path in reversed(mounted):
        result = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            failures.append(f"{path}: {result.stderr.strip()}")
    assert not failures, f"could not unmount: {failures}"


def _batch_with_earlier_output(tmp_path: Path) -> tuple[Path, Path, Path]:
    ran = tmp_path / "ran"
    batch, _ = make_batch(tmp_path, [f"touch {ran}"])
    earlier = batch / "earlier-output.csv"
    earlier.write_text("t,x\n0,1\n")
    return batch, earlier, ran


def test_read_only_scratch_is_one_clear_line(confined, allowed_tmp, tmpfs):
    stack, tmp_path = confined[0], allowed_tmp
    batch, earlier, ran = _batch_with_earlier_output(tmp_path)
    readonly = tmpfs(tmp_path / "ro", "ro,size=1m")
    for scratch in (readonly, readonly / "scratch"):
        result = stack.cli("run", "sierra/local", "--input-root", str(batch),
                           "--scratch-root", str(scratch), timeout=120)
        line = one_error_line(result)
        assert "is not writable" in line and "Read-only file system" in line, line
    assert earlier.read_text() == "t,x\n0,1\n"
    assert not ran.exists()


def test_full_scratch_is_one_clear_line(confined, allowed_tmp, tmpfs):
    stack, tmp_path = confined[0], allowed_tmp
    batch, earlier, ran = _batch_with_earlier_output(tmp_path)
    full = tmpfs(tmp_path / "full", "size=64k")
    kept = full / "earlier-run.log"
    kept.write_text("an earlier run's log\n")
    with open(full / "filler", "wb", buffering=0) as filler:
        with pytest.raises(OSError) as raised:
            while True:
                filler.write(b"\0" * 4096)
    assert raised.value.errno == errno.ENOSPC
    assert os.statvfs(full).f_bavail == 0

    result = stack.cli("run", "sierra/local", "--input-root", str(batch),
                       "--scratch-root", str(full), timeout=120)
    line = one_error_line(result)
    assert "No space left on device" in line, line
    assert earlier.read_text() == "t,x\n0,1\n"
    assert kept.read_text() == "an earlier run's log\n"
    assert not ran.exists()

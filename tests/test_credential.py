"""Every stack's own credential, private homes, and secrets kept out of sight.

- Units: the URL password mask, secrets withheld from environments by name and by value,
  the credential file (made once, mode 0600, reused), private directories and files.
- A real server: every API route but ``GET /health`` and ``GET /ready`` answers 401 without
  the credential (HTTP routes from the server's own OpenAPI document, the WebSocket routes of
  Prefect 3.9.1's source); the shim, the worker, the warm engine and ``eval "$(sierra-prefect
  env)"`` for the ``prefect`` CLI all use it; it is on no command line and in no output.
- A stack brought up with a permissive umask in a home others can reach: the home is 0700,
  its files 0600, a real second user (``useradd``) can read nothing of it and is refused by
  the API; the runs' own outputs keep the umask.
- Explicit ``SIERRA_PREFECT_AUTH_STRING`` wins; a server started with another credential, or
  none (an older sierra-prefect), is refused by ``up`` with what to do.
- PostgreSQL: the database URL reaches the server in its environment, never a command line,
  and neither it, its password nor the credential reach a run, while the worker's ordinary
  variables (``LD_LIBRARY_PATH``, ``ARGOS_PLUGIN_PATH``, ``ROS_*``) do.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from sierra_prefect.credential import Credential
from sierra_prefect.errors import ShimError
from sierra_prefect.private import open_private, private_dir
from sierra_prefect.processes import ProcessRecord
from sierra_prefect.redact import SECRET_ENV, Secrets, mask_url, scrub_env, url_password
from sierra_prefect.state import StackState
from tests.helpers import (
    PROJECT,
    StackHandle,
    base_env,
    basic_auth,
    make_batch,
    sierra_prefect,
    wait_until,
)
from tests.postgres_support import PostgresServer

# -- units: masks, secrets, files -------------------------------------------------------


@pytest.mark.parametrize("url, masked, password", [
    ("postgresql+asyncpg://user:pw@127.0.0.1:5432/prefect",
     "postgresql+asyncpg://user:***@127.0.0.1:5432/prefect", "pw"),
    ("postgresql://user:@host/db", "postgresql://user:***@host/db", ""),  # empty: still masked
    ("//:pw@host", "//:***@host", "pw"),  # no user
    ("postgresql://:pw@host/db", "postgresql://:***@host/db", "pw"),
    ("postgresql://user:p@ss@host/db", "postgresql://user:***@host/db", "p@ss"),  # raw @
    ("postgresql://user:p%40ss@host/db", "postgresql://user:***@host/db", "p%40ss"),
    ("postgresql://user:pa/ss@host/db", "postgresql://user:***@host/db", "pa/ss"),  # raw /
    ("postgresql://user:pa#s?s@host/db", "postgresql://user:***@host/db", "pa#s?s"),
    ("postgresql://u:pw@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db", "pw"),
    ("postgresql://user@host/db", "postgresql://user@host/db", None),  # no password
    ("postgresql://host:5432/db", "postgresql://host:5432/db", None),  # a port is no password
    ("sqlite+aiosqlite:////home/u/prefect.db", "sqlite+aiosqlite:////home/u/prefect.db", None),
    ("sierra:not-a-url", "sierra:not-a-url", None),
])
def test_url_password_mask(url, masked, password):
    assert mask_url(url) == masked
    assert url_password(url) == password
    if password:
        assert password not in mask_url(url).replace("***", "")


def test_secrets_are_withheld_by_name_and_by_value_and_nothing_else():
    credential = "sierra:" + secrets.token_urlsafe(32)
    token = credential.split(":", 1)[1]
    database = "postgresql+asyncpg://prefect:s3cr%40t-pass@127.0.0.1:5432/prefect"
    environ = {
        "PREFECT_API_AUTH_STRING": credential,  # by name
        "SIERRA_PREFECT_DATABASE_URL": database,  # by name
        "COPY_OF_CREDENTIAL": f"x{credential}y",  # by value: contains it
        "JUST_THE_TOKEN": token,
        "BASIC_HEADER": "Basic " + base64.b64encode(credential.encode()).decode(),
        "DATABASE_URL": database.replace("+asyncpg", ""),  # the password, in another URL
        "PGPASSWORD": "s3cr@t-pass",  # the decoded password, whole
        "NOTES": "the password is s3cr%40t-pass",  # long enough to be found inside a value
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LD_LIBRARY_PATH": "/opt/argos3/lib", "ARGOS_PLUGIN_PATH": "/opt/argos3/plugins",
        "ROS_PACKAGE_PATH": "/opt/ros/noetic/share", "PWD": "/home/u",
    }
    env, withheld = scrub_env(environ)
    assert withheld == sorted(k for k in environ if k not in (
        "PATH", "LD_LIBRARY_PATH", "ARGOS_PLUGIN_PATH", "ROS_PACKAGE_PATH", "PWD"))
    assert env == {k: environ[k] for k in ("PATH", "LD_LIBRARY_PATH", "ARGOS_PLUGIN_PATH",
                                           "ROS_PACKAGE_PATH", "PWD")}
    assert "PREFECT_API_AUTH_STRING" in SECRET_ENV

    # A short password is withheld where it is the value or a URL's password, not inside
    # every value that happens to contain it (PATH, PWD).
    short = Secrets.of("postgresql://u:pw@h/db")
    env, withheld = scrub_env({"PWD": "/home/pwd", "PATH": "/opt/pw/bin", "A": "pw",
                               "B": "mysql://x:pw@y"}, short)
    assert withheld == ["A", "B"] and set(env) == {"PWD", "PATH"}
    assert "pw" not in repr(short) and token not in repr(Secrets.of(credential))


def test_credential_is_made_once_private_and_reused(tmp_path):
    path = tmp_path / "home" / "auth-string"
    assert Credential.read(path) is None
    old = os.umask(0)  # the most permissive umask: modes must not depend on it
    try:
        made = Credential.create(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    user, _, password = made.value.partition(":")
    assert user == "sierra" and len(password) >= 40  # 32 random bytes, url-safe
    assert made.value not in repr(made) and made.is_private()
    assert Credential.create(path) == made == Credential.read(path)  # reused, not replaced
    assert Credential.create(tmp_path / "other" / "auth-string").value != made.value
    export = made.shell_export()
    assert made.value not in export
    shown = subprocess.run(["bash", "-c", f"{export}; printf %s \"$PREFECT_API_AUTH_STRING\""],
                           capture_output=True, text=True, check=True)
    assert shown.stdout == made.value
    path.chmod(0o644)
    assert not made.is_private()
    path.write_text("\n")
    with pytest.raises(ShimError, match="is empty"):
        Credential.read(path)


def test_which_credential_is_used(monkeypatch, tmp_path):
    """Explicit SIERRA_PREFECT_AUTH_STRING wins; PREFECT_API_AUTH_STRING is for the server of
    PREFECT_API_URL only; the home's own credential is never sent to another server."""
    from sierra_prefect.settings import Settings

    for name in ("SIERRA_PREFECT_AUTH_STRING", "PREFECT_API_AUTH_STRING", "PREFECT_API_URL",
                 "SIERRA_PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    assert Settings(home=home).credential() is None  # before the first `up`
    own = Settings(home=home).ensure_credential()
    assert Settings(home=home).credential() == own and own.file == home / "auth-string"
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "lab:left-over-for-another-server")
    assert Settings(home=home).credential() == own
    assert Settings(home=home, host="0.0.0.0").public()["auth_string"] is None
    monkeypatch.setenv("SIERRA_PREFECT_AUTH_STRING", "me:explicit")
    explicit = Settings(home=home).credential()
    assert (explicit.value, explicit.source, explicit.file) == \
        ("me:explicit", "SIERRA_PREFECT_AUTH_STRING", None)
    monkeypatch.delenv("SIERRA_PREFECT_AUTH_STRING")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert Settings(home=home).credential().value == "lab:left-over-for-another-server"
    monkeypatch.delenv("PREFECT_API_AUTH_STRING")
    assert Settings(home=home).credential() is None  # not the home's: another server


def test_private_dirs_and_files_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        fresh = private_dir(tmp_path / "a" / "home")
        legacy = tmp_path / "legacy"
        legacy.mkdir(mode=0o755)
        (legacy / "server.log").write_text("old\n")
        (legacy / "server.log").chmod(0o644)
        private_dir(legacy)
        with open_private(legacy / "server.log", "ab") as out:
            out.write(b"new\n")
        with open_private(fresh / "state", "w") as out:
            out.write("x")
    finally:
        os.umask(old)
    for directory in (fresh, legacy):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for file in (legacy / "server.log", fresh / "state"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert (legacy / "server.log").read_text() == "old\nnew\n"  # appended, not replaced


def test_a_run_never_sees_the_credential_or_database_but_gets_the_rest(monkeypatch, tmp_path):
    """The flow's own run environment (flows/execute.py), in a real subprocess: whatever
    the flow-run process holds, by name or by value, stays out of the run."""
    from flows.execute import run_command

    credential = "sierra:" + secrets.token_urlsafe(32)
    database = f"postgresql+asyncpg://prefect:{secrets.token_hex(12)}@127.0.0.1/prefect"
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", credential)
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", database)
    monkeypatch.setenv("SNEAKY_COPY", f"prefix {credential} suffix")
    monkeypatch.setenv("OLD_DATABASE_URL", database)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/sim/lib")
    monkeypatch.setenv("ARGOS_PLUGIN_PATH", "/opt/argos3/plugins")
    monkeypatch.setenv("ROS_MASTER_URI", "http://127.0.0.1:11311")
    monkeypatch.setenv("SIM_ORDINARY", "reaches-the-run")
    out, err = tmp_path / "out", tmp_path / "err"
    outcome = run_command("env", tmp_path, out, err)
    assert outcome.exit_code == 0, err.read_text()
    printed = out.read_text()
    for wanted in ("LD_LIBRARY_PATH=/opt/sim/lib", "ARGOS_PLUGIN_PATH=/opt/argos3/plugins",
                   "ROS_MASTER_URI=http://127.0.0.1:11311", "SIM_ORDINARY=reaches-the-run"):
        assert wanted in printed
    password = url_password(database)
    for secret in (credential, credential.split(":", 1)[1], database, password):
        assert secret not in printed
    assert "SNEAKY_COPY" not in printed and "OLD_DATABASE_URL" not in printed


def test_a_database_password_on_the_command_line_is_refused(tmp_path):
    home = tmp_path / "home"
    password = secrets.token_hex(8)
    result = sierra_prefect("up", "--database", f"postgresql+asyncpg://u:{password}@127.0.0.1/p",
                            env=base_env(home), timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sierra-prefect: error: --database holds a password")
    assert "SIERRA_PREFECT_DATABASE_URL" in lines[0]
    assert password not in result.stdout + result.stderr
    assert not (home / "logs").exists() and not (home / "auth-string").exists()  # nothing started


# -- helpers for real stacks ---------------------------------------------------------------


def stack_processes(status: dict) -> list[psutil.Process]:
    """The stack's server, workers and warm engine, and everything they started."""
    pids = [status["pids"]["server"], status["pids"]["warm_engine"], *status["pids"]["workers"]]
    procs = [psutil.Process(pid) for pid in pids if pid]
    return procs + [child for proc in procs for child in proc.children(recursive=True)]


def assert_on_no_command_line(status: dict, *secret_values: str) -> None:
    procs = stack_processes(status)
    assert len(procs) >= 3
    for proc in procs:
        cmdline = " ".join(proc.cmdline())
        for secret in secret_values:
            assert secret not in cmdline, f"secret on the command line of pid {proc.pid}: {proc.name()}"


def handle(home: Path, env: dict[str, str]) -> StackHandle:
    """The stack `up` just brought up in ``home``."""
    status = json.loads(sierra_prefect("status", "--json", env=env, check=True).stdout)
    return StackHandle(home, env, status["api_url"])


def stranger_env(tmp_path: Path, api_url: str) -> dict[str, str]:
    """A client that knows the stack's address but not its credential (its own home)."""
    home = tmp_path / "stranger-home"
    home.mkdir()
    return {**base_env(home), "PREFECT_API_URL": api_url}


def run_env_batch(stack: StackHandle, tmp_path: Path, secret_values: tuple[str, ...] = ()) -> str:
    """A batch of one run that prints its environment; what it printed. Neither ``run``'s
    output nor the flow run's logs and artifacts (its summary) hold ``secret_values``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    batch, scratch = make_batch(tmp_path / "env-batch", ["env"])
    result = sierra_prefect("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                            str(scratch), "--json", env=stack.env)
    assert result.returncode == 0, result.stderr
    [log] = scratch.rglob("attempt-001.stdout")
    flow_run = uuid.UUID(json.loads(result.stdout)["flow_run_id"])
    with temporary_settings({PREFECT_API_URL: stack.api_url, PREFECT_API_AUTH_STRING: stack.auth_string}):
        with get_client(sync_client=True) as client:
            by_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run]))
            records = [*client.read_artifacts(flow_run_filter=by_run),
                       *client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run])))]
    assert any(getattr(r, "key", None) == "sierra-summary" for r in records)
    texts = [result.stdout + result.stderr, *(r.model_dump_json() for r in records)]
    for secret in secret_values:
        assert not any(secret in text for text in texts), "a secret in run's output, a log or an artifact"
    return log.read_text()


# -- the session stack: routes, clients, outputs -----------------------------------------

# Prefect 3.9.1's WebSocket routes (server/api/events.py, logs.py, task_runs.py, workers.py):
# the HTTP middleware does not see them; each authenticates in its first message.
WEBSOCKET_ROUTES = ("/events/in", "/events/out", "/logs/out", "/task_runs/subscriptions/scheduled",
                    "/work_pools/sierra-pool/workers/connect")
OPEN_ROUTES = {("GET", "/health"), ("GET", "/ready")}


def test_every_api_route_but_health_and_ready_needs_the_credential(stack):
    api = stack.api_url
    schema = httpx.get(f"{api}/openapi.json", headers=stack.headers, timeout=30)
    assert schema.status_code == 200
    routes = [(method.upper(), path) for path, item in schema.json()["paths"].items()
              for method in item if method in ("get", "post", "put", "patch", "delete")]
    assert len(routes) > 150 and OPEN_ROUTES <= set(routes)
    # Routes outside the schema too: the docs, the static files, any unknown path, HEAD.
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"),
               ("GET", "/static/prefect-logo-mark-gradient.png"), ("GET", "/no-such-route"),
               ("HEAD", "/health"), ("POST", "/health")]
    nobody = {"": {}, "wrong": basic_auth("sierra:" + secrets.token_urlsafe(32)),
              "garbage": {"Authorization": "Basic not-base64!"}}
    answered: dict[tuple[str, str], set[int]] = {}
    with httpx.Client(timeout=30) as client:
        for method, path in routes:
            url = api + path.replace("{", "").replace("}", "")  # any id: refused before routing
            for headers in nobody.values():
                code = client.request(method, url, headers=headers,
                                      json={} if method != "GET" and method != "HEAD" else None).status_code
                answered.setdefault((method, path), set()).add(code)
    opened = {route for route, codes in answered.items() if codes != {401}}
    assert opened == OPEN_ROUTES, f"answered without the credential: {opened - OPEN_ROUTES}"
    assert all(answered[route] == {200} for route in OPEN_ROUTES)
    # The credential opens them (the version route, as every client's first call).
    assert httpx.get(f"{api}/admin/version", headers=stack.headers, timeout=10).status_code == 200
    # The UI's own files and settings are not the API: public, and they say "log in".
    ui = httpx.get(f"{api.removesuffix('/api')}/ui-settings", timeout=10).json()
    assert ui["auth"] == "BASIC"

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ws = api.replace("http://", "ws://", 1)
    for route in WEBSOCKET_ROUTES:
        for token in (None, "sierra:" + secrets.token_urlsafe(32)):
            with connect(ws + route, subprotocols=["prefect"], open_timeout=30) as socket:
                socket.send(json.dumps({"type": "auth", "token": token}))
                with pytest.raises(ConnectionClosed) as closed:
                    socket.recv(timeout=30)
                assert closed.value.rcvd.code == 1008, (route, closed.value)
        with connect(ws + route, subprotocols=["prefect"], open_timeout=30) as socket:
            socket.send(json.dumps({"type": "auth", "token": stack.auth_string}))
            assert json.loads(socket.recv(timeout=30)) == {"type": "auth_success"}, route


def test_the_shim_worker_warm_engine_and_prefect_cli_use_it_and_no_output_shows_it(stack, tmp_path):
    secret = stack.auth_string
    encoded = base64.b64encode(secret.encode()).decode()
    path = stack.home / "auth-string"

    again = stack.cli("up", check=True)  # the warm path
    assert f"UI login: the stack's auth string, printed by `sierra-prefect auth-string` (kept in {path}" \
        in again.stdout
    status_json, status_text = stack.cli("status", "--json", check=True), stack.cli("status", check=True)
    report = json.loads(status_json.stdout)
    assert report["credential"] == str(path) and report["settings"]["auth_string"] is None
    assert f"credential:   {path}" in status_text.stdout
    env_lines = stack.cli("env", check=True)
    assert "export PREFECT_API_AUTH_STRING=" in env_lines.stdout
    printed = stack.cli("auth-string", check=True)
    assert printed.stdout == secret + "\n"
    for output in (again, status_json, status_text, env_lines):
        assert secret not in output.stdout + output.stderr
        assert encoded not in output.stdout + output.stderr

    # The `prefect` CLI: with `eval "$(sierra-prefect env)"` it works; with the URL alone, 401.
    prefect = str(Path(sys.executable).parent / "prefect")
    plain = {k: v for k, v in stack.env.items() if not k.startswith("PREFECT_API")}
    script = f'eval "$({sys.executable} -m sierra_prefect env)" && {prefect} deployment ls'
    listed = subprocess.run(["bash", "-c", script], env=plain, capture_output=True, text=True,
                            timeout=180, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "sierra/local" in listed.stdout
    refused = subprocess.run([prefect, "deployment", "ls"], env={**plain, "PREFECT_API_URL": stack.api_url},
                             capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr

    # Every process of the stack got it in its environment, none on its command line.
    status = stack.status()
    server = psutil.Process(status["pids"]["server"])
    assert server.environ()["PREFECT_SERVER_API_AUTH_STRING"] == secret
    for pid in [status["pids"]["warm_engine"], *status["pids"]["workers"]]:
        assert psutil.Process(pid).environ()["PREFECT_API_AUTH_STRING"] == secret
    assert_on_no_command_line(status, secret, encoded)

    # A run that prints its environment (forked from the warm engine by the worker) shows
    # no credential; the home holds it in one file only (its database aside).
    printed = run_env_batch(stack, tmp_path, (secret, encoded))
    assert "SIERRA_PREFECT_RUN=" in printed  # it did print its environment
    assert secret not in printed and "AUTH_STRING" not in printed
    holders = [p for p in stack.home.rglob("*") if p.is_file() and not p.name.startswith("prefect.db")
               and secret.encode() in p.read_bytes()]
    assert holders == [path]


def test_a_client_without_the_credential_is_refused_and_nothing_runs(stack, tmp_path):
    touched = tmp_path / "touched"
    batch, scratch = make_batch(tmp_path / "stranger", [f"touch {touched}"])
    env = stranger_env(tmp_path, stack.api_url)
    for command in (["check", "sierra/local"],
                    ["run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch)]):
        result = sierra_prefect(*command, env=env, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert "refused the credentials" in lines[0] and "PREFECT_API_AUTH_STRING" in lines[0]
    # Straight at the API: reading the deployment or starting it, refused.
    deployment = httpx.get(f"{stack.api_url}/deployments/name/sierra/local", headers=stack.headers,
                           timeout=10).json()["id"]
    create = httpx.post(f"{stack.api_url}/deployments/{deployment}/create_flow_run", timeout=10,
                        json={"parameters": {"input_root": str(batch), "scratch_root": str(scratch)}})
    assert create.status_code == 401
    assert httpx.get(f"{stack.api_url}/deployments/name/sierra/local", timeout=10).status_code == 401
    assert not touched.exists() and not (scratch / "sierra-prefect" / "runs").exists()
    # The owner's own `run` still works, unchanged.
    result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch))
    assert result.returncode == 0, result.stderr
    assert touched.exists()


# -- a fresh stack: permissions, a second user, explicit credential, refusals ---------------


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """A real unprivileged user of this machine, made for the test and removed after."""
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root: run the tests as root")
    name = f"spcred{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, text=True)


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory other users may enter (pytest's own temp dirs are 0700: a stack home in
    one would be closed to others whatever the stack does)."""
    path = Path(tempfile.mkdtemp(prefix="sierra-prefect-cred-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(user: pwd.struct_passwd, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user.pw_name, "--", *argv], capture_output=True,
                          text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL)


HTTP_STATUS = ("import sys, urllib.request, urllib.error\n"
               "request = urllib.request.Request(sys.argv[1], method=sys.argv[2], data=b'{}' "
               "if sys.argv[2] == 'POST' else None, headers={'Content-Type': 'application/json'})\n"
               "try:\n    print(urllib.request.urlopen(request, timeout=20).status)\n"
               "except urllib.error.HTTPError as exc:\n    print(exc.code)\n")


def test_a_private_home_whatever_the_umask_closed_to_another_user(reachable_dir, other_user, tmp_path):
    home = reachable_dir / "home"
    home.mkdir(mode=0o755)  # an existing home, as an older sierra-prefect left it
    (home / "notes.txt").write_text("mine\n")
    env = base_env(home)
    outputs = reachable_dir / "outputs"
    outputs.mkdir(mode=0o755)
    batch, scratch = make_batch(reachable_dir / "run", [f"echo out > {outputs}/result.csv"])
    try:
        up = sierra_prefect("up", env=env, timeout=300, umask=0o002)  # a lab's group-writable umask
        assert up.returncode == 0, up.stderr
        stack = handle(home, env)
        secret = stack.auth_string
        modes = {p.relative_to(home): stat.S_IMODE(p.lstat().st_mode) for p in home.rglob("*")}
        modes[Path(".")] = stat.S_IMODE(home.stat().st_mode)
        for directory in (".", "logs", "prefect"):
            assert modes[Path(directory)] == 0o700, directory
        for file in ("auth-string", "stack.json", "lock", "logs/server.log", "logs/worker-process.log",
                     "logs/warm-engine.log", "logs/deploy.log", "prefect/prefect.db"):
            assert modes[Path(file)] == 0o600, file
        assert modes[Path("warm-engine.sock")] & 0o077 == 0

        # The runs' own outputs are not the stack's: they keep the user's umask (002).
        result = sierra_prefect("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                                str(scratch), env=env, umask=0o002)
        assert result.returncode == 0, result.stderr
        assert stat.S_IMODE((outputs / "result.csv").stat().st_mode) == 0o664

        # Another user of the machine: nothing of the home, no credential, no API.
        for argv in (["ls", str(home)], ["cat", str(home / "auth-string")],
                     ["cat", str(home / "logs" / "server.log")]):
            denied = as_user(other_user, *argv)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, argv
        server_pid = stack.status()["pids"]["server"]
        assert as_user(other_user, "cat", f"/proc/{server_pid}/environ").returncode != 0
        cmdline = as_user(other_user, "cat", f"/proc/{server_pid}/cmdline")
        assert cmdline.returncode == 0 and secret not in cmdline.stdout  # readable, and clean
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        for method, route in (("GET", "/deployments/name/sierra/local"), ("POST", "/flow_runs/filter"),
                              ("GET", "/health")):
            code = as_user(other_user, python, "-c", HTTP_STATUS, stack.api_url + route, method)
            assert code.stdout.strip() == ("200" if route == "/health" else "401"), (route, code.stderr)
        assert (home / "notes.txt").read_text() == "mine\n"
    finally:
        sierra_prefect("down", env=env, timeout=120)


def test_explicit_credential_wins_and_a_server_with_another_or_none_is_refused(tmp_path):
    home = tmp_path / "home"
    explicit = "lab:" + secrets.token_urlsafe(16)
    env = {**base_env(home), "SIERRA_PREFECT_AUTH_STRING": explicit,
           "LEAKY_COPY": f"my credential is {explicit}", "SIM_ORDINARY": "reaches-the-run"}
    try:
        up = sierra_prefect("up", env=env, timeout=300)
        assert up.returncode == 0, up.stderr
        assert "UI login: your $SIERRA_PREFECT_AUTH_STRING" in up.stdout
        assert not (home / "auth-string").exists(), "an explicit credential: no file is made"
        stack = handle(home, env)
        assert stack.cli("env", check=True).stdout.splitlines()[-1] == \
            'export PREFECT_API_AUTH_STRING="${SIERRA_PREFECT_AUTH_STRING}"'
        version = f"{stack.api_url}/admin/version"
        assert httpx.get(version, headers=basic_auth(explicit), timeout=10).status_code == 200
        # The worker got the user's variables but not the one holding the credential.
        printed = run_env_batch(stack, tmp_path, (explicit,))
        assert "SIM_ORDINARY=reaches-the-run" in printed
        assert explicit not in printed and "LEAKY_COPY" not in printed

        # Without it, `up` would send the stack's own (new) one: refused, nothing stopped.
        before = stack.status()["pids"]
        plain = {k: v for k, v in env.items() if k != "SIERRA_PREFECT_AUTH_STRING"}
        refused = sierra_prefect("up", env=plain, timeout=120)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode != 0 and lines[-1].startswith("sierra-prefect: error: "), refused.stderr
        assert f"(pid {before['server']}) refuses its credential" in lines[-1]
        assert "`sierra-prefect down`, then `sierra-prefect up`" in lines[-1]
        assert stack.status()["pids"] == before
    finally:
        sierra_prefect("down", env=env, timeout=120)

    # A server of this home that lets anyone in (started before stacks had a credential):
    # `up` says so and what to do; it stops nothing.

    state = StackState.load(home / "stack.json")
    port = _free_port()
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    open_env = {**base_env(home), "PREFECT_HOME": str(home / "prefect")}  # no auth string
    record = ProcessRecord.spawn("server", argv, open_env, home / "logs" / "old.log", home)
    try:
        api_url = f"http://127.0.0.1:{port}/api"
        wait_until(lambda: _answers(api_url), 120, "the open server")
        state.server, state.api_url, state.port, state.host = record, api_url, port, "127.0.0.1"
        state.save(home / "stack.json")
        refused = sierra_prefect("up", env=base_env(home), timeout=120)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode != 0, refused.stdout
        assert f"(pid {record.pid}) lets in anyone on this machine" in lines[-1], refused.stderr
        assert record.is_running()
    finally:
        record.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- PostgreSQL: the database URL on no command line, in no run --------------------------


def test_database_url_reaches_the_server_only_and_runs_get_the_rest(postgres: PostgresServer, tmp_path):
    home = tmp_path / "home"
    password = postgres.password
    env = {**base_env(home), "SIERRA_PREFECT_DATABASE_URL": postgres.url,
           # The user's shell has copies, as shells do; the worker gets none of them.
           "DATABASE_URL": postgres.url.replace("+asyncpg", ""), "PGPASSWORD": password,
           # What simulators need from the worker's environment.
           "LD_LIBRARY_PATH": "/opt/argos3/lib", "ARGOS_PLUGIN_PATH": "/opt/argos3/plugins",
           "ROS_PACKAGE_PATH": "/opt/ros/noetic/share", "SIM_ORDINARY": "reaches-the-run"}
    try:
        up = sierra_prefect("up", env=env, timeout=300)
        assert up.returncode == 0, up.stderr
        stack = handle(home, env)
        status = stack.status()
        assert status["server_started_with"]["database"] == mask_url(postgres.url)
        assert password not in json.dumps(status)
        server = psutil.Process(status["pids"]["server"])
        assert server.environ()["PREFECT_API_DATABASE_CONNECTION_URL"] == postgres.url
        assert_on_no_command_line(status, password, stack.auth_string)
        for pid in [status["pids"]["warm_engine"], *status["pids"]["workers"]]:
            worker_env = "\0".join(f"{k}={v}" for k, v in psutil.Process(pid).environ().items())
            assert password not in worker_env, "a client process holds the database password"

        printed = run_env_batch(stack, tmp_path, (password, stack.auth_string))
        for wanted in ("LD_LIBRARY_PATH=/opt/argos3/lib", "ARGOS_PLUGIN_PATH=/opt/argos3/plugins",
                       "ROS_PACKAGE_PATH=/opt/ros/noetic/share", "SIM_ORDINARY=reaches-the-run"):
            assert wanted in printed
        for secret in (password, postgres.url, stack.auth_string):
            assert secret not in printed
        assert "DATABASE_URL" not in printed and "PGPASSWORD" not in printed
        for path in home.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), f"password in {path}"
    finally:
        sierra_prefect("down", env=env, timeout=120)


def test_readme_puts_no_password_on_a_command_line():
    readme = (PROJECT / "README.md").read_text()
    assert "--database postgresql" not in readme
    assert "SIERRA_PREFECT_DATABASE_URL" in readme and "sierra-prefect auth-string" in readme

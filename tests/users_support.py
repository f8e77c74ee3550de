"""Real users on one machine, for the shared-machine tests (tests/test_multi_user.py).

Issue 11's case: several people run SIERRA on one machine (a lab server, an HPC login
node), each with a stack of their own. These fixtures make that real, as root:

``shared_install`` (session)
    this checkout's files copied to a directory under /tmp, with a venv of Debian's own
    ``/usr/bin/python3`` synced from ``uv.lock`` by ``scripts/lib.sh:uv_sync`` (default and
    ``sierra`` groups): a tool installed once for every user of the machine, owned by root,
    readable by all, outside root's home and outside the venv running the tests. Removed
    at the end.
``users`` (session)
    two unprivileged users made with ``useradd`` for this session, ``owner`` and ``other``,
    with uids of their own (never the worker image's 1000) and homes left open to others
    (0755: what ``useradd`` makes here and what many sites keep), so that what protects a
    stack is the stack's own doing. At the end anything still running as them (started by
    these tests) is stopped by pid, then ``userdel --remove`` deletes them and their homes.
``owner_stack`` (session)
    ``sierra-prefect up`` run by the owner in the default home (``~/.sierra-prefect``): what
    "closed by default" has to hold for. Its environment carries a simulator's variables
    (``LD_LIBRARY_PATH``, ``ARGOS_PLUGIN_PATH``, ``ROS_PACKAGE_PATH``) that runs must still
    get. Brought down with ``sierra-prefect down`` as the owner.
``owner_docker`` (session)
    the owner in the group of the Docker socket (the issue accepts giving the user Docker
    access for the test), then ``sierra-prefect down`` and ``up --docker`` as the owner: the
    same stack (home, credential, database) with a Docker worker. Needs ``docker_engine``
    (tests/docker_support.py).

Every process a user runs goes through ``LocalUser.run``: that user's uid, gid and groups,
a clean environment (HOME, PATH with the shared venv first, telemetry off), umask 022, a
deadline, and on timeout its process group stopped by its id. What the other user tries is
``tests/users_probe.py``, run as them. The owner's credential reaches this process only as
the owner's own shell gets it, through ``eval "$(sierra-prefect env)"``, and is never
printed.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from sierra_prefect.processes import terminate
from tests.helpers import PROJECT, stop_group

SYSTEM_PYTHON = Path("/usr/bin/python3")
# Uids for the test users: above the usual range of people (1000...) and of the image's
# user (1000), below UID_MAX of Debian's login.defs.
UID_RANGE = (42000, 59000)
# What a simulator needs from the worker's environment (the issue names them): runs must
# still get these, as `hpc.local` gives them.
SIMULATOR_ENV = {
    "LD_LIBRARY_PATH": "/opt/sim-test/lib",
    "ARGOS_PLUGIN_PATH": "/opt/sim-test/argos",
    "ROS_PACKAGE_PATH": "/opt/sim-test/ros",
}
# Left out of the shared copy: venvs, caches, VCS data, build output.
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.pyc", "*.egg-info",
                                     ".pytest_cache", ".ruff_cache", ".ci-state", "results")
# Prints the PREFECT_* settings of the shell it runs in (after `eval "$(sierra-prefect env)"`).
_DUMP_PREFECT_ENV = ("import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
                     "if k.startswith('PREFECT_')}))")


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


# -- the shared install ------------------------------------------------------------------


@dataclass(frozen=True)
class SharedInstall:
    """A checkout and its venv that every user of the machine can run."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / ".venv" / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    @property
    def cli(self) -> str:
        return str(self.bin / "sierra-prefect")


def make_shared_install(parent: Path) -> SharedInstall:
    """Copy this checkout under ``parent`` and sync a venv of Debian's python3 there."""
    root = parent / "checkout"
    shutil.copytree(PROJECT, root, ignore=COPY_IGNORE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONPATH", "PYTHONHOME")}
    sync = subprocess.run(
        ["bash", "-c", 'source scripts/lib.sh && uv_sync --quiet --python "$1" --group sierra',
         "uv_sync", str(SYSTEM_PYTHON)],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)
    if sync.returncode != 0:
        pytest.fail(f"uv sync of the shared install in {root} failed:\n{_tail(sync.stderr, 20)}",
                    pytrace=False)
    install = SharedInstall(root)
    # Bytecode of the project's own code too: users cannot write __pycache__ here.
    subprocess.run([str(install.python), "-m", "compileall", "-q", "sierra_prefect", "flows",
                    "sierra_plugins", "tests"], cwd=root, capture_output=True, timeout=300, check=True)
    subprocess.run(["chmod", "-R", "a+rX,go-w", str(parent)], check=True, timeout=300)
    return install


@pytest.fixture(scope="session")
def shared_install() -> Iterator[SharedInstall]:
    if os.geteuid() != 0:
        pytest.skip("multi-user tests need root (useradd, runs as other users)")
    if shutil.which("useradd") is None or not SYSTEM_PYTHON.is_file():
        pytest.skip("multi-user tests need useradd and Debian's /usr/bin/python3 (apt-get install "
                    "passwd python3)")
    parent = Path(tempfile.mkdtemp(prefix="sierra-prefect-users-", dir="/tmp"))
    try:
        parent.chmod(0o755)
        start = time.monotonic()
        install = make_shared_install(parent)
        print(f"\n[users] shared install in {install.root} ({time.monotonic() - start:.0f} s)")
        yield install
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# -- users -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalUser:
    """An unprivileged user of this machine, and how the tests act as them."""

    name: str
    uid: int
    gid: int
    home: Path
    install: SharedInstall

    def groups(self) -> list[int]:
        """Its groups as a login gets them (read afresh: the Docker group may be added)."""
        return os.getgrouplist(self.name, self.gid)

    def env(self, **extra: str) -> dict[str, str]:
        """A login's environment with the shared venv first on PATH (as if activated)."""
        env = {
            "HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "SHELL": "/bin/bash",
            "PATH": f"{self.install.bin}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        if os.environ.get("DOCKER_HOST"):
            env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
        env.update(extra)
        return env

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            cwd: Path | None = None, stdin: str | None = None, umask: int = 0o022,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """``argv`` as this user, to the end, with a deadline."""
        proc = subprocess.Popen(
            [str(a) for a in argv], user=self.uid, group=self.gid, extra_groups=self.groups(),
            env=dict(env if env is not None else self.env()), cwd=str(cwd or self.home),
            umask=umask, start_new_session=True, text=True,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise AssertionError(f"{' '.join(map(str, argv[:4]))} as {self.name} did not finish "
                                 f"within {timeout} s") from None
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def sierra_prefect(self, *args: str, env: Mapping[str, str] | None = None,
                       timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        return self.run([self.install.cli, *args], env=env, timeout=timeout, **kw)

    def with_stack_env(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                       timeout: float = 300) -> subprocess.CompletedProcess:
        """``argv`` in a shell that did ``eval "$(sierra-prefect env)"`` first, as the README
        tells users to do before using the ``prefect`` CLI."""
        script = 'eval "$(sierra-prefect env)" && exec "$@"'
        return self.run(["bash", "-c", script, "bash", *argv], env=env, timeout=timeout)

    def probe(self, action: str, request: dict, env: Mapping[str, str] | None = None,
              with_stack_env: bool = False, timeout: float = 300):
        """``tests/users_probe.py ACTION`` as this user (request on stdin); its JSON answer."""
        argv = [str(self.install.python), "-m", "tests.users_probe", action]
        if with_stack_env:
            argv = ["bash", "-c", 'eval "$(sierra-prefect env)" && exec "$@"', "bash", *argv]
        result = self.run(argv, env=env, cwd=self.install.root, stdin=json.dumps(request),
                          timeout=timeout)
        assert result.returncode == 0, f"probe {action} as {self.name} failed:\n{_tail(result.stderr)}"
        return json.loads(result.stdout)

    def mkdir(self, path: Path, mode: int = 0o755) -> Path:
        """A directory of this user's (and its missing parents under its home)."""
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        for made in missing:
            os.chown(made, self.uid, self.gid)
            made.chmod(0o755)
        path.chmod(mode)  # explicit: mkdir's mode is cut by the umask
        return path

    def write(self, path: Path, text: str, mode: int = 0o644) -> Path:
        """A file of this user's (its directory made too, if missing)."""
        if not path.parent.exists():
            self.mkdir(path.parent)
        path.write_text(text)
        os.chown(path, self.uid, self.gid)
        path.chmod(mode)
        return path

    def processes(self) -> list[psutil.Process]:
        """Everything running as this user now."""
        found = []
        for proc in psutil.process_iter(["uids"]):
            uids = proc.info.get("uids")
            if uids and self.uid in (uids.real, uids.effective):
                found.append(proc)
        return found


def _free_uid() -> int:
    """A uid that is neither a user's nor a group's id (useradd --user-group takes it as gid)."""
    rng = random.Random()
    for _ in range(1000):
        uid = rng.randrange(*UID_RANGE)
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
        except KeyError:
            return uid
    raise RuntimeError(f"no free uid in {UID_RANGE}")


def create_user(role: str, install: SharedInstall) -> LocalUser:
    """A new user with a unique name (``sp<hex><role letter>``) and a home of its own."""
    name = f"sp{uuid.uuid4().hex[:8]}{role[0]}"
    uid = _free_uid()
    result = subprocess.run(
        ["useradd", "--create-home", "--user-group", "--uid", str(uid), "--shell", "/bin/bash",
         "--comment", f"sierra-prefect test user ({role})", name],
        capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"useradd {name} failed: {result.stderr.strip()}", pytrace=False)
    entry = pwd.getpwnam(name)
    home = Path(entry.pw_dir)
    home.chmod(0o755)  # open to others, as many sites keep homes: the stack must close itself
    return LocalUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=home, install=install)


def remove_user(user: LocalUser) -> list[str]:
    """Stop what still runs as ``user`` (ours: the user exists for this session only), then
    ``userdel --remove``. Returns what had to be stopped, for the report."""
    leftovers = user.processes()
    described = []
    for proc in leftovers:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline()[:4])}")
        except psutil.Error:
            described.append(str(proc.pid))
    terminate(leftovers, grace=15)
    result = subprocess.run(["userdel", "--remove", user.name], capture_output=True, text=True,
                            timeout=120)
    if result.returncode not in (0, 12):  # 12: the home could not be removed entirely
        described.append(f"userdel {user.name} exited {result.returncode}: {result.stderr.strip()}")
    shutil.rmtree(user.home, ignore_errors=True)
    return described


@dataclass(frozen=True)
class UserPair:
    owner: LocalUser
    other: LocalUser


@pytest.fixture(scope="session")
def users(shared_install) -> Iterator[UserPair]:
    made: list[LocalUser] = []
    try:
        made.append(create_user("a-owner", shared_install))
        made.append(create_user("b-other", shared_install))
        print(f"\n[users] owner {made[0].name} (uid {made[0].uid}), "
              f"other {made[1].name} (uid {made[1].uid})")
        yield UserPair(owner=made[0], other=made[1])
    finally:
        leaks = [line for user in made for line in remove_user(user)]
        if leaks:
            print("\n[users] stopped what still ran as the test users:\n  " + "\n  ".join(leaks))


# -- a user's stack ----------------------------------------------------------------------


@dataclass
class UserStack:
    """A stack a user brought up with ``sierra-prefect up``, seen from the outside."""

    user: LocalUser
    env: dict[str, str]
    api_url: str
    home: Path
    _settings: dict[str, str] | None = field(default=None, repr=False)

    @property
    def server_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.user.sierra_prefect(*args, env=self.env, timeout=timeout)

    def status(self) -> dict:
        result = self.cli("status", "--json", timeout=120)
        assert result.returncode == 0, f"status as {self.user.name}:\n{_tail(result.stderr)}"
        return json.loads(result.stdout)

    def client_settings(self) -> dict[str, str]:
        """The PREFECT_* settings the user's shell has after ``eval "$(sierra-prefect env)"``:
        what the ``prefect`` CLI, and anyone holding them, can do."""
        if self._settings is None:
            result = self.user.with_stack_env([str(self.user.install.python), "-c", _DUMP_PREFECT_ENV],
                                              env=self.env, timeout=120)
            assert result.returncode == 0, (
                f'eval "$(sierra-prefect env)" as {self.user.name} failed:\n{_tail(result.stderr)}')
            self._settings = json.loads(result.stdout)
        return self._settings

    @property
    def credential(self) -> str | None:
        """The stack's credential as its user's Prefect client gets it (None: there is none)."""
        return self.client_settings().get("PREFECT_API_AUTH_STRING") or None

    def headers(self) -> dict[str, str]:
        """What Prefect's client sends with the credential (HTTP basic)."""
        secret = self.credential
        if not secret:
            return {}
        return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        """The REST API as the stack's user (with its credential, if it has one)."""
        response = httpx.request(method, f"{self.api_url}{path}", headers=self.headers(),
                                 timeout=30, **kw)
        response.raise_for_status()
        return response

    @contextmanager
    def prefect_client(self) -> Iterator[object]:
        """Prefect's own sync client in this process, holding the user's settings: what a
        leaked trigger path (or the user's own shell) can do."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url,
                                 PREFECT_API_AUTH_STRING: self.credential}):
            with get_client(sync_client=True) as client:
                yield client

    def flow_run_count(self) -> int:
        return int(self.api("POST", "/flow_runs/count", json={}).json())

    def deployment(self, name: str) -> dict:
        flow, _, deployment = name.partition("/")
        return self.api("GET", f"/deployments/name/{flow}/{deployment}").json()

    def flow_run(self, flow_run_id: str) -> dict:
        return self.api("GET", f"/flow_runs/{flow_run_id}").json()

    def state_history(self, flow_run_id: str) -> list[str]:
        states = self.api("GET", "/flow_run_states/", params={"flow_run_id": flow_run_id}).json()
        return [s["type"] for s in sorted(states, key=lambda s: s["timestamp"])]


def bring_up(user: LocalUser, *args: str, env: Mapping[str, str] | None = None,
             timeout: float = 600) -> UserStack:
    """``sierra-prefect up ARGS`` as ``user``, in the default home; fails with its output."""
    env = dict(env or user.env())
    result = user.sierra_prefect("up", *args, env=env, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"sierra-prefect up {' '.join(args)} as {user.name} exited "
                             f"{result.returncode}:\n{_tail(result.stdout)}\n{_tail(result.stderr, 20)}")
    stack = UserStack(user=user, env=env, api_url="", home=Path())
    report = stack.status()
    stack.api_url, stack.home = report["api_url"], Path(report["home"])
    return stack


def bring_down(stack: UserStack) -> None:
    result = stack.cli("down", timeout=240)
    if result.returncode != 0:
        print(f"\n[users] sierra-prefect down as {stack.user.name} exited {result.returncode}: "
              f"{_tail(result.stderr, 5)}")


@pytest.fixture(scope="session")
def owner_stack(users) -> Iterator[UserStack]:
    owner = users.owner
    # SIERRA_PREFECT_PORT=auto: any free port (4200 may be another test's); no
    # SIERRA_PREFECT_HOME: the default home, ~/.sierra-prefect, is what must be closed.
    env = owner.env(SIERRA_PREFECT_PORT="auto", **SIMULATOR_ENV)
    start = time.monotonic()
    stack = bring_up(owner, env=env)
    print(f"\n[users] {owner.name}'s stack up at {stack.api_url} in {stack.home} "
          f"({time.monotonic() - start:.0f} s)")
    try:
        yield stack
    finally:
        bring_down(stack)


# -- Docker access for the owner ---------------------------------------------------------


def docker_socket() -> Path:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.fail(f"DOCKER_HOST={host} is not a Unix socket: the test cannot give a user access "
                    "to it", pytrace=False)
    return Path(host.removeprefix("unix://"))


@contextmanager
def docker_access(user: LocalUser) -> Iterator[str]:
    """``user`` in the group of the Docker socket (root-equivalent: for the test only, as
    the issue accepts), removed again afterwards. Yields the group's name."""
    sock = docker_socket()
    gid = sock.stat().st_gid
    if gid == 0:
        pytest.fail(f"the Docker socket {sock} belongs to group root: start dockerd with "
                    "--group docker so a user can be given access", pytrace=False)
    group = grp.getgrgid(gid).gr_name
    subprocess.run(["gpasswd", "--add", user.name, group], check=True, capture_output=True, timeout=60)
    try:
        check = user.run(["docker", "version", "--format", "{{.Server.Version}}"], timeout=60)
        assert check.returncode == 0, f"{user.name} cannot use Docker via {group}: {check.stderr}"
        yield group
    finally:
        subprocess.run(["gpasswd", "--delete", user.name, group], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def owner_docker(owner_stack, docker_engine) -> Iterator[UserStack]:
    """The owner's stack with a Docker worker: given Docker access, the owner restarts the
    stack (``down``, then ``up --docker``), as someone just added to a group logs in again:
    processes started before (the warm engine, which forks ``run``) lack the group."""
    from tests.docker_support import BASE_IMAGE

    with docker_access(owner_stack.user):
        env = {**owner_stack.env, "SIERRA_PREFECT_BASE_IMAGE": BASE_IMAGE}
        start = time.monotonic()
        bring_down(owner_stack)
        stack = bring_up(owner_stack.user, "--docker", env=env, timeout=900)
        print(f"\n[users] {owner_stack.user.name}'s stack restarted with a Docker worker "
              f"({time.monotonic() - start:.0f} s)")
        yield stack

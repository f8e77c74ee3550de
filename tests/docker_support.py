"""Fixtures and helpers for the Docker tests (tests/test_docker.py).

``docker_engine`` (session): a Docker engine that answers, the offline base image and a
worker image built from this checkout. It uses an engine that already answers; else it
starts one with ``scripts/docker-engine.sh start`` (root, Debian's ``docker.io``: what
``scripts/setup.sh --test`` installs) and stops it again at the end of the session; it
skips the Docker tests, saying why, only when no engine can be started at all.

``docker_stack`` (module): the embedded stack with a Docker worker
(``sierra-prefect up --docker``), brought down with ``sierra-prefect down``.

The pytest-docker fixtures (``docker_compose_command`` etc.) run
``tests/docker/docker-compose.yml`` with docker-compose v1 for the service-level test.

Everything polls with a deadline; nothing is killed by name; only images and containers
made here are removed (images are tagged ``sierra-prefect-test/...``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.helpers import PROJECT, StackHandle, api_of, base_env, sierra_prefect

BASE_IMAGE = "sierra-prefect/base:bookworm"
WORKER_IMAGE = "sierra-prefect/worker:latest"
# Every image the tests build is tagged under this repository and removed at the end.
TEST_REPO = "sierra-prefect-test"
ENGINE_SCRIPT = PROJECT / "scripts" / "docker-engine.sh"
BASE_IMAGE_SCRIPT = PROJECT / "scripts" / "build-base-image.sh"
COMPOSE_FILE = PROJECT / "tests" / "docker" / "docker-compose.yml"
DEFAULT_SOCKET = "unix:///var/run/docker.sock"

# A suffix that makes this session's image tags and compose project unique.
SESSION_ID = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def docker(*args: str, timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """The docker CLI (against the engine of ``docker_engine``)."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n"
                             f"{_tail(result.stdout)}\n{_tail(result.stderr)}")
    return result


def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False, timeout=60).returncode == 0


@dataclass
class DockerEngine:
    """The engine the Docker tests use, and the images they made on it."""

    started_here: bool
    docker_host: str
    timings: dict[str, float] = field(default_factory=dict)
    created_images: list[str] = field(default_factory=list)

    def test_tag(self, name: str) -> str:
        return f"{TEST_REPO}/{name}:{SESSION_ID}"

    def build(self, tag: str, dockerfile: Path, context: Path, *build_args: str) -> float:
        """``docker build --network host``; the tag is removed at the end of the session."""
        argv = ["build", "--network", "host", "-t", tag, "-f", str(dockerfile)]
        for arg in build_args:
            argv += ["--build-arg", arg]
        self.created_images.append(tag)
        start = time.monotonic()
        docker(*argv, str(context), timeout=600)
        return time.monotonic() - start

    def run_python(self, image: str, code: str) -> subprocess.CompletedProcess:
        """``python -c CODE`` in a throwaway container of ``image`` (removed afterwards)."""
        return docker("run", "--rm", "--network", "host", "-e", "PREFECT_HOME=/tmp/.prefect",
                      image, "python", "-c", code, check=False, timeout=120)


def _start_engine() -> tuple[bool, str]:
    """An engine that answers: (started by us?, DOCKER_HOST). pytest.skip if impossible."""
    if shutil.which("docker") is None:
        pytest.skip("Docker tests skipped: no docker CLI and so no engine "
                    "(apt-get install docker.io, or scripts/setup.sh --test)")
    if engine_answers():
        return False, os.environ.get("DOCKER_HOST", DEFAULT_SOCKET)
    try:
        result = subprocess.run([str(ENGINE_SCRIPT), "start"], capture_output=True, text=True,
                                timeout=180, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.skip("Docker tests skipped: no Docker engine answers, and scripts/docker-engine.sh start "
                    "(dockerd from apt-get install docker.io) did not finish within 180 s")
    if result.returncode != 0:
        pytest.skip("Docker tests skipped: no Docker engine answers and none could be started "
                    "(scripts/docker-engine.sh start, dockerd from apt-get install docker.io: "
                    f"{' / '.join(_tail(result.stderr, 3).splitlines())})")
    line = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    host = line.partition("=")[2] or DEFAULT_SOCKET
    # The script may also have found an engine already running elsewhere (e.g. DOCKER_HOST
    # was stale): only a dockerd it started now is ours to stop.
    return "starting dockerd" in result.stderr, host


# The engine the tests start (scripts/docker-engine.sh) serves every pytest-xdist worker
# process, so it is stopped once, by the controller, after all of them: stopped by the
# worker that started it at the end of its own session, it went away under another worker
# still tearing down its compose services (no socket). The controller names a marker file
# (inherited by the workers); the worker that started the engine creates it.
ENGINE_MARKER_ENV = "SIERRA_PREFECT_TEST_ENGINE_STARTED"


def _stop_engine() -> None:
    subprocess.run([str(ENGINE_SCRIPT), "stop"], capture_output=True, timeout=180,
                   stdin=subprocess.DEVNULL)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller, or a run without xdist
        run_dir = Path(tempfile.mkdtemp(prefix="sierra-prefect-tests-"))
        os.environ[ENGINE_MARKER_ENV] = str(run_dir / "docker-engine-started")


def pytest_unconfigure(config):
    if hasattr(config, "workerinput"):
        return
    marker = os.environ.pop(ENGINE_MARKER_ENV, None)
    if marker:
        if Path(marker).exists():
            _stop_engine()
        shutil.rmtree(Path(marker).parent, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    """A working engine plus the base and worker images; skip only if no engine can start."""
    start = time.monotonic()
    started, host = _start_engine()
    previous_host = os.environ.get("DOCKER_HOST")
    if os.environ.get("DOCKER_HOST", DEFAULT_SOCKET) != host:
        os.environ["DOCKER_HOST"] = host  # for the CLI, docker-py and compose alike
    engine = DockerEngine(started_here=started, docker_host=host)
    engine.timings["engine"] = time.monotonic() - start
    try:
        # The offline base image (Docker Hub is out of reach here); a no-op when present.
        t0 = time.monotonic()
        if not image_exists(BASE_IMAGE):
            result = subprocess.run([str(BASE_IMAGE_SCRIPT)], capture_output=True, text=True,
                                    timeout=900, stdin=subprocess.DEVNULL)
            if result.returncode != 0:
                pytest.fail(f"scripts/build-base-image.sh failed:\n{_tail(result.stderr, 30)}",
                            pytrace=False)
        engine.timings["base image"] = time.monotonic() - t0
        # The worker image from this checkout (layer cache: seconds when nothing changed).
        t0 = time.monotonic()
        env = docker_stack_env(tmp_path_factory.mktemp("image-build-home"))
        built = sierra_prefect("image", "build", "--base-image", BASE_IMAGE, env=env, timeout=900)
        if built.returncode != 0:
            pytest.fail(f"sierra-prefect image build failed:\n{_tail(built.stdout)}\n"
                        f"{_tail(built.stderr, 30)}", pytrace=False)
        engine.timings["worker image"] = time.monotonic() - t0
        print(f"\n[docker] engine {'started' if started else 'found'} at {host}; "
              + ", ".join(f"{k} {v:.1f} s" for k, v in engine.timings.items()))
        yield engine
    finally:
        for tag in reversed(engine.created_images):
            if image_exists(tag):
                docker("rmi", tag, check=False, timeout=120)
        if started:
            marker = os.environ.get(ENGINE_MARKER_ENV)
            if marker:
                Path(marker).touch()  # pytest_unconfigure stops it, once every worker is done
            else:
                _stop_engine()
        if previous_host is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous_host


# -- a stack with a Docker worker --------------------------------------------------------


def docker_stack_env(home: Path) -> dict[str, str]:
    """``base_env`` (which drops SIERRA_PREFECT_*) plus the base image to build from, and the
    images the tests build allowed for flow runs (a derived image, as docs/docker.md says)."""
    return {**base_env(home), "SIERRA_PREFECT_BASE_IMAGE": BASE_IMAGE,
            "SIERRA_PREFECT_ALLOWED_IMAGES": f"{TEST_REPO}/*"}


def bring_up_docker(home: Path) -> StackHandle:
    env = docker_stack_env(home)
    sierra_prefect("up", "--docker", env=env, timeout=600, check=True)
    status = json.loads(sierra_prefect("status", "--json", env=env, check=True).stdout)
    return StackHandle(home=home, env=env, api_url=status["api_url"])


@pytest.fixture(scope="module")
def docker_stack(docker_engine, tmp_path_factory):
    start = time.monotonic()
    handle = bring_up_docker(tmp_path_factory.mktemp("docker-stack-home"))
    print(f"\n[docker] stack with a Docker worker up in {time.monotonic() - start:.1f} s "
          f"at {handle.api_url}")
    yield handle
    handle.cli("down", timeout=180)


# -- the Prefect API, read directly (independent of the shim's internals) -----------------
# ``server``: a stack (its credential is sent), or the URL of a server without one.


def deployment_id(server: StackHandle | str, name: str) -> str:
    api_url, headers = api_of(server)
    flow, _, deployment = name.partition("/")
    response = httpx.get(f"{api_url}/deployments/name/{flow}/{deployment}", headers=headers,
                         timeout=10)
    response.raise_for_status()
    return response.json()["id"]


def flow_run_count(server: StackHandle | str, deployment: str) -> int:
    api_url, headers = api_of(server)
    response = httpx.post(
        f"{api_url}/flow_runs/count",
        json={"deployments": {"id": {"any_": [deployment_id(server, deployment)]}}},
        headers=headers, timeout=10,
    )
    response.raise_for_status()
    return int(response.json())


def workers_online(server: StackHandle | str, pool: str) -> list[str]:
    from sierra_prefect.connection import Connection
    from sierra_prefect.worker import workers_online as online

    api_url, _ = api_of(server)
    auth = server.auth_string if isinstance(server, StackHandle) else None
    return online(Connection(api_url, auth), pool)


def pool_types(server: StackHandle | str) -> dict[str, str]:
    api_url, headers = api_of(server)
    response = httpx.post(f"{api_url}/work_pools/filter", json={}, headers=headers, timeout=10)
    response.raise_for_status()
    return {p["name"]: p["type"] for p in response.json()}


def is_healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- files made by the runs ---------------------------------------------------------------


def owners(root: Path) -> dict[Path, tuple[int, int]]:
    """(uid, gid) of every file and directory below ``root``."""
    return {p: (p.stat().st_uid, p.stat().st_gid) for p in root.rglob("*")}


def world_writable_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)  # explicit: mkdir's mode is cut by the umask
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- pytest-docker: the server and the Docker worker as compose services ------------------


@dataclass(frozen=True)
class ComposeSetup:
    port: int
    api_url: str
    project: str
    data_root: Path  # mounted into the worker service at the same path: its allowed root
    command: str  # docker-compose with its environment, as pytest-docker runs it (shell)

    def logs(self) -> str:
        result = subprocess.run(
            f'{self.command} -f "{COMPOSE_FILE}" -p "{self.project}" logs --no-color --tail 40',
            shell=True, capture_output=True, text=True, timeout=60,
        )
        return result.stdout + result.stderr


@pytest.fixture(scope="session")
def compose_setup(docker_engine, tmp_path_factory) -> ComposeSetup:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose (v1) is missing: apt-get install docker-compose "
                    "(scripts/setup.sh --test does)", pytrace=False)
    port = free_port()
    sock = docker_engine.docker_host.removeprefix("unix://")
    # Every test's tmp_path is under it: the batches the compose worker may mount.
    data_root = tmp_path_factory.getbasetemp().resolve()
    # pytest-docker runs the command through the shell: the variables the compose file
    # interpolates go in front, so the test process's own environment stays untouched.
    command = (f"SIERRA_PREFECT_COMPOSE_PORT={port} SIERRA_PREFECT_COMPOSE_IMAGE={WORKER_IMAGE} "
               f"SIERRA_PREFECT_COMPOSE_DOCKER_SOCK={sock} "
               f"SIERRA_PREFECT_COMPOSE_DATA_ROOT='{data_root}' docker-compose")
    return ComposeSetup(port=port, api_url=f"http://127.0.0.1:{port}/api",
                        project=f"sierra-prefect-test-{SESSION_ID}", data_root=data_root,
                        command=command)


@pytest.fixture(scope="session")
def docker_compose_command(compose_setup) -> str:
    return compose_setup.command


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_compose_project_name(compose_setup) -> str:
    return compose_setup.project


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # Compose v1 has no `up --wait`: start detached, the test polls the server's health.
    return ["up -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --timeout 30"]


@pytest.fixture(scope="module")
def compose_early(request):
    """Start the compose services at the start of the module if a selected test uses them.

    The server's first start (database migrations, ~20 s here) then overlaps the embedded
    stack's start-up instead of adding to the module's time. pytest-docker still owns the
    services: ``docker_services`` starts them (`up -d`) and takes them down (`down -v`).
    """
    if any("docker_services" in getattr(item, "fixturenames", ()) for item in request.session.items):
        try:
            request.getfixturevalue("docker_services")
        except (Exception, pytest.fail.Exception):
            # pytest keeps the error of the session fixture: the compose test reports it,
            # the other tests of the module need no compose services.
            pass


def start_batch(deployment: str, batch: Path, scratch: Path, *extra: str, env: dict,
                as_json: bool = True) -> subprocess.Popen:
    """``sierra-prefect run ... [--json]`` in the background (see ``finish``)."""
    from tests.helpers import CLI

    return subprocess.Popen(
        [CLI, "run", deployment, "--input-root", str(batch), "--scratch-root", str(scratch),
         *extra, *(["--json"] if as_json else [])],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a ``start_batch`` with a deadline; on timeout stop its process group."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 2)  # Ctrl-C: the shim cancels its flow run
        out, err = proc.communicate(timeout=90)
        raise AssertionError(f"{proc.args} did not finish within {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

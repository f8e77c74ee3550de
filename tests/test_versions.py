"""Prefect versions that differ: the rule (sierra_prefect/versions.py) and a real server of
the previous minor version.

The previous minor comes from uv.lock's ``prefect-previous`` group, installed in
``<project>/.venv-prefect-previous`` (``SIERRA_PREFECT_PREVIOUS_PYTHON`` names another
interpreter); without it the server tests are skipped (a failure under CI=true). Run::

    .venv/bin/python -m pytest -q tests/test_versions.py
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from sierra_prefect.lock import locked_version
from sierra_prefect.versions import VersionMismatch, check_versions, compatible, mismatch
from tests.helpers import PROJECT, base_env, make_batch, sierra_prefect, stop_group, wait_until

PREVIOUS_PYTHON_ENV = "SIERRA_PREFECT_PREVIOUS_PYTHON"
SERVER_START_DEADLINE = 180.0  # a fresh home runs every migration first (15-25 s here)

CURRENT = locked_version(PROJECT)
PREVIOUS = locked_version(PROJECT, group="prefect-previous")


def _bump(version: str, part: int) -> str:
    """``version`` with release part ``part`` (1: minor, 2: patch) one higher."""
    release = [int(x) for x in version.split(".")[:3]]
    release[part] += 1
    return ".".join(map(str, release[: part + 1] + [0] * (2 - part)))


# -- the rule ----------------------------------------------------------------------------


def test_lock_pins_two_minors():
    assert CURRENT.split(".")[:2] != PREVIOUS.split(".")[:2], "prefect-previous must be another minor"


def test_patch_differences_pass_minor_differences_do_not():
    patch = _bump(CURRENT, 2)
    assert compatible(CURRENT, patch) and compatible(patch, CURRENT)
    check_versions(CURRENT, patch, image="img", image_version=patch)
    assert not compatible(CURRENT, PREVIOUS) and not compatible(PREVIOUS, CURRENT)
    assert not compatible(CURRENT, _bump(CURRENT, 1))
    assert not compatible(CURRENT, None) and not compatible(CURRENT, "not-a-version")


def test_client_of_another_minor_is_one_line_with_both_versions_and_the_fix():
    with pytest.raises(VersionMismatch) as info:
        check_versions(CURRENT, PREVIOUS, api_url="http://h:1/api")
    message = str(info.value)
    assert "\n" not in message
    assert f"client {CURRENT}, server {PREVIOUS} at http://h:1/api" in message
    assert "use a client of the server's version" in message


def test_image_of_another_minor_names_all_three_and_the_fix():
    message = mismatch(CURRENT, CURRENT, image="lab/worker:1", image_version=PREVIOUS)
    assert f"image lab/worker:1 has {PREVIOUS}, client {CURRENT}, server {CURRENT}" in message
    assert "build the image for the server's version" in message and "\n" not in message
    # Client and server differ too: the client is what to change, the image is still named.
    both = mismatch(CURRENT, PREVIOUS, image="lab/worker:1", image_version=PREVIOUS)
    assert f"image lab/worker:1 has {PREVIOUS}" in both and "use a client" in both


def test_flow_run_of_another_minor_says_what_to_rebuild():
    message = mismatch(CURRENT, PREVIOUS, who="flow run")
    assert f"flow run {CURRENT}, server {PREVIOUS}" in message
    assert "start the worker from a venv, or build the image, of the server's version" in message


# -- a real server of the previous minor ---------------------------------------------------


def _previous_python() -> Path:
    path = Path(os.environ.get(PREVIOUS_PYTHON_ENV) or PROJECT / ".venv-prefect-previous/bin/python")
    if not path.is_file():
        pytest.skip(
            f"no Python with the previous minor Prefect at {path}: run "
            f"`uv sync --only-group prefect-previous --no-install-project` into "
            f"{PROJECT / '.venv-prefect-previous'} or set {PREVIOUS_PYTHON_ENV}"
        )
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def previous_server(tmp_path_factory):
    """A Prefect server of the previous minor version on loopback; its API URL."""
    python = _previous_python()
    home = tmp_path_factory.mktemp("previous-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SIERRA_PREFECT_"))}
    env.update(PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = open(home / "server.log", "wb")
    server = subprocess.Popen(
        [str(python), "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        def up():
            if server.poll() is not None:
                raise AssertionError(f"server exited {server.returncode}: see {home / 'server.log'}")
            return _healthy(url)

        wait_until(up, SERVER_START_DEADLINE, f"the previous-minor server on {url}", interval=0.5)
        yield url
    finally:
        # Only what we started: its process group (uvicorn's children) by our pid.
        stop_group(server)
        log.close()


def _client_env(tmp_path: Path, api_url: str) -> dict[str, str]:
    """A client with nothing of its own running, pointed at ``api_url``."""
    env = {**base_env(tmp_path / "home"), "PREFECT_API_URL": api_url}
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return env


def _flow_run_count(api_url: str) -> int:
    response = httpx.post(f"{api_url}/flow_runs/count", json={}, timeout=10.0)
    response.raise_for_status()
    return response.json()


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_server_is_the_locked_previous_minor(previous_server):
    assert httpx.get(f"{previous_server}/admin/version", timeout=5.0).json() == PREVIOUS


def test_check_against_previous_minor_server_is_one_line(previous_server, tmp_path):
    result = sierra_prefect("check", "sierra/local", env=_client_env(tmp_path, previous_server),
                            timeout=120)
    line = _one_error_line(result)
    assert line.startswith("sierra-prefect: error: Prefect versions differ: ")
    assert f"client {CURRENT}, server {PREVIOUS} at {previous_server}" in line
    assert "use a client of the server's version" in line


def test_run_against_previous_minor_server_refuses_before_any_run(previous_server, tmp_path):
    batch, scratch = make_batch(tmp_path, [f"touch {tmp_path}/ran-{i}" for i in range(3)])
    before = _flow_run_count(previous_server)
    result = sierra_prefect("run", "sierra/local", "--input-root", str(batch),
                            "--scratch-root", str(scratch),
                            env=_client_env(tmp_path, previous_server), timeout=120)
    line = _one_error_line(result)
    assert f"client {CURRENT}, server {PREVIOUS} at {previous_server}" in line
    assert _flow_run_count(previous_server) == before, "no flow run may be created"
    assert not list(tmp_path.glob("ran-*"))


def test_flow_run_of_another_minor_refuses_before_any_run(previous_server, tmp_path):
    """A stale worker (its Prefect is not the server's minor) fails the flow run at once."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.sierra_batch import sierra

    batch, scratch = make_batch(tmp_path, [f"touch {tmp_path}/ran-{i}" for i in range(3)])
    # Logs stay local: sent at exit, they would find the server already stopped.
    with temporary_settings({PREFECT_API_URL: previous_server, PREFECT_LOGGING_TO_API_ENABLED: False}):
        state = sierra(input_root=str(batch), scratch_root=str(scratch), return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match=f"flow run {CURRENT}, server {PREVIOUS}"):
        state.result()
    assert not list(tmp_path.glob("ran-*"))

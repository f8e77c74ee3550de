"""Our worker types (`sierra-process`, `sierra-docker`) with real servers, workers and Docker.

- A flow run (or a deployment) that sets a job variable its pool does not allow (`command`,
  `env`, `working_dir`; a `/` mount, a privileged container, an image nobody allowed) is
  refused by the worker before anything starts: Failed, named "Refused", one line naming the
  variable and the fix in its state message; it never ran (no Running state, no
  infrastructure pid, no marker file of its batch or of the override, and for Docker no
  container event at all for it).
- The shim's own overrides still pass: the roots' mounts, `--image` (an allowed one),
  `--host-user`, `--mount`.
- `sierra-prefect run` wakes its stack's worker (SIGUSR1): a worker that polls only every
  120 s still picks a flow run up within seconds.

Pure rule-by-rule checks of the allow-list are in tests/test_job_policy_unit.py.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import pytest

from sierra_prefect.worker import wake_workers
from tests.docker_support import SESSION_ID, TEST_REPO, WORKER_IMAGE, docker
from tests.helpers import StackHandle, base_env, make_batch, sierra_prefect, wait_until

POLL_SECONDS = 120  # the stack's worker polls this rarely: a prompt pick-up is a wake-up
REFUSED = "refused by the worker: "


@contextmanager
def prefect_client(api_url: str, auth_string: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth_string}), \
            get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory):
    """A stack whose worker polls every 120 s (and so depends on being woken)."""
    home = tmp_path_factory.mktemp("slow-poll-home")
    env = {**base_env(home), "SIERRA_PREFECT_WORKER_QUERY_SECONDS": str(POLL_SECONDS)}
    try:
        sierra_prefect("up", env=env, timeout=300, check=True)
        status = json.loads(sierra_prefect("status", "--json", env=env, check=True).stdout)
        yield home, env, status["api_url"]
    finally:
        sierra_prefect("down", env=env, timeout=120)


def final_state(client, flow_run_id, deadline: float = 90):
    return wait_until(lambda: (s := client.read_flow_run(flow_run_id).state) and s.is_final() and s,
                      deadline, f"flow run {flow_run_id} to end")


def assert_refused_before_start(client, flow_run_id, *says: str) -> str:
    """Failed "Refused", one line naming what and the fix; it never ran."""
    state = final_state(client, flow_run_id)
    message = state.message or ""
    assert (state.type.value, state.name) == ("FAILED", "Refused"), (state.type, state.name, message)
    assert message.startswith(REFUSED) and "\n" not in message, message
    for text in says:
        assert text in message, message
    history = [s.type.value for s in client.read_flow_run_states(flow_run_id)]
    assert "RUNNING" not in history, history
    assert client.read_flow_run(flow_run_id).infrastructure_pid is None
    return message


# -- sierra-process ----------------------------------------------------------------------------


def test_process_pool_refuses_overrides_before_anything_runs(slow_stack, tmp_path):
    home, env, api_url = slow_stack
    evil = tmp_path / "override-ran"
    cases = {
        "command": ({"command": f"touch {evil}"}, ["job variable 'command'", "sierra-process pool"]),
        "env": ({"env": {"LD_PRELOAD": str(tmp_path / "evil.so")}}, ["job variable 'env.LD_PRELOAD'"]),
        "working_dir": ({"working_dir": "/"}, ["job variable 'working_dir'"]),
    }
    with prefect_client(api_url, StackHandle(home, env, api_url).auth_string) as client:
        stock = client.read_deployment_by_name("sierra/local")
        # A deployment of its own that sets the command is refused the same way.
        rogue = client.create_deployment(
            flow_id=stock.flow_id, name=f"rogue-{SESSION_ID}", work_pool_name="sierra-pool",
            entrypoint=stock.entrypoint, path=stock.path, pull_steps=stock.pull_steps,
            parameter_openapi_schema=stock.parameter_openapi_schema,
            job_variables={"command": f"touch {evil}"})
        runs = {}
        for case, (variables, _) in cases.items():
            batch, scratch = make_batch(tmp_path / case, [f"touch {tmp_path / case / 'ran'}"])
            runs[case] = client.create_flow_run_from_deployment(
                stock.id, parameters={"input_root": str(batch), "scratch_root": str(scratch)},
                job_variables=variables).id
        batch, scratch = make_batch(tmp_path / "rogue", [f"touch {tmp_path / 'rogue' / 'ran'}"])
        runs["deployment"] = client.create_flow_run_from_deployment(
            rogue, parameters={"input_root": str(batch), "scratch_root": str(scratch)}).id
        cases["deployment"] = ({}, ["job variable 'command'", "by a flow run or deployment"])
        # What `sierra-prefect run` does after creating its flow run; the poll is 120 s away.
        assert wake_workers(home / "stack.json", "sierra-pool", api_url)
        for case, flow_run_id in runs.items():
            assert_refused_before_start(client, flow_run_id, *cases[case][1], "drop it")
        client.delete_deployment(rogue)
    assert not evil.exists()
    assert not list(tmp_path.glob("*/ran"))
    assert not list(tmp_path.glob("*/scratch/sierra-prefect/runs"))


def test_run_wakes_its_worker_and_the_batch_runs(slow_stack, tmp_path):
    """The shim's own path: no job variables, picked up at once though the poll is 120 s."""
    home, env, api_url = slow_stack
    out = tmp_path / "out"
    batch, scratch = make_batch(tmp_path, [f"echo ok > {out}"])
    waits = []
    for _ in range(2):  # two in a row: a lucky poll twice within seconds is ~0.1 % likely
        result = sierra_prefect("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                                str(scratch), "--no-resume", "--json", env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        flow_run_id = UUID(json.loads(result.stdout)["flow_run_id"])
        with prefect_client(api_url, StackHandle(home, env, api_url).auth_string) as client:
            created = client.read_flow_run(flow_run_id).created
            pending = min(s.timestamp for s in client.read_flow_run_states(flow_run_id)
                          if s.type.value == "PENDING")
        waits.append((pending - created).total_seconds())
    print(f"\n[workers] created -> picked up with a {POLL_SECONDS} s poll: "
          + ", ".join(f"{w:.2f} s" for w in waits))
    assert max(waits) < 10, waits
    assert out.read_text() == "ok\n"
    # Only a worker of the pool and the server asked about.
    assert wake_workers(home / "stack.json", "sierra-docker-pool", api_url) == []
    assert wake_workers(home / "stack.json", "sierra-pool", "http://127.0.0.1:9/api") == []


# -- sierra-docker -----------------------------------------------------------------------------


def container_actions(flow_run_id, since: float) -> list[str]:
    """Every Docker event of a container of this flow run since ``since`` (epoch seconds)."""
    result = docker("events", "--since", f"{since:.3f}", "--until", f"{time.time() + 1:.3f}",
                    "--filter", "type=container", "--filter", f"label=io.prefect.flow-run-id={flow_run_id}",
                    "--format", "{{.Action}}", timeout=60)
    return result.stdout.split()


def roots_volumes(batch: Path, scratch: Path) -> list[str]:
    return [f"{batch}:{batch}:rw", f"{scratch}:{scratch}:rw"]


@pytest.mark.docker
@pytest.mark.slow
def test_docker_pool_refuses_escapes_and_starts_no_container(docker_stack, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = {
        "mount /": ({"volumes": ["/:/host:rw"]}, ["volume source '/'", "is outside the roots"]),
        "mount outside": ({"volumes": [f"{outside}:{outside}:rw"]}, [f"volume source '{outside}'"]),
        "privileged kwargs": ({"container_create_kwargs": {"privileged": True}},
                              ["container_create_kwargs may hold only 'user'", "not 'privileged'"]),
        "privileged": ({"privileged": True}, ["job variable 'privileged'", "sierra-docker pool"]),
        "image": ({"image": "busybox:latest"}, ["image 'busybox:latest' is not allowed",
                                                "SIERRA_PREFECT_ALLOWED_IMAGES"]),
        "user name": ({"container_create_kwargs": {"user": "root"}}, ["is not a numeric UID[:GID]"]),
        "command": ({"command": "sh -c id"}, ["job variable 'command'"]),
    }
    since = time.time() - 1
    with prefect_client(docker_stack.api_url, docker_stack.auth_string) as client:
        deployment = client.read_deployment_by_name("sierra/dockerremote")
        runs = {}
        for case, (variables, _) in cases.items():
            slug = case.replace(" ", "-").replace("/", "root")
            batch, scratch = make_batch(tmp_path / slug, [f"touch {tmp_path / slug / 'ran'}"])
            (scratch / "sierra-prefect").mkdir(parents=True)  # as `sierra-prefect run` leaves it
            volumes = roots_volumes(batch, scratch) + variables.pop("volumes", [])
            runs[case] = client.create_flow_run_from_deployment(
                deployment.id, parameters={"input_root": str(batch), "scratch_root": str(scratch)},
                job_variables={"volumes": volumes, **variables}).id
        for case, flow_run_id in runs.items():
            message = assert_refused_before_start(client, flow_run_id, *cases[case][1])
            print(f"\n[workers] {case}: {message}")
    for case, flow_run_id in runs.items():
        assert container_actions(flow_run_id, since) == [], case
    assert not list(tmp_path.glob("*/ran"))
    assert not list(outside.iterdir())


@pytest.mark.docker
@pytest.mark.slow
def test_the_shims_own_docker_overrides_still_run(docker_engine, docker_stack, tmp_path):
    """--image (an allowed one), --host-user and --mount, with the roots' mounts: it runs,
    in a container (whose events the check above would have seen)."""
    alias = docker_engine.test_tag("alias")
    docker_engine.created_images.append(alias)
    docker("tag", WORKER_IMAGE, alias, timeout=60)
    assert alias.startswith(f"{TEST_REPO}/")  # allowed by the test stack's SIERRA_PREFECT_ALLOWED_IMAGES
    data = tmp_path / "batch" / "data"
    data.mkdir(parents=True)
    (data / "in.txt").write_text("mounted\n")
    out = tmp_path / "batch" / "out.txt"
    batch, scratch = make_batch(tmp_path, [f"cat /extra/in.txt > {out}; id -u >> {out}"])
    since = time.time() - 1
    result = sierra_prefect("run", "sierra/dockerremote", "--input-root", str(batch), "--scratch-root",
                            str(scratch), "--image", alias, "--host-user", "--mount", f"{data}:/extra:ro",
                            "--json", env=docker_stack.env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["state"] == "COMPLETED" and summary["succeeded"] == 1
    assert out.read_text() == f"mounted\n{os.getuid()}\n"
    assert "create" in container_actions(summary["flow_run_id"], since)

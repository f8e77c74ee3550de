"""Docker: batches through `sierra/dockerremote` on a real engine, and the remote setup.

- End to end on the embedded stack with a Docker worker (`sierra-prefect up --docker`):
  every run's output lands on the host; with `--host-user` everything the runs write is
  owned by the caller's uid:gid, without it by the image's user (uid 1000); a derived
  image with an extra package works; an image with another Prefect is refused before any
  flow run exists.
- Bad input: each a one-line error, a non-zero exit, nothing deleted, nothing run.
- Remote: a Prefect server and a Docker worker as compose services (pytest-docker,
  tests/docker/docker-compose.yml); a client with only PREFECT_API_URL triggers by name.

The engine, the base image and the worker image come from ``docker_engine``
(tests/docker_support.py): reused when present, made when not; the tests skip, saying
why, only if no engine can be started at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.summary import BatchSummary
from sierra_prefect.lock import locked_version
from tests.docker_support import (
    SESSION_ID,
    TEST_REPO,
    WORKER_IMAGE,
    finish,
    flow_run_count,
    image_exists,
    is_healthy,
    owners,
    pool_types,
    start_batch,
    workers_online,
    world_writable_dir,
)
from tests.helpers import PROJECT, base_env, make_batch, sierra_prefect, stop_group, wait_until

# compose_early: the compose server's first start overlaps the stack's (see docker_support).
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.usefixtures("compose_early")]

DOCKER = "sierra/dockerremote"
LOCAL = "sierra/local"
IMAGE_UID = 1000  # the worker image's user (Dockerfile: USER 1000:1000)
HOST = (os.getuid(), os.getgid())
NO_ENGINE = "unix:///nonexistent.sock"
# `run --json`: the flow's summary plus what the shim knows of the flow run.
SUMMARY_KEYS = set(BatchSummary.model_fields) | {"flow_run_id", "state", "message", "ui_url"}


def run_batch(stack, deployment: str, batch: Path, scratch: Path, *extra: str, env=None,
              as_json: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    args = ["run", deployment, "--input-root", str(batch), "--scratch-root", str(scratch), *extra]
    if as_json:
        args.append("--json")
    return sierra_prefect(*args, env=env or stack.env, timeout=timeout, **kw)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"no JSON summary (exit {result.returncode}):\nstdout:\n"
                             f"{result.stdout}\nstderr:\n{result.stderr}") from None


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("sierra-prefect: error: "), result.stderr
    return lines[0]


def identity_batch(tmp_path: Path, experiments: int = 2, runs: int = 3):
    """Runs that write, under the batch dir, who they ran as and whether in a container."""
    out = tmp_path / "batch" / "out"
    commands, outputs = [], []
    for e in range(experiments):
        for k in range(runs):
            target = out / f"c1-exp{e}" / f"run{k}"
            outputs.append(target / "output.txt")
            commands.append(f"mkdir -p {target} && {{ id -u; id -g; test -f /.dockerenv && "
                            f"echo in-container; }} > {target}/output.txt")
    batch, scratch = make_batch(tmp_path, commands)
    return batch, scratch, out, outputs


# -- end to end --------------------------------------------------------------------------


def test_batch_outputs_land_on_the_host_owned_by_the_host_user(docker_stack, tmp_path):
    batch, scratch, out, outputs = identity_batch(tmp_path)
    result = run_batch(docker_stack, DOCKER, batch, scratch, "--host-user", "--max-parallel", "3")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert set(summary) == SUMMARY_KEYS
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (6, 6, 0)
    # At most one run per usable CPU of the worker's host (cores per run 1; flows/resources.py).
    assert summary["state"] == "COMPLETED" and summary["max_parallel"] == min(3, len(os.sched_getaffinity(0)))
    for output in outputs:
        assert output.read_text() == f"{HOST[0]}\n{HOST[1]}\nin-container\n", output
    made = {**owners(out), **owners(scratch / "sierra-prefect" / "runs")}
    assert len(made) >= len(outputs) * 2
    assert {owner for owner in made.values()} == {HOST}, made
    # Logs and success markers of every run, on the host.
    assert len(list((scratch / "sierra-prefect" / "runs").glob("*/done.json"))) == 6


def test_without_host_user_runs_as_the_image_user(docker_stack, tmp_path):
    """Uid 1000 writes where it may (files owned by 1000); a root-owned scratch is a clear error."""
    # Two batches at once: world-writable output and scratch dirs, and a plain scratch dir.
    batch, scratch, out, outputs = identity_batch(tmp_path / "open", experiments=1, runs=3)
    for directory in (out, scratch, scratch / "sierra-prefect"):
        world_writable_dir(directory)
    closed_batch, closed_scratch, closed_out, _ = identity_batch(tmp_path / "closed", experiments=1, runs=2)
    closed_scratch.mkdir()  # owned by the host user (root here), 0755: uid 1000 cannot write
    procs = [start_batch(DOCKER, batch, scratch, env=docker_stack.env),
             start_batch(DOCKER, closed_batch, closed_scratch, env=docker_stack.env, as_json=False)]
    result, closed = (finish(p) for p in procs)

    assert result.returncode == 0, result.stderr
    assert summary_of(result)["succeeded"] == 3
    for output in outputs:
        assert output.read_text() == f"{IMAGE_UID}\n{IMAGE_UID}\nin-container\n"
    made = {**owners(out / "c1-exp0"), **owners(scratch / "sierra-prefect" / "runs")}
    assert made and {owner for owner in made.values()} == {(IMAGE_UID, IMAGE_UID)}, made

    text = closed.stdout + closed.stderr
    assert closed.returncode == 1, text
    assert f"scratch_root '{closed_scratch}' is not writable by uid {IMAGE_UID}" in text, text
    assert "--host-user" in text
    assert not closed_out.exists() and not (closed_scratch / "sierra-prefect" / "runs").exists()


def test_derived_image_with_an_extra_package(docker_engine, docker_stack, tmp_path):
    # docs/derived-image.Dockerfile adds `tabulate`, which uv.lock does not have.
    lock = (PROJECT / "uv.lock").read_text()
    assert 'name = "tabulate"' not in lock
    missing = docker_engine.run_python(WORKER_IMAGE, "import tabulate")
    assert missing.returncode != 0 and "No module named 'tabulate'" in missing.stderr
    tag = docker_engine.test_tag("derived")
    seconds = docker_engine.build(tag, PROJECT / "docs" / "derived-image.Dockerfile",
                                  PROJECT / "docs", f"WORKER_IMAGE={WORKER_IMAGE}")
    print(f"\n[docker] derived image built in {seconds:.1f} s")

    out = world_writable_dir(tmp_path / "batch" / "out")
    commands = [f"python -c \"import tabulate; print(tabulate.tabulate([['run', {i}]]))\" "
                f"> {out}/run{i}.txt" for i in range(3)]
    batch, scratch = make_batch(tmp_path, commands)
    result = run_batch(docker_stack, DOCKER, batch, scratch, "--image", tag, "--host-user")
    assert result.returncode == 0, result.stderr
    assert summary_of(result)["succeeded"] == 3
    for i in range(3):
        assert f"run  {i}" in (out / f"run{i}.txt").read_text()


def test_image_with_another_prefect_is_refused_before_any_run(docker_engine, docker_stack, tmp_path):
    # Another minor (patch differences are compatible): the previous one uv.lock pins.
    locked, other = locked_version(PROJECT), locked_version(PROJECT, group="prefect-previous")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "ARG WORKER_IMAGE\nFROM ${WORKER_IMAGE}\nUSER root\n"
        # Leave the lock on purpose (PIP_CONSTRAINT pins the locked Prefect otherwise).
        f"RUN PIP_CONSTRAINT= pip install --no-cache-dir --no-deps prefect=={other}\n"
        "USER 1000:1000\n"
    )
    tag = docker_engine.test_tag("other-prefect")
    docker_engine.build(tag, dockerfile, tmp_path, f"WORKER_IMAGE={WORKER_IMAGE}")
    # The label is inherited from the worker image and lies; the shim asks the image itself.
    assert docker_engine.run_python(tag, "import prefect; print(prefect.__version__)").stdout.strip() == other

    batch, scratch = make_batch(tmp_path, [f"touch {tmp_path}/ran-{i}" for i in range(3)])
    before = flow_run_count(docker_stack, DOCKER)
    result = run_batch(docker_stack, DOCKER, batch, scratch, "--image", tag)
    line = one_error_line(result)
    assert (f"Prefect versions differ: image {tag} has {other}, client {locked}, "
            f"server {locked}") in line
    assert "sierra-prefect image build" in line
    assert flow_run_count(docker_stack, DOCKER) == before, "no flow run may be created"
    assert not list(tmp_path.glob("ran-*")), "no command may run"
    assert not (scratch / "sierra-prefect" / "runs").exists()


# -- bad input ---------------------------------------------------------------------------


BAD_DOCKER_INPUT = [
    ("image missing", "is not on the Docker engine: build it with `sierra-prefect image build --tag"),
    ("mount malformed", "is not SRC:DST[:ro|rw]"),
    ("mount bad mode", "is not SRC:DST[:ro|rw]"),
    ("mount source missing", "does not exist (or is relative)"),
    ("mount source relative", "does not exist (or is relative)"),
    ("docker options on a process pool", "are for Docker deployments"),
]


@pytest.mark.parametrize("case, expected", BAD_DOCKER_INPUT, ids=[c for c, _ in BAD_DOCKER_INPUT])
def test_bad_docker_input_is_one_clear_line_and_deletes_nothing(docker_stack, tmp_path, case, expected):
    batch, scratch = make_batch(tmp_path, [f"touch {tmp_path}/ran"])
    scratch.mkdir()
    keep = scratch / "keep.txt"
    keep.write_text("precious")
    deployment, extra = DOCKER, []
    if case == "image missing":
        extra = ["--image", f"{TEST_REPO}/does-not-exist:{SESSION_ID}"]
    elif case == "mount malformed":
        extra = ["--mount", f"{tmp_path}"]
    elif case == "mount bad mode":
        extra = ["--mount", f"{tmp_path}:/data:rx"]
    elif case == "mount source missing":
        extra = ["--mount", f"{tmp_path}/nowhere:/data:ro"]
    elif case == "mount source relative":
        extra = ["--mount", "batch:/data"]
    elif case == "docker options on a process pool":
        deployment, extra = LOCAL, ["--image", WORKER_IMAGE, "--host-user"]
    before = flow_run_count(docker_stack, deployment)
    result = run_batch(docker_stack, deployment, batch, scratch, *extra, cwd=tmp_path)
    assert expected in one_error_line(result)
    assert keep.read_text() == "precious" and (batch / "commands.txt").is_file()
    assert not (tmp_path / "ran").exists()
    assert flow_run_count(docker_stack, deployment) == before


@pytest.mark.sierra
@pytest.mark.parametrize("case", ["malformed", "missing path"])
def test_sierra_docker_extra_mounts_bad_is_a_clear_error(docker_stack, tmp_path, case):
    """Real SIERRA with --execenv prefectdeploy.dockerremote and a bad --docker-extra-mounts."""
    pytest.importorskip("sierra", reason="sierra-research (test extra) is not installed")
    from tests.sierra_support import run_sierra, sierra_env

    mount = "data:/data" if case == "malformed" else f"{tmp_path}/nowhere:/data:ro"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    before = flow_run_count(docker_stack, DOCKER)
    result = run_sierra(
        tmp_path / "sierra-root", execenv="prefectdeploy.dockerremote", n_runs=1, n_experiments=2,
        extra_args=["--exec-strict", "--docker-is-host-user", "--docker-extra-mounts", mount],
        env=sierra_env(base=docker_stack.client_env), timeout=240,
    )
    print(f"\n[docker] SIERRA, --docker-extra-mounts {case}: exit {result.returncode} "
          f"in {result.elapsed:.1f} s")
    assert result.returncode != 0, result.stdout[-3000:]
    if case == "malformed":
        # The shim validates mounts (one implementation); execenv_check asks it before stage 2.
        assert "--mount source 'data' does not exist (or is relative)" in result.stdout, result.stdout[-3000:]
        assert not list((tmp_path / "sierra-root").rglob("data.csv")), "no run may have run"
    else:
        assert f"--mount source '{tmp_path}/nowhere' does not exist" in result.stdout, result.stdout[-3000:]
        assert not list((tmp_path / "sierra-root").rglob("data.csv")), "no run may have run"
    assert keep.read_text() == "precious"
    assert flow_run_count(docker_stack, DOCKER) == before


def test_unbuildable_image_is_a_clear_error(docker_engine, tmp_path):
    tag = docker_engine.test_tag("unbuildable")
    docker_engine.created_images.append(tag)
    env = {**base_env(tmp_path / "home"),
           "SIERRA_PREFECT_BASE_IMAGE": f"{TEST_REPO}/no-such-base:{SESSION_ID}"}
    result = sierra_prefect("image", "build", "--tag", tag, env=env, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sierra-prefect: error: building image {tag} failed"), result.stderr
    assert "--base-image" in last
    assert not image_exists(tag)
    assert image_exists(WORKER_IMAGE), "the existing worker image is left alone"


def test_engine_down_image_build_is_a_clear_error(docker_engine, tmp_path):
    env = {**base_env(tmp_path / "home"), "DOCKER_HOST": NO_ENGINE}
    tag = f"{TEST_REPO}/engine-down:{SESSION_ID}"
    line = one_error_line(sierra_prefect("image", "build", "--tag", tag, env=env, timeout=120))
    assert "the Docker engine is not reachable" in line
    # What a user does (not the test suite's own engine script).
    assert "start the Docker daemon" in line and "DOCKER_HOST" in line and "scripts/" not in line
    assert image_exists(WORKER_IMAGE)


def test_engine_down_warns_at_the_client_and_fails_clearly_at_the_worker(docker_stack, tmp_path):
    """No engine where `sierra-prefect run` runs: it warns that it cannot check the image.

    - The stack's Docker worker has an engine: the batch runs (a client without Docker
      triggering a lab server; the flow checks its Prefect against the server's itself).
    - A Docker worker without an engine (its own pool and a copy of the deployment): one
      crashed flow run, exit 1, a message naming Docker, nothing run, nothing deleted.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    pool = f"sierra-test-no-engine-{SESSION_ID}"
    name = f"no-engine-{SESSION_ID}"
    api, credential = docker_stack.api_url, docker_stack.auth_string
    client_env = {**docker_stack.env, "DOCKER_HOST": NO_ENGINE}
    api_settings = {PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: credential}
    with temporary_settings(api_settings), get_client(sync_client=True) as client:
        template = client.read_work_pool("sierra-docker-pool").base_job_template
        client.create_work_pool(WorkPoolCreate(name=pool, type="sierra-docker",
                                               base_job_template=template))
        stock = client.read_deployment_by_name(DOCKER)
        deployment_id = client.create_deployment(
            flow_id=stock.flow_id, name=name, work_pool_name=pool, entrypoint=stock.entrypoint,
            pull_steps=stock.pull_steps, job_variables=stock.job_variables, path=stock.path,
            parameter_openapi_schema=stock.parameter_openapi_schema,
        )
    worker_env = {**client_env, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": credential,
                  "PREFECT_WORKER_QUERY_SECONDS": "1",
                  "PREFECT_HOME": str(tmp_path / "worker-prefect-home")}
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "sierra-docker",
         "--name", f"no-engine-worker-{SESSION_ID}"],
        env=worker_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Meanwhile: the engine is down only where the client runs.
        batch, scratch, out, outputs = identity_batch(tmp_path / "client-only", experiments=1, runs=2)
        client_only = start_batch(DOCKER, batch, scratch, "--host-user", env=client_env)

        wait_until(lambda: workers_online(docker_stack, pool) or worker.poll() is not None, 90,
                   "the engine-less worker to come online")
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
        down_batch, down_scratch = make_batch(tmp_path / "no-engine", [f"touch {tmp_path}/ran"])
        down_scratch.mkdir()
        (down_scratch / "keep.txt").write_text("precious")
        down = finish(start_batch(f"sierra/{name}", down_batch, down_scratch, env=client_env,
                                  as_json=False), timeout=180)
        result = finish(client_only)

        warning = f"not checking image {WORKER_IMAGE} here: the Docker engine is not reachable"
        assert warning in result.stderr
        assert result.returncode == 0, result.stderr
        assert summary_of(result)["succeeded"] == 2
        assert all(o.read_text().endswith("in-container\n") for o in outputs)

        text = down.stdout + down.stderr
        print(f"\n[docker] engine down for client and worker: exit {down.returncode}\n{text}")
        assert down.returncode == 1, text
        assert warning in text
        assert "without a summary" in text and "Could not connect to Docker" in text, text
        assert not (tmp_path / "ran").exists()
        assert (down_scratch / "keep.txt").read_text() == "precious"
    finally:
        stop_group(worker, grace=60)  # our own worker, by its session's id
        log.close()
        with temporary_settings(api_settings), get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)
            client.delete_work_pool(pool)


def test_pool_of_the_wrong_type_is_a_clear_error(docker_stack, tmp_path):
    # A checkout whose workpools/ says sierra-pool is a Docker pool; the server has it as
    # a process pool, and a pool's type cannot change.
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(PROJECT / "prefect.yaml", project)
    shutil.copytree(PROJECT / "workpools", project / "workpools")
    spec_file = project / "workpools" / "sierra-pool.yaml"
    spec = yaml.safe_load(spec_file.read_text())
    assert spec["type"] == "sierra-process"
    spec_file.write_text(yaml.safe_dump({**spec, "type": "sierra-docker"}))
    before = pool_types(docker_stack)
    runs_before = flow_run_count(docker_stack, LOCAL)
    env = {**docker_stack.env, "SIERRA_PREFECT_PROJECT_DIR": str(project)}
    line = one_error_line(sierra_prefect("pools", "apply", env=env, timeout=120))
    assert ("work pool 'sierra-pool' exists with type 'sierra-process' but workpools/ says "
            "'sierra-docker'") in line
    assert "prefect work-pool delete sierra-pool" in line
    assert pool_types(docker_stack) == before
    assert flow_run_count(docker_stack, LOCAL) == runs_before  # deployment still there
    assert docker_stack.cli("pools", "apply").returncode == 0  # the real checkout still agrees


# -- the remote story: server and Docker worker as compose services ---------------------


def _remote_client_env(home: Path, api_url: str) -> dict[str, str]:
    """A client elsewhere: a fresh HOME, no sierra-prefect stack, only PREFECT_API_URL."""
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SIERRA_PREFECT_"))}
    env.update(HOME=str(home), PREFECT_HOME=str(home / ".prefect"), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _comparable(summary: dict) -> dict:
    """A summary less what differs between two stacks: paths, ids, addresses, worker names,
    and what is measured (a failed run's peak memory)."""
    plain = {k: v for k, v in summary.items()
             if k not in ("input_root", "scratch_root", "flow_run_id", "ui_url", "workers", "message")}
    plain["runs_executed"] = sum(summary["workers"].values())
    plain["failed_runs"] = [{k: v for k, v in run.items() if k not in ("stdout", "stderr", "peak_memory")}
                            for run in summary["failed_runs"]]
    return plain


def test_remote_server_and_docker_worker_as_compose_services(docker_services, compose_setup,
                                                             docker_stack, tmp_path):
    api = compose_setup.api_url
    start = time.monotonic()
    docker_services.wait_until_responsive(check=lambda: is_healthy(api), timeout=180, pause=0.5)
    healthy_after = time.monotonic() - start
    env = _remote_client_env(tmp_path / "client-home", api)
    assert "SIERRA_PREFECT_HOME" not in env

    # The server side, once: the pools and the deployments, from this checkout.
    applied = sierra_prefect("pools", "apply", env=env, timeout=120, cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                              cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    try:
        wait_until(lambda: workers_online(api, "sierra-docker-pool"), 120,
                   "the compose Docker worker to be online")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{compose_setup.logs()}") from None
    assert workers_online(api, "sierra-docker-pool") == ["compose-docker-worker"]
    ready_after = time.monotonic() - start
    check = sierra_prefect("check", DOCKER, env=env, timeout=120, cwd=tmp_path)
    assert check.returncode == 0 and api in check.stdout, check.stderr

    # Three batches at once: a good one from the remote client, and a failing one each
    # from the remote client and on the local stack, whose summaries must agree.
    batch, scratch, out, outputs = identity_batch(tmp_path / "good", experiments=1, runs=4)
    t0 = time.monotonic()
    procs = {"good": start_batch(DOCKER, batch, scratch, "--host-user", env=env)}
    for where, stack_env in (("remote", env), ("local", docker_stack.env)):
        failing, failing_scratch = make_batch(tmp_path / where, ["echo fine", "echo bad >&2; exit 7", "true"])
        procs[where] = start_batch(DOCKER, failing, failing_scratch, "--host-user", env=stack_env)
    results = {name: finish(proc) for name, proc in procs.items()}
    batches_seconds = time.monotonic() - t0

    good = results["good"]
    assert good.returncode == 0, good.stderr
    summary = summary_of(good)
    assert set(summary) == SUMMARY_KEYS and summary["ui_url"].startswith(api.removesuffix("/api"))
    assert (summary["total"], summary["succeeded"], summary["state"]) == (4, 4, "COMPLETED")
    for output in outputs:
        assert output.read_text() == f"{HOST[0]}\n{HOST[1]}\nin-container\n"
    assert {o for o in owners(out).values()} == {HOST}

    remote, local = (summary_of(results[w]) for w in ("remote", "local"))
    assert results["remote"].returncode == results["local"].returncode == 1
    assert set(remote) == set(local) == SUMMARY_KEYS
    assert _comparable(remote) == _comparable(local)
    [failed] = remote["failed_runs"]
    assert failed["exit_code"] == 7 and failed["command"] == "echo bad >&2; exit 7"
    assert Path(failed["stderr"]).read_text() == "bad\n"
    assert (remote["total"], remote["succeeded"], remote["failed"], remote["state"]) == (3, 2, 1, "FAILED")
    print(f"\n[docker] compose: server healthy {healthy_after:.1f} s and worker online "
          f"{ready_after:.1f} s after the test started; 3 batches at once {batches_seconds:.1f} s")

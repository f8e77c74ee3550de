"""The job-variable allow-list of our worker types (sierra_prefect/job_policy.py), rule by rule.

Pure: real paths under tmp_path (symlinks, ``..``), no server. The workers that apply it are
tested end to end in tests/test_worker_types.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sierra_prefect.job_policy import JobPolicy, job_overrides, pool_defaults
from sierra_prefect.worker import catches

PROCESS_DEFAULTS = {"command": "python -m sierra_prefect.warm_engine",
                    "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}, "stream_output": True}
DOCKER_DEFAULTS = {"image": "sierra-prefect/worker:latest", "image_pull_policy": "IfNotPresent",
                   "auto_remove": True, "network_mode": "host", "privileged": False,
                   "env": {"PREFECT_HOME": "/tmp/.prefect"}}


def policy(uid: int = 1000, **kw) -> JobPolicy:
    return JobPolicy(uid=uid, gids=[uid, 27], **kw)


@pytest.fixture
def batch(tmp_path) -> dict[str, str]:
    """A batch as `sierra-prefect run` leaves it: commands.txt, and scratch/sierra-prefect/."""
    (tmp_path / "batch").mkdir()
    (tmp_path / "batch" / "commands.txt").write_text("true\n")
    (tmp_path / "scratch" / "sierra-prefect").mkdir(parents=True)
    return {"input_root": str(tmp_path / "batch"), "scratch_root": str(tmp_path / "scratch")}


def docker(p: JobPolicy, overrides: dict, parameters: dict | None = None) -> str | None:
    return p.check("docker", DOCKER_DEFAULTS, overrides, parameters or {})


def roots_volumes(batch: dict[str, str]) -> list[str]:
    return [f"{batch['input_root']}:{batch['input_root']}:rw",
            f"{batch['scratch_root']}:{batch['scratch_root']}:rw"]


# -- merging as Prefect's workers merge --------------------------------------------------


def test_overrides_merge_env_key_by_key_and_nest_dotted_keys():
    merged = job_overrides({"env": {"A": "1", "B": "2"}, "image": "x"},
                           {"env": {"B": "3"}, "image": "y", "container_create_kwargs.privileged": True})
    assert merged == {"env": {"A": "1", "B": "3"}, "image": "y",
                      "container_create_kwargs": {"privileged": True}}
    assert job_overrides(None, None) == {}
    # The nested form wins over the dotted one, as in from_template_and_values.
    assert job_overrides({}, {"env.A": "1", "env": {"A": "2"}}) == {"env": {"A": "2"}}


def test_pool_defaults_are_the_templates_defaults():
    from sierra_prefect.pools import WorkPoolSpec

    specs = {s.name: s for s in WorkPoolSpec.load_all(Path(__file__).parent.parent / "workpools")}
    defaults = pool_defaults(specs["sierra-docker-pool"].base_job_template())
    assert defaults["image"] == "sierra-prefect/worker:latest" and defaults["network_mode"] == "host"
    process = pool_defaults(specs["sierra-pool"].base_job_template())
    assert process["command"] == "python -m sierra_prefect.warm_engine"


# -- sierra-process: nothing may change ---------------------------------------------------


@pytest.mark.parametrize(("overrides", "named"), [
    ({"command": "touch /tmp/x"}, "'command'"),
    ({"env": {"LD_PRELOAD": "/tmp/evil.so"}}, "'env.LD_PRELOAD'"),
    ({"env.PATH": "/tmp/evil"}, "'env.PATH'"),
    ({"working_dir": "/etc"}, "'working_dir'"),
    ({"stream_output": False}, "'stream_output'"),
])
def test_process_pool_refuses_every_override(overrides, named):
    line = policy().check("process", PROCESS_DEFAULTS, job_overrides({}, overrides), {})
    assert line is not None and "\n" not in line
    assert f"job variable {named} may not be set by a flow run or deployment" in line
    assert "sierra-process pool" in line and "drop it" in line and "workpools/" in line


def test_process_pool_accepts_the_pools_own_values():
    p = policy()
    assert p.check("process", PROCESS_DEFAULTS, {}, {}) is None
    same = {"command": PROCESS_DEFAULTS["command"], "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}}
    assert p.check("process", PROCESS_DEFAULTS, same, {}) is None


def test_allowed_roots_confine_the_flow_runs_roots_before_it_starts(tmp_path, batch):
    allowed = tmp_path / "allowed"
    (allowed / "inside").mkdir(parents=True)
    p = policy(allowed_roots=[allowed])
    assert p.check("process", PROCESS_DEFAULTS, {}, {"input_root": str(allowed / "inside")}) is None
    sneaky = f"{allowed}/../batch"
    for parameters in ({"input_root": batch["input_root"]}, {"input_root": sneaky},
                       {"input_root": str(allowed / "inside"), "workdir": "/"}):
        line = p.check("process", PROCESS_DEFAULTS, {}, parameters)
        assert line is not None and "is outside the allowed roots" in line, parameters
    assert "is not a path" in p.check("process", PROCESS_DEFAULTS, {}, {"input_root": ["/"]})


# -- sierra-docker: image ----------------------------------------------------------------


def test_image_is_the_pools_or_an_allowed_pattern():
    p = policy()
    assert docker(p, {"image": "sierra-prefect/worker:latest"}) is None
    assert docker(p, {"image": "sierra-prefect/worker"}) is None  # untagged means :latest
    line = docker(p, {"image": "evil/root:1"})
    assert "image 'evil/root:1' is not allowed on this pool (allowed: sierra-prefect/worker:latest)" in line
    assert "SIERRA_PREFECT_ALLOWED_IMAGES" in line
    lab = policy(allowed_images=["my-lab/*", "sim:2"])
    assert docker(lab, {"image": "my-lab/sim:1"}) is None and docker(lab, {"image": "sim:2"}) is None
    assert docker(lab, {"image": "sim:3"}) is not None
    assert docker(lab, {"image": "{{ prefect.variables.image }}"}) is not None


# -- sierra-docker: volumes --------------------------------------------------------------


def test_the_batchs_own_roots_may_be_mounted(batch):
    assert docker(policy(), {"volumes": roots_volumes(batch)}, batch) is None
    inner = Path(batch["scratch_root"]) / "sierra-prefect"
    assert docker(policy(), {"volumes": [f"{inner}:/x:ro"]}, batch) is None


@pytest.mark.parametrize("source", ["/", "/etc", "{tmp}", "{tmp}/batch/..", "{tmp}/link-to-etc",
                                    "{tmp}/batch/../elsewhere"])
def test_mounts_outside_the_batch_are_refused(tmp_path, batch, source):
    (tmp_path / "link-to-etc").symlink_to("/etc")
    (tmp_path / "elsewhere").mkdir()
    source = source.format(tmp=tmp_path)
    line = docker(policy(), {"volumes": [*roots_volumes(batch), f"{source}:/host:rw"]}, batch)
    assert line is not None and "\n" not in line
    assert f"volume source '{source}'" in line and "is outside the roots a flow run may mount" in line
    assert "SIERRA_PREFECT_ALLOWED_ROOTS" in line


def test_a_root_counts_only_when_it_looks_like_a_batch(tmp_path, batch):
    """`--scratch-root /` (or any directory without sierra-prefect/) widens nothing."""
    for parameters in ({**batch, "scratch_root": "/"}, {**batch, "input_root": "/"},
                       {**batch, "scratch_root": str(tmp_path)}):
        target = "/" if "/" in parameters.values() else str(tmp_path)
        line = docker(policy(), {"volumes": [f"{target}:{target}:rw"]}, parameters)
        assert line is not None and "is outside the roots" in line, parameters


def test_the_workers_home_may_be_mounted(tmp_path, batch):
    home = tmp_path / "home"
    (home / "sierra-root").mkdir(parents=True)
    assert docker(policy(home=home), {"volumes": [f"{home}/sierra-root:{home}/sierra-root"]}, batch) is None
    assert docker(policy(home=Path("/")), {"volumes": ["/etc:/etc:ro"]}, batch) is not None


def test_allowed_roots_replace_the_default(tmp_path, batch):
    data = tmp_path / "data"
    data.mkdir()
    p = policy(allowed_roots=[data])
    assert docker(p, {"volumes": [f"{data}:/data:ro"]}, {}) is None
    line = docker(p, {"volumes": roots_volumes(batch)}, batch)
    assert "is outside the allowed roots" in line  # the roots themselves, first


@pytest.mark.parametrize(("volume", "says"), [
    ("{tmp}/a:b:/data", "is not SRC:DST[:ro|rw] with absolute paths (a path holding ':'"),
    ("{tmp}:/data:rx", "is not SRC:DST[:ro|rw]"),
    ("named-volume:/data", "is not SRC:DST[:ro|rw]"),
    ("./relative:/data", "is not SRC:DST[:ro|rw]"),
    ("{tmp}/missing:/data", "does not exist on the worker's host"),
])
def test_malformed_or_missing_volumes_are_refused(tmp_path, batch, volume, says):
    line = docker(policy(home=tmp_path), {"volumes": [volume.format(tmp=tmp_path)]}, batch)
    assert line is not None and says in line, line
    assert "is not a list" in docker(policy(), {"volumes": "/:/host"}, batch)


# -- sierra-docker: container_create_kwargs and the rest -------------------------------


def test_only_the_workers_own_user_may_be_set_unless_it_is_root():
    assert docker(policy(1000), {"container_create_kwargs": {"user": "1000:1000"}}) is None
    assert docker(policy(1000), {"container_create_kwargs": {"user": "1000:27"}}) is None
    for user in ("0:0", "0", "1001:1000", "1000:0"):
        line = docker(policy(1000), {"container_create_kwargs": {"user": user}})
        assert f"container user '{user}' is not this worker's own uid 1000" in line, user
    assert "is not a numeric UID[:GID]" in docker(policy(1000), {"container_create_kwargs": {"user": "root"}})
    assert docker(policy(0), {"container_create_kwargs": {"user": "4321:4321"}}) is None
    assert docker(policy(0), {"container_create_kwargs": {"user": "0:0"}}) is None


@pytest.mark.parametrize(("overrides", "says"), [
    ({"container_create_kwargs": {"privileged": True}},
     "may hold only 'user' (what --host-user sets), not 'privileged'"),
    ({"container_create_kwargs": {"user": "0", "cap_add": ["ALL"]}}, "not 'cap_add'"),
    ({"container_create_kwargs.devices": ["/dev/sda"]}, "not 'devices'"),
    ({"privileged": True}, "job variable 'privileged' may not be set"),
    ({"network_mode": "none"}, "job variable 'network_mode' may not be set"),
    ({"command": "sh -c 'id'"}, "job variable 'command' may not be set"),
    ({"env": {"PREFECT_HOME": "/tmp/.prefect", "LD_PRELOAD": "x"}}, "job variable 'env.LD_PRELOAD'"),
    ({"image_pull_policy": "Always"}, "job variable 'image_pull_policy'"),
])
def test_everything_else_is_refused(overrides, says):
    line = docker(policy(0), job_overrides({}, overrides))
    assert line is not None and says in line and "\n" not in line, line
    kwargs = any(k.startswith("container_create_kwargs") for k in overrides)
    assert ("container_create_kwargs may hold only 'user'" if kwargs
            else "only image, volumes and container_create_kwargs.user") in line


def test_a_pool_default_of_container_create_kwargs_cannot_be_dropped():
    defaults = {**DOCKER_DEFAULTS, "container_create_kwargs": {"read_only": True}}
    p = policy(1000)
    kept = {"container_create_kwargs": {"read_only": True, "user": "1000"}}
    assert p.check("docker", defaults, kept) is None
    assert "not 'read_only'" in p.check("docker", defaults, {"container_create_kwargs": {"user": "1000"}})


def test_refusals_stay_one_line_whatever_the_input():
    line = docker(policy(), {"bad\nkey": "x\ny", "image": "a\nb"})
    assert line is not None and "\n" not in line and "\\n" in line


def test_from_environment_reads_the_workers_settings(tmp_path):
    p = JobPolicy.from_environment({"SIERRA_PREFECT_ALLOWED_ROOTS": f"{tmp_path}:{tmp_path}/b",
                                    "SIERRA_PREFECT_ALLOWED_IMAGES": " a/*, b:1 ,"})
    assert p.allowed_roots == [tmp_path.resolve(), (tmp_path / "b").resolve()]
    assert p.allowed_images == ["a/*", "b:1"] and p.uid == os.getuid()
    assert JobPolicy.from_environment({}).allowed_roots is None


# -- waking a worker: only a process that catches the signal --------------------------------


def test_catches_tells_a_handler_from_the_default_action():
    plain = subprocess.Popen(["sleep", "30"])
    code = ("import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: None); "
            "print('ready', flush=True); time.sleep(30)")
    handled = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert handled.stdout.readline().strip() == "ready"
        assert catches(handled.pid, signal.SIGUSR1) and not catches(plain.pid, signal.SIGUSR1)
        assert not catches(handled.pid, signal.SIGUSR2)
    finally:
        for proc in (plain, handled):  # ours, by handle
            proc.kill()
            proc.wait()
    assert not catches(plain.pid, signal.SIGUSR1)  # gone


def test_the_process_job_environment_is_prefects_computed_once_per_settings():
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessJobConfiguration

    from sierra_prefect.worker_types import SierraProcessJobConfiguration as Ours

    assert Ours._base_environment() == ProcessJobConfiguration._base_environment()
    Ours._base_environment()["SIERRA_TEST_MUTATION"] = "1"  # a caller's copy, not ours
    assert "SIERRA_TEST_MUTATION" not in Ours._base_environment()
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # new settings: anew
        assert Ours._base_environment()["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
    assert Ours._base_environment() == ProcessJobConfiguration._base_environment()

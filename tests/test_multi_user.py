"""Shared machines, with real users: one user's stack is closed to every other user.

Two unprivileged users are made for the session (tests/users_support.py): the *owner*
brings a stack up with ``sierra-prefect up`` in the default home, from an install of this
checkout both can run; the *other* user, on the same machine, tries what a curious or
hostile neighbour on a lab server or an HPC login node would try. Each attack is a test;
docs/security.md lists them. What an attack would have done is a marker file (written by
the owner's uid if it worked) or a flow run the server counts: a test proves both stayed
away, not merely that an error was printed.

Then the owner's own use, unchanged: ``sierra-prefect run``, SIERRA through the plugin,
the ``prefect`` CLI after ``eval "$(sierra-prefect env)"``, and (Docker, at the end of the
module: the engine is shared) ``--host-user`` runs whose every file is the owner's.

Flow runs with job variables that would change what the worker executes are made with the
owner's credential: a leaked trigger path, the strongest position short of the owner's
account. They must be refused before anything runs, whoever asks.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests import sierra_support as ss
from tests.helpers import wait_until
from tests.users_support import SIMULATOR_ENV, LocalUser, UserStack, bring_down, bring_up

pytestmark = [pytest.mark.slow]

LOCAL, DOCKER = "sierra/local", "sierra/dockerremote"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NO_CREDENTIAL = ("the owner's stack has no credential: after `eval \"$(sierra-prefect env)\"` "
                 "the owner's shell holds no PREFECT_API_AUTH_STRING")


# -- helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """The other user's batch: one run that writes ``marker`` if it ever runs (as anyone)."""

    batch: Path
    scratch: Path
    marker: Path

    @property
    def parameters(self) -> dict[str, str]:
        return {"input_root": str(self.batch), "scratch_root": str(self.scratch)}


def attack_batch(user: LocalUser, name: str) -> Attack:
    """A batch of ``user``'s that anyone's runs could read and write (as an attacker would
    leave it): the only thing that can stop it is the stack."""
    root = user.mkdir(user.home / name)
    loot = user.mkdir(root / "loot", mode=0o777)
    marker = loot / "marker"
    batch = user.write(root / "batch" / "commands.txt", f"id -u > {marker}\n").parent
    scratch = user.mkdir(root / "scratch", mode=0o777)
    return Attack(batch, scratch, marker)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's single ``sierra-prefect: error: ...`` line, no traceback."""
    text = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0, f"exited 0:\n{text}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sierra-prefect: error: "), text
    return lines[0]


def owners(*roots: Path) -> dict[Path, tuple[int, int]]:
    """(uid, gid) of everything below ``roots`` (and the roots)."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            found[path] = (stat.st_uid, stat.st_gid)
    return found


@dataclass(frozen=True)
class Attempt:
    """What became of a flow run asked for with some job variables."""

    flow_run_id: str | None  # None: the server refused to create it
    state: str  # final state type, or "REFUSED AT CREATION", or the last state seen
    message: str
    history: tuple[str, ...]


def attempt_flow_run(stack: UserStack, deployment: str, parameters: dict, job_variables: dict,
                     marker: Path, deadline: float = 120) -> Attempt:
    """Create a flow run of ``deployment`` with Prefect's client and the stack user's
    credential, then wait until it ends (or the attack's marker shows it ran)."""
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        with stack.prefect_client() as client:
            found = client.read_deployment_by_name(deployment)
            flow_run = client.create_flow_run_from_deployment(
                found.id, parameters=parameters, job_variables=job_variables)
    except PrefectHTTPStatusError as exc:
        return Attempt(None, "REFUSED AT CREATION",
                       f"HTTP {exc.response.status_code}: {exc.response.text}", ())
    run_id = str(flow_run.id)

    def ended() -> dict | None:
        run = stack.flow_run(run_id)
        state = run.get("state") or {}
        return run if state.get("type") in FINAL_STATES or marker.exists() else None

    try:
        run = wait_until(ended, deadline, f"flow run {run_id} to end")
    except AssertionError:
        run = stack.flow_run(run_id)
    state = run.get("state") or {}
    return Attempt(run_id, state.get("type", "?"), state.get("message") or "",
                   tuple(stack.state_history(run_id)))


def assert_refused(attempt: Attempt, marker: Path, names: tuple[str, ...]) -> None:
    """Refused (by the server, or by the worker before it started anything), in one line
    naming the job variable, and nothing ran."""
    assert not marker.exists(), (f"the flow run ran: {marker} was written by uid "
                                 f"{marker.read_text().strip()} ({attempt})")
    refused = attempt.state == "REFUSED AT CREATION" or (
        attempt.state in FINAL_STATES - {"COMPLETED"} and "RUNNING" not in attempt.history)
    assert refused, f"not refused before it ran: {attempt}"
    lines = attempt.message.strip().splitlines()
    assert len(lines) == 1, f"the refusal is not one line: {attempt.message!r}"
    assert any(name in lines[0] for name in names), f"the refusal names none of {names}: {lines[0]}"


# -- what the other user can see ---------------------------------------------------------


def test_other_user_cannot_read_the_stack_home(owner_stack, users):
    home = owner_stack.home
    assert home.is_relative_to(users.owner.home), f"the default home {home} is not the owner's"
    paths = [str(p) for p in [home, *home.rglob("*")] if not p.is_socket()]
    assert len(paths) > 3, f"nothing to try in {home}: {paths}"
    result = users.other.probe("read", {"paths": paths})
    readable = sorted(Path(p).relative_to(home).as_posix() or "." for p, how in result.items()
                      if how == "ok")
    assert not readable, f"{users.other.name} can read these in the owner's stack home: {readable}"


def test_other_users_api_calls_are_refused(owner_stack, users):
    """Read runs, logs, artifacts, deployments; trigger the deployment two ways; poll the
    pool as a worker would; edit the deployment: every one 401. Only /health answers."""
    attack = attack_batch(users.other, "api-attack")
    deployment = owner_stack.deployment(LOCAL)
    did, fid = deployment["id"], deployment["flow_id"]
    before = owner_stack.flow_run_count()
    api = [
        ("GET", "/api/admin/version", None),
        ("POST", "/api/flow_runs/filter", {}),
        ("POST", "/api/logs/filter", {}),
        ("POST", "/api/artifacts/filter", {}),
        ("POST", "/api/deployments/filter", {}),
        ("GET", "/api/deployments/name/sierra/local", None),
        ("POST", "/api/work_pools/filter", {}),
        ("POST", f"/api/deployments/{did}/create_flow_run", {"parameters": attack.parameters}),
        ("POST", "/api/flow_runs/", {"flow_id": fid, "deployment_id": did,
                                     "parameters": attack.parameters}),
        ("POST", "/api/work_pools/sierra-pool/get_scheduled_flow_runs", {}),
        ("PATCH", f"/api/deployments/{did}", {"description": "changed by another user"}),
    ]
    open_routes = [("GET", "/api/health", None), ("GET", "/ui-settings", None)]
    answers = users.other.probe("http", {"base": owner_stack.server_url,
                                         "requests": [list(r) for r in api + open_routes]})
    statuses = {f"{m} {p}": a[0] for (m, p, _), a in zip(api, answers, strict=False)}
    assert {route: s for route, s in statuses.items() if s != 401} == {}, statuses
    health, ui = answers[len(api):]
    assert health[0] == 200, health
    # The UI is served, and asks for the credential (Prefect's UI shows its login).
    assert ui[0] == 200 and json.loads(ui[1]).get("auth") == "BASIC", ui
    # Nothing was created or changed, and nothing ran.
    assert owner_stack.flow_run_count() == before
    assert owner_stack.deployment(LOCAL).get("description") == deployment.get("description")
    assert not attack.marker.exists()


def test_other_users_websocket_subscriptions_are_refused(owner_stack, users):
    """Events and logs stream over websockets, outside the HTTP middleware: reading A's
    events (every flow run's name, parameters, state) or sending events to A's automations."""
    result = users.other.probe("websocket", {"base": owner_stack.api_url,
                                             "routes": ["/events/out", "/events/in", "/logs/out"]})
    accepted = {route: how for route, how in result.items() if not how.startswith("refused")}
    assert len(result) == 6 and not accepted, result


@pytest.mark.parametrize("how", ["api-url", "stack-home"])
def test_other_users_trigger_through_the_shim_is_refused(owner_stack, users, how):
    """``sierra-prefect run`` as the other user, pointed at the owner's server by its URL,
    or at the owner's stack home (its state, credential and warm engine): one line, and
    nothing runs."""
    other = users.other
    attack = attack_batch(other, f"shim-attack-{how}")
    env = (other.env(PREFECT_API_URL=owner_stack.api_url) if how == "api-url"
           else other.env(SIERRA_PREFECT_HOME=str(owner_stack.home)))
    before = owner_stack.flow_run_count()
    # umask 0: whatever the shim makes under the scratch root, the owner's runs could write.
    result = other.sierra_prefect("run", LOCAL, "--input-root", str(attack.batch),
                                  "--scratch-root", str(attack.scratch), env=env, umask=0,
                                  timeout=180)
    one_error_line(result)
    assert owner_stack.flow_run_count() == before
    assert not attack.marker.exists()


def test_other_user_cannot_use_the_warm_engine(owner_stack, users):
    """The warm engine forks anything as the owner for whoever connects: no one else may."""
    pid = owner_stack.status()["pids"]["warm_engine"]
    assert pid, "no warm engine runs in the owner's stack: nothing to try"
    sockets = sorted({c.laddr for c in psutil.Process(pid).net_connections("unix") if c.laddr})
    assert sockets, f"the warm engine (pid {pid}) listens on no Unix socket"
    result = users.other.probe("unix", {"paths": sockets})
    assert not [p for p, how in result.items() if how == "connected"], result


# -- what a flow run may ask of the worker -----------------------------------------------


# What planted Python code does when it runs: leave the marker, with the uid it ran as.
_WRITE_UID = "import os\nwith open({marker!r}, 'w') as f:\n    f.write(str(os.getuid()))\n"


def _plant_sitecustomize(user: LocalUser, marker: Path) -> dict:
    evil = user.mkdir(user.home / "evil-env")
    user.write(evil / "sitecustomize.py", _WRITE_UID.format(marker=str(marker)))
    return {"env": {"PYTHONPATH": str(evil)}}


def _plant_module(user: LocalUser, marker: Path) -> dict:
    # The job command is `python -m sierra_prefect.warm_engine`: -m looks in the working
    # directory first.
    evil = user.mkdir(user.home / "evil-cwd")
    user.write(evil / "sierra_prefect" / "__init__.py", "")
    user.write(evil / "sierra_prefect" / "warm_engine.py", _WRITE_UID.format(marker=str(marker)))
    return {"working_dir": str(evil)}


PROCESS_OVERRIDES = {
    "command": lambda user, marker: {"command": f"/bin/sh -c 'id -u > {marker}'"},
    "env": _plant_sitecustomize,
    "working_dir": _plant_module,
}


@pytest.mark.parametrize("variable", list(PROCESS_OVERRIDES))
def test_a_flow_run_cannot_change_what_the_process_worker_runs(owner_stack, users, variable):
    """A flow run of sierra/local overriding ``command``, ``env`` (a PYTHONPATH with a
    sitecustomize) or ``working_dir`` (a directory shadowing the job's module), asked for
    with the owner's own credential: refused by the worker before any process starts."""
    other = users.other
    attack = attack_batch(other, f"override-{variable}")
    job_variables = PROCESS_OVERRIDES[variable](other, attack.marker)
    attempt = attempt_flow_run(owner_stack, LOCAL, attack.parameters, job_variables, attack.marker)
    assert_refused(attempt, attack.marker, (variable,))


# -- the owner's own use, unchanged ------------------------------------------------------


def test_owner_runs_a_batch_as_before(owner_stack, users):
    owner = users.owner
    work = owner.mkdir(owner.home / "work" / "plain")
    out = owner.mkdir(work / "out")
    commands = [f"echo run{i} > {out}/run{i}.txt && id -u >> {out}/run{i}.txt" for i in range(4)]
    batch = owner.write(work / "batch" / "commands.txt", "\n".join(commands) + "\n").parent
    scratch = work / "scratch"
    result = owner_stack.cli("run", LOCAL, "--input-root", str(batch), "--scratch-root", str(scratch),
                             "--max-parallel", "2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (4, 4, 0)
    for i in range(4):
        assert (out / f"run{i}.txt").read_text() == f"run{i}\n{owner.uid}\n"
    made = owners(out, scratch)
    assert len(list((scratch / "sierra-prefect" / "runs").glob("*/done.json"))) == 4
    assert {uid for uid, _ in made.values()} == {owner.uid}, made


def test_runs_get_the_workers_environment_but_never_the_credential(owner_stack, users):
    """Simulators need the worker's environment (LD_LIBRARY_PATH, ARGOS_PLUGIN_PATH, ROS_*);
    the stack's credential is not theirs to read (nor to leak into their logs)."""
    secret = owner_stack.credential
    assert secret, NO_CREDENTIAL
    owner = users.owner
    work = owner.mkdir(owner.home / "work" / "environment")
    batch = owner.write(work / "batch" / "commands.txt", f"env > {work}/env.txt\n").parent
    result = owner_stack.cli("run", LOCAL, "--input-root", str(batch),
                             "--scratch-root", str(work / "scratch"), "--json")
    assert result.returncode == 0, result.stderr
    seen = dict(line.split("=", 1) for line in (work / "env.txt").read_text().splitlines()
                if "=" in line)
    assert {k: seen.get(k) for k in SIMULATOR_ENV} == SIMULATOR_ENV
    assert not [k for k in seen if "AUTH_STRING" in k or "DATABASE" in k], sorted(seen)
    assert secret not in (work / "env.txt").read_text()


def test_owner_drives_the_stack_from_sierra(owner_stack, users):
    owner, install = users.owner, users.owner.install
    root = owner.mkdir(owner.home / "work" / "sierra") / "sierra-root"
    argv = ss.sierra_argv(root, execenv="prefectdeploy.local", n_runs=2, n_experiments=2,
                          python=str(install.python),
                          extra_args=["--exec-strict", "--exec-jobs-per-node", "2"])
    # The test engine's files, from the install the owner runs (not this checkout).
    argv = [str(install.root / Path(a).relative_to(ss.REPO)) if a.startswith(str(ss.REPO)) else a
            for a in argv]
    plugins = f"{install.root / 'sierra_plugins'}:{install.root / 'tests' / 'sierra_engine'}"
    env = {**owner_stack.env, "SIERRA_PLUGIN_PATH": plugins, "PYTHONUNBUFFERED": "1"}
    result = owner.run(argv, env=env, cwd=root.parent, timeout=ss.DEFAULT_TIMEOUT)
    assert result.returncode == 0, f"SIERRA exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    batch = ss.expected_batch_root(root, 2)
    assert ss.missing_outputs(batch) == []
    assert len(list(root.rglob("sierra-prefect/runs/*/done.json"))) == 4
    assert {uid for uid, _ in owners(root).values()} == {owner.uid}


def test_owner_uses_the_prefect_cli_after_eval_env(owner_stack, users):
    env = {**owner_stack.env, "COLUMNS": "200"}
    listed = users.owner.with_stack_env(["prefect", "deployment", "ls"], env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "sierra/local" in listed.stdout and "sierra/dockerremote" in listed.stdout, listed.stdout
    pools = users.owner.with_stack_env(["prefect", "work-pool", "ls"], env=env, timeout=120)
    assert pools.returncode == 0 and "sierra-pool" in pools.stdout, pools.stdout + pools.stderr


def test_each_user_gets_a_stack_of_their_own_closed_to_the_other(owner_stack, users):
    """The other user's own stack: its own credential, which opens only its own server."""
    other = users.other
    theirs = bring_up(other, env=other.env(SIERRA_PREFECT_PORT="auto"))
    try:
        assert theirs.api_url != owner_stack.api_url and theirs.home.is_relative_to(other.home)
        mine = owner_stack.credential
        assert mine, NO_CREDENTIAL
        assert theirs.credential and theirs.credential != mine, "the two stacks share a credential"
        # Their credential, as their shell holds it, on the owner's server: refused.
        answers = other.probe("http", {"base": owner_stack.server_url, "auth": True,
                                       "requests": [["POST", "/api/flow_runs/filter", {}]]},
                              env=theirs.env, with_stack_env=True)
        assert answers[0][0] == 401, answers
        # And their own stack works for them.
        out = other.mkdir(other.home / "own" / "out")
        batch = other.write(other.home / "own" / "batch" / "commands.txt", f"id -u > {out}/id\n").parent
        result = theirs.cli("run", LOCAL, "--input-root", str(batch),
                            "--scratch-root", str(other.home / "own" / "scratch"), "--json")
        assert result.returncode == 0, result.stderr
        assert (out / "id").read_text() == f"{other.uid}\n"
    finally:
        bring_down(theirs)


def test_the_credential_is_nowhere_the_other_user_can_read(owner_stack, users):
    """After a batch of the owner's: no file of the owner's the other user can read (homes,
    /tmp, batch logs, Prefect's own files), no command line, no environment holds it."""
    secret = owner_stack.credential
    assert secret, NO_CREDENTIAL
    owner, other = users.owner, users.other
    # A batch of the owner's whose run prints its environment into its log.
    work = owner.mkdir(owner.home / "work" / "scan")
    batch = owner.write(work / "batch" / "commands.txt", "env\n").parent
    ran = owner_stack.cli("run", LOCAL, "--input-root", str(batch), "--scratch-root", str(work / "scratch"))
    assert ran.returncode == 0, ran.stderr
    needles = (secret.encode(), base64.b64encode(secret.encode()))
    readable = other.probe("find_readable", {"roots": [str(owner.home), "/tmp", "/var/tmp", "/dev/shm"],
                                             "uid": owner.uid})
    files = [Path(p) for p in readable if Path(p).is_file()]
    assert any(p.suffix == ".stdout" for p in files), "the owner's batch logs were not tried"
    leaking = [str(p) for p in files if any(n in p.read_bytes() for n in needles)]
    assert not leaking, f"{other.name} can read the owner's credential in {leaking}"
    seen = other.probe("proc", {"uid": owner.uid})
    assert not [pid for pid, text in seen["cmdlines"].items() if secret in text], \
        "the credential is on a command line"
    assert seen["environ"], "no process of the owner's was found"
    assert not [pid for pid, how in seen["environ"].items() if how == "ok"], seen["environ"]


# -- Docker: at the end of the module, once (the engine is shared) -----------------------


def _identity_batch(owner: LocalUser, name: str, runs: int = 4):
    """Runs that write who they ran as and whether in a container, under the batch
    directory (mounted in the container, as the input root)."""
    work = owner.mkdir(owner.home / "work" / name)
    out = work / "batch" / "out"
    commands, outputs = [], []
    for k in range(runs):
        target = out / f"run{k}"
        outputs.append(target / "output.txt")
        commands.append(f"mkdir -p {target} && {{ id -u; id -g; test -f /.dockerenv && "
                        f"echo in-container; }} > {target}/output.txt")
    batch = owner.write(work / "batch" / "commands.txt", "\n".join(commands) + "\n").parent
    return batch, work / "scratch", out, outputs


@pytest.mark.docker
def test_with_host_user_every_output_and_log_is_the_owners(owner_docker, users):
    owner = users.owner
    batch, scratch, out, outputs = _identity_batch(owner, "docker-host-user")
    result = owner_docker.cli("run", DOCKER, "--input-root", str(batch), "--scratch-root", str(scratch),
                              "--host-user", "--max-parallel", "2", "--json", timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["succeeded"]) == (4, 4), summary
    for output in outputs:
        assert output.read_text() == f"{owner.uid}\n{owner.gid}\nin-container\n", output
    made = owners(out, scratch)
    assert len(made) >= 2 * len(outputs)
    assert set(made.values()) == {(owner.uid, owner.gid)}, {
        str(p): o for p, o in made.items() if o != (owner.uid, owner.gid)}


def _roots(attack: Attack) -> list[str]:
    return [f"{attack.batch}:{attack.batch}:rw", f"{attack.scratch}:{attack.scratch}:rw"]


DOCKER_OVERRIDES = {
    # name: (job variables, what the refusal must name)
    "volumes-root": (lambda a, user: {"volumes": [*_roots(a), "/:/host:ro"],
                                      "container_create_kwargs": {"user": user}}, ("volumes", "mount")),
    "mounts-root": (lambda a, user: {"volumes": _roots(a), "container_create_kwargs": {
        "user": user, "mounts": [{"Type": "bind", "Source": "/", "Target": "/host", "ReadOnly": True}]}},
        ("container_create_kwargs", "mounts")),
    "privileged": (lambda a, user: {"volumes": _roots(a), "privileged": True,
                                    "container_create_kwargs": {"user": user}}, ("privileged",)),
    "user-root": (lambda a, user: {"volumes": _roots(a), "container_create_kwargs": {"user": "0:0"}},
                  ("user",)),
}


def containers_created(flow_run_id: str, since: float) -> list[str]:
    """Containers the engine created for this flow run since ``since`` (epoch seconds)."""
    from tests.docker_support import docker

    result = docker("events", "--since", f"{since:.0f}", "--until", f"{time.time() + 1:.0f}",
                    "--filter", "type=container", "--filter", "event=create",
                    "--filter", f"label=io.prefect.flow-run-id={flow_run_id}",
                    "--format", "{{.Actor.ID}}", timeout=60)
    return result.stdout.split()


@pytest.mark.docker
@pytest.mark.parametrize("case", list(DOCKER_OVERRIDES))
def test_a_docker_flow_run_cannot_mount_the_host_or_escalate(owner_docker, users, case):
    """A flow run of sierra/dockerremote mounting ``/`` (as a volume, or through
    ``container_create_kwargs``), asking for a privileged container or for root inside it:
    refused before any container is created."""
    owner = users.owner
    work = owner.mkdir(owner.home / "work" / f"docker-{case}")
    # The marker in the batch directory: mounted in the container whatever else is.
    marker = work / "batch" / "ran"
    batch = owner.write(work / "batch" / "commands.txt", f"id -u > {marker}\n").parent
    attack = Attack(batch, owner.mkdir(work / "scratch"), marker)
    make, names = DOCKER_OVERRIDES[case]
    since = time.time() - 1
    attempt = attempt_flow_run(owner_docker, DOCKER, attack.parameters,
                               make(attack, f"{owner.uid}:{owner.gid}"), attack.marker, deadline=180)
    assert_refused(attempt, attack.marker, names)
    if attempt.flow_run_id:
        assert containers_created(attempt.flow_run_id, since) == []

"""The warm engine for real (sierra_prefect/warm_engine.py): it serves only clients that run
exactly its code, relays signals and exit codes, and ends what its dead clients started.

Most tests talk to a warm engine of their own, started from a copy of the checkout (so its
``uv.lock`` can be edited), which runs a small module written here (``wt_target``) the way
it runs ``prefect.engine`` for a flow run. The last ones use real stacks: a flow run whose
client is killed, and ``up`` after an upgrade of ``uv.lock``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from sierra_prefect import warm_engine
from tests.helpers import CLI, PROJECT, base_env, make_batch, sierra_prefect, stop_group, wait_until

GRACE = 3  # seconds between SIGTERM and SIGKILL for a child whose client died

# What the warm engine runs for these tests: `python -m wt_target OUT MODE`. It writes its
# pid, then exits (MODE exit=N, after a line on stdout) or waits for signals (MODE term:
# exit 143 on SIGTERM; stubborn: note SIGTERM and go on waiting).
TARGET = '''
import os, signal, sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]


def mark(name, text=""):
    (out / f".{name}").write_text(text)
    (out / f".{name}").rename(out / name)


def on_term(signum, frame):
    mark("term")
    if mode == "term":
        sys.exit(143)


signal.signal(signal.SIGTERM, on_term)
mark("pid", str(os.getpid()))
if mode.startswith("exit="):
    print(f"hello from {os.getpid()}", flush=True)
    sys.exit(int(mode.removeprefix("exit=")))
while True:
    signal.pause()
'''

# A client as `sierra-prefect run` is one: the warm engine of HOME runs MODULE ARGV, or it
# runs here, cold, when the engine does not take it.
CLIENT = '''
import runpy, sys
from pathlib import Path
from sierra_prefect import warm_engine

home, module, *argv = sys.argv[1:]
code = warm_engine.run_module_warm(Path(home), module, argv)
if code is None:
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
sys.exit(code)
'''


def copy_checkout(dest: Path, *extra: str) -> Path:
    """A second checkout of this project (sources, the lock and ``extra``), no venv."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("sierra_prefect", "flows", *extra):
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    shutil.copy2(PROJECT / "uv.lock", dest / "uv.lock")
    return dest


def start_engine(home: Path, argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A warm engine serving ``home``'s socket, its output in ``home``/engine.log; ready."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "engine.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or warm_engine.is_listening(home / "warm-engine.sock"),
                   120, "the warm engine to listen")
        assert proc.poll() is None, (home / "engine.log").read_text()
    except BaseException:
        stop_group(proc)
        raise
    return proc


@dataclass
class Engine:
    home: Path
    checkout: Path
    targets: Path
    env: dict[str, str]

    @property
    def log(self) -> str:
        return (self.home / "engine.log").read_text()

    def client(self, out: Path, mode: str, python: str = sys.executable, pythonpath: str | None = None,
               **env: str) -> subprocess.Popen:
        """A client asking for ``wt_target OUT MODE`` (from another venv or checkout if asked)."""
        out.mkdir(parents=True, exist_ok=True)
        paths = pythonpath if pythonpath is not None else f"{self.checkout}{os.pathsep}{self.targets}"
        return subprocess.Popen(
            [python, "-c", CLIENT, str(self.home), "wt_target", str(out), mode],
            cwd=out, env={**self.env, "PYTHONPATH": paths, **env},  # not the project: its cwd
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def forked(self, pid: int) -> bool:
        """Whether the engine forked the child ``pid`` (its log names it)."""
        return f": engine pid {pid}\n" in self.log


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("warm-engine")
    checkout = copy_checkout(root / "checkout")
    targets = root / "targets"
    targets.mkdir()
    (targets / "wt_target.py").write_text(TARGET)
    home = root / "home"
    env = {**base_env(home), "PYTHONPATH": f"{checkout}{os.pathsep}{targets}"}
    proc = start_engine(home, [sys.executable, "-m", "sierra_prefect.warm_engine", "serve",
                               str(home / "warm-engine.sock"), str(GRACE)], checkout, env)
    yield Engine(home, checkout, targets, env)
    stop_group(proc)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            stop_group(proc)


def _pid(out: Path) -> int:
    wait_until(lambda: (out / "pid").exists(), 120, f"{out}/pid")
    return int((out / "pid").read_text())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- a warm engine of its own ----------------------------------------------------------------


def test_a_client_of_the_same_code_is_forked_with_its_stdio_and_exit_code(engine, tmp_path):
    client = engine.client(tmp_path, "exit=3")
    out, err = _finish(client)
    pid = _pid(tmp_path)
    assert client.returncode == 3, err
    assert pid != client.pid and engine.forked(pid), "forked, not run in the client"
    assert out == f"hello from {pid}\n"  # through the stdout the client handed over
    wait_until(lambda: f"engine pid {pid} exited 3" in engine.log, 30, "the engine's exit")


def test_a_signal_to_the_client_reaches_the_child_as_a_frame(engine, tmp_path):
    client = engine.client(tmp_path, "term")
    pid = _pid(tmp_path)
    assert engine.forked(pid)
    os.kill(client.pid, signal.SIGTERM)  # ours: what the worker does to cancel
    _finish(client)
    assert client.returncode == 143
    assert (tmp_path / "term").exists()


def test_a_client_of_another_venv_runs_cold_and_says_why_at_debug_level(engine, tmp_path):
    other = tmp_path / "other-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True, timeout=120)
    python = str(other / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The same packages as this venv's, seen from another venv (another sys.prefix).
    (Path(site) / "same-packages.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    reason = (f"its venv {os.path.realpath(other)} is not the warm engine's "
              f"({os.path.realpath(sys.prefix)})")
    for level, said in (("DEBUG", True), ("INFO", False)):
        out = tmp_path / level
        client = engine.client(out, "exit=4", python=python, PREFECT_LOGGING_LEVEL=level)
        stdout, stderr = _finish(client)
        assert client.returncode == 4, stderr
        assert _pid(out) == client.pid and stdout == f"hello from {client.pid}\n", "run cold, here"
        assert f"refused wt_target {out} exit=4: {reason}" in engine.log
        assert (f"the warm engine did not take `wt_target` ({reason}): starting it cold" in stderr) == said


def test_a_client_of_another_checkout_runs_cold(engine, tmp_path):
    # Without the copy on its path, the client imports this package from the project.
    client = engine.client(tmp_path, "exit=0", pythonpath=str(engine.targets))
    _, stderr = _finish(client)
    assert client.returncode == 0, stderr
    assert _pid(tmp_path) == client.pid
    assert (f"refused wt_target {tmp_path} exit=0: its checkout {PROJECT} is not the warm "
            f"engine's ({engine.checkout})") in engine.log


def test_after_uv_lock_changed_clients_run_cold_until_its_content_is_back(engine, tmp_path):
    lock = engine.checkout / "uv.lock"
    original = lock.read_bytes()
    try:
        lock.write_bytes(original + b"\n# an upgrade\n")
        client = engine.client(tmp_path / "upgraded", "exit=0")
        _finish(client)
        assert client.returncode == 0 and _pid(tmp_path / "upgraded") == client.pid, "cold"
        assert (f"refused wt_target {tmp_path / 'upgraded'} exit=0: {engine.checkout}/uv.lock "
                "changed since the warm engine started") in engine.log
    finally:
        lock.write_bytes(original)  # the same content again, with a new mtime
    client = engine.client(tmp_path / "restored", "exit=0")
    _finish(client)
    pid = _pid(tmp_path / "restored")
    assert client.returncode == 0 and pid != client.pid and engine.forked(pid), "warm again"


def test_when_the_client_dies_the_child_gets_sigterm_and_ends(engine, tmp_path):
    client = engine.client(tmp_path, "term")
    pid = _pid(tmp_path)
    os.kill(client.pid, signal.SIGKILL)  # ours; as when its worker is killed
    client.wait(timeout=30)
    wait_until(lambda: f"engine pid {pid} exited 143" in engine.log, 30, "the child to exit 143")
    assert (tmp_path / "term").exists(), "its SIGTERM handler ran"
    assert f"client of engine pid {pid} went away: SIGTERM, and SIGKILL if it still runs in {GRACE} s" \
        in engine.log


def test_when_the_client_dies_a_child_that_ignores_sigterm_is_killed_after_the_grace(engine, tmp_path):
    client = engine.client(tmp_path, "stubborn")
    pid = _pid(tmp_path)
    os.kill(client.pid, signal.SIGKILL)
    client.wait(timeout=30)
    wait_until(lambda: (tmp_path / "term").exists(), 30, "SIGTERM to reach the child")
    wait_until(lambda: f"engine pid {pid} exited -9" in engine.log, GRACE + 30, "SIGKILL after the grace")
    assert f"engine pid {pid} still runs {GRACE} s after SIGTERM: SIGKILL" in engine.log
    assert _gone(pid)


def test_an_engine_of_the_protocol_before_makes_the_client_start_cold(tmp_path):
    """A stack started before this protocol (its engine still runs after an upgrade of the
    checkout, until `up`): the new client is not understood, and starts cold, at once."""
    shown = subprocess.run(["git", "-C", str(PROJECT), "show",
                            "32466fa:sierra_prefect/warm_engine.py"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, f"the warm engine of before, from git: {shown.stderr}"
    old = tmp_path / "old_warm_engine.py"
    old.write_text(shown.stdout)
    home = tmp_path / "home"
    env = base_env(home)
    proc = start_engine(home, [sys.executable, str(old), "serve", str(home / "warm-engine.sock")],
                        PROJECT, env)
    try:
        result = subprocess.run([sys.executable, "-m", "sierra_prefect", "run", "--help"], cwd=tmp_path,
                                env={**env, "PREFECT_LOGGING_LEVEL": "DEBUG"}, capture_output=True,
                                text=True, timeout=120)
    finally:
        stop_group(proc)
    assert result.returncode == 0, result.stderr
    assert "Usage: sierra-prefect run [OPTIONS]" in result.stdout
    assert "closed the connection unanswered (an engine of an older sierra-prefect?)" in result.stderr
    log = (home / "engine.log").read_text()
    assert "JSONDecodeError" in log and "engine pid" not in log, log


# -- real stacks -------------------------------------------------------------------------------


def _in_group(group: int) -> list[int]:
    """Live (not zombie) processes of process group ``group``."""
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == group and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def _client_of(worker: int, flow_run: str) -> psutil.Process:
    """The job command (the warm engine's client) the worker started for ``flow_run``."""
    for proc in psutil.Process(worker).children(recursive=True):
        try:
            if ("sierra_prefect.warm_engine" in proc.cmdline()
                    and proc.environ().get("PREFECT__FLOW_RUN_ID") == flow_run):
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no client of flow run {flow_run} under worker pid {worker}")


def test_a_killed_client_ends_its_flow_runs_runs_children_included(stack, tmp_path):
    """Kill the worker's job command of a flow run (SIGKILL, as a killed worker would leave
    it): the forked engine gets SIGTERM, so the flow ends its runs' whole process groups;
    a run's own child (`sleep 300 &`) is not orphaned."""
    marks = tmp_path / "marks"
    marks.mkdir()
    batch, scratch = make_batch(tmp_path, [
        f"echo $SIERRA_PREFECT_FLOW_RUN > {marks}/flow_run; sleep 300 & echo $! > {marks}/child; "
        f"echo $$ > {marks}/leader; wait"])
    trigger = subprocess.Popen([CLI, "run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                                str(scratch), "--json"], env=stack.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    run: list[int] = []
    try:
        wait_until(lambda: (marks / "leader").exists() and (marks / "leader").read_text().strip(),
                   180, "the run to start")
        flow_run = (marks / "flow_run").read_text().strip()
        leader, child = int((marks / "leader").read_text()), int((marks / "child").read_text())
        run += [leader, child]
        group = os.getpgid(leader)
        assert group == leader and os.getpgid(child) == group and _in_group(group)
        client = _client_of(stack.status()["pids"]["workers"][0], flow_run)
        client.kill()  # the one process this test found under its own stack's worker
        wait_until(lambda: not _in_group(group), 60, "the run's process group to end")
        assert _gone(leader) and _gone(child)
        log = stack.home / "logs" / "warm-engine.log"
        [engine] = [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines()
                    if line.startswith(f"flow run {flow_run}: engine pid ")]
        assert f"client of engine pid {engine} went away: SIGTERM" in log.read_text()
        exited = wait_until(lambda: [line for line in log.read_text().splitlines()
                                     if line.startswith(f"engine pid {engine} exited ")],
                            60, "the flow run's engine to exit")
        assert exited != [f"engine pid {engine} exited -9"], "ended by its SIGTERM, within the grace"
        _, err = _finish(trigger, 180)
        assert trigger.returncode != 0, err
    finally:
        if trigger.poll() is None:
            stop_group(trigger)
        for pid in run:  # if the test failed: what it started, by pid
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def _flow_run(env: dict[str, str], root: Path) -> str:
    batch, scratch = make_batch(root, ["true"])
    result = sierra_prefect("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                            str(scratch), "--json", env=env, check=True)
    return json.loads(result.stdout)["flow_run_id"]


def test_after_uv_lock_changed_flow_runs_start_cold_until_up_restarts_the_engine(tmp_path):
    """A stack of another checkout (a copy), upgraded in place: flow runs and triggers start
    cold (and succeed) from then on, and the next `up` restarts the warm engine."""
    checkout = copy_checkout(tmp_path / "checkout", "workpools", "prefect.yaml")
    home = tmp_path / "home"
    env = {**base_env(home), "PYTHONPATH": str(checkout)}  # this package from the copy
    sierra_prefect("up", env=env, check=True)
    log = home / "logs" / "warm-engine.log"
    try:
        first = json.loads(sierra_prefect("status", "--json", env=env, check=True).stdout)["pids"]
        warm = _flow_run(env, tmp_path / "before")
        assert f"flow run {warm}: engine pid " in log.read_text()

        lock = checkout / "uv.lock"
        lock.write_text(lock.read_text() + "\n# an upgrade\n")
        cold = _flow_run(env, tmp_path / "upgraded")
        text = log.read_text()
        changed = f"{checkout}/uv.lock changed since the warm engine started"
        assert f"refused flow run {cold}: {changed}" in text
        assert f"flow run {cold}: engine pid" not in text
        assert f"refused sierra-prefect run sierra/local --input-root: {changed}" in text

        up = sierra_prefect("up", env=env, check=True)
        assert (f"uv.lock changed since it started (an upgrade?): restarting the warm engine "
                f"(pid {first['warm_engine']})") in up.stderr
        second = json.loads(sierra_prefect("status", "--json", env=env, check=True).stdout)["pids"]
        assert second["warm_engine"] not in (None, first["warm_engine"]) and _gone(first["warm_engine"])
        again = _flow_run(env, tmp_path / "after")
        assert f"flow run {again}: engine pid " in log.read_text()
        assert "already up" in sierra_prefect("up", env=env, check=True).stderr, "current now"
    finally:
        sierra_prefect("down", env=env, timeout=120)

"""Shared pieces of the benchmark harness: stacks, timing, process trees, statistics.

Everything is driven the way a user drives it: ``sierra-prefect up/run/down`` as
subprocesses in a temp ``SIERRA_PREFECT_HOME`` with ``SIERRA_PREFECT_PORT=auto``.
Nothing here sleeps to synchronise (conditions are polled with a deadline) and
nothing is stopped by name: only pids this harness started or found under a process
it started.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from flows.resources import process_tree, tree_sum

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLI = str(BIN / "sierra-prefect")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- environment and stacks ------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """Our environment without any Prefect or sierra-prefect setting."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SIERRA_PREFECT_"))
    }


def stack_env(home: Path) -> dict[str, str]:
    env = clean_env()
    env.update(
        SIERRA_PREFECT_HOME=str(home),
        SIERRA_PREFECT_PORT="auto",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(home / "client-prefect-home"),
    )
    return env


class CommandFailed(RuntimeError):
    pass


def run_cmd(argv: list[str], env: dict, timeout: float, cwd: Path | None = None,
            what: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run to completion with a deadline; return the result and its wall time (s)."""
    start = time.perf_counter()
    result = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise CommandFailed(
            f"{what or ' '.join(argv[:3])} exited {result.returncode}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        )
    return result, elapsed


@dataclass
class Stack:
    """One embedded stack in its own SIERRA_PREFECT_HOME, driven through the CLI."""

    home: Path
    env: dict[str, str] = field(init=False)
    is_up: bool = field(default=False, init=False)
    # From `status --json` right after the last `up` (see require_ready).
    report: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.env = stack_env(self.home)

    def cli(self, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
        return run_cmd([CLI, *args], self.env, timeout, what=f"sierra-prefect {' '.join(args[:2])}")

    def up(self) -> float:
        """``sierra-prefect up``; its wall time in seconds (it returns healthy and deployed)."""
        self.is_up = True  # even if it fails half-way, `down` must run
        _, elapsed = self.cli("up", timeout=600)
        return elapsed

    def down(self) -> None:
        if self.is_up:
            self.cli("down", timeout=180)
            self.is_up = False
            self.report = {}

    def status(self) -> dict:
        result, _ = self.cli("status", "--json", timeout=120)
        return json.loads(result.stdout)

    def require_ready(self) -> dict:
        """Healthy, sierra/local deployed, a process worker online (checked after ``up``)."""
        report = self.status()
        problems = []
        if not report.get("healthy"):
            problems.append("server not healthy")
        if "sierra/local" not in report.get("deployments", []):
            problems.append("sierra/local not deployed")
        if not report.get("pools", {}).get("sierra-pool", {}).get("workers_online"):
            problems.append("no process worker online")
        if problems:
            raise CommandFailed(f"stack in {self.home} not ready after up: {', '.join(problems)}")
        self.report = report
        return report

    @property
    def api_url(self) -> str:
        return (self.report or self.require_ready())["api_url"]

    @property
    def auth_string(self) -> str:
        """The stack's credential, from the file `up` keeps in the home (as its owner reads it)."""
        return (self.home / "auth-string").read_text().strip()

    @property
    def client_env(self) -> dict[str, str]:
        """A Prefect client's environment for this stack (what `eval $(sierra-prefect env)` sets)."""
        return {**self.env, "PREFECT_API_URL": self.api_url, "PREFECT_API_AUTH_STRING": self.auth_string}

    @property
    def pids(self) -> dict:
        """``{"server": pid, "workers": [pid, ...]}`` as ``status --json`` reported them."""
        return (self.report or self.require_ready())["pids"]


@contextmanager
def prefect_api(api_url: str, auth_string: str | None) -> Iterator[object]:
    """A sync Prefect client in this process, pointed at ``api_url`` with that credential."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: auth_string}):
        with get_client(sync_client=True) as client:
            yield client


def flow_run_timeline(client, flow_run_id: str) -> dict[str, float]:
    """Epoch seconds of a flow run's state changes: created, pending, running, end."""
    from uuid import UUID

    run = client.read_flow_run(UUID(str(flow_run_id)))
    states = client.read_flow_run_states(UUID(str(flow_run_id)))
    timeline: dict[str, float] = {"created": run.created.timestamp()}
    for state in sorted(states, key=lambda s: s.timestamp):
        key = state.type.value.lower()
        timeline.setdefault(key, state.timestamp.timestamp())
    if run.start_time:
        timeline["start_time"] = run.start_time.timestamp()
    if run.end_time:
        timeline["end_time"] = run.end_time.timestamp()
    return timeline


# Off in smoke mode, where measurements run at the same time and timings do not matter.
WAIT_FOR_QUIET_SERVER = True


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for proc in tree(pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def wait_server_quiet(stack: Stack, threshold: float = 0.15, window: float = 1.0,
                      deadline: float = 180.0) -> float:
    """Wait until the server's process tree uses < ``threshold`` of a core over ``window``.

    After a big batch the server keeps writing the events of its task runs for a while;
    a sample taken then would pay for the previous one. Returns the seconds waited
    (gives up quietly at the deadline: the sample is then taken anyway).
    """
    pid = stack.pids.get("server")
    if not pid or not WAIT_FOR_QUIET_SERVER:
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        before = tree_cpu_seconds(pid)
        time.sleep(window)  # a measurement window, not synchronisation
        if (tree_cpu_seconds(pid) - before) / window < threshold:
            break
    return time.monotonic() - start


# -- polling -----------------------------------------------------------------------------


# -- batches of timed commands -----------------------------------------------------------


def write_batch(directory: Path, commands: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "commands.txt").write_text("\n".join(commands) + "\n")
    return directory


def timed_commands(stamp_dir: Path, n: int, seconds: float) -> list[str]:
    """Runs that record when they start and end (``date +%s.%N``), then sleep."""
    stamp_dir.mkdir(parents=True, exist_ok=True)
    return [
        f"date +%s.%N > {stamp_dir}/r{i:05d}.start; sleep {seconds}; "
        f"date +%s.%N > {stamp_dir}/r{i:05d}.end"
        for i in range(n)
    ]


def read_intervals(stamp_dir: Path) -> list[tuple[float, float]]:
    intervals = []
    for start_file in sorted(stamp_dir.glob("*.start")):
        end_file = start_file.with_suffix(".end")
        try:
            intervals.append((float(start_file.read_text()), float(end_file.read_text())))
        except (OSError, ValueError):
            continue
    return intervals


def max_at_once(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at one instant (touching intervals do not overlap)."""
    events = []
    for start, end in intervals:
        events += [(start, 1), (end, -1)]
    running = peak = 0
    for _, delta in sorted(events):  # at equal times -1 sorts before +1
        running += delta
        peak = max(peak, running)
    return peak


def span(intervals: list[tuple[float, float]]) -> float:
    return max(e for _, e in intervals) - min(s for s, _ in intervals)


def run_cli(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``argv`` to its end, bounded: past ``timeout`` the CLI is killed (returncode None);
    the flow run it started ends with the stack's ``down``."""
    try:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, None, "", f"did not exit within {timeout:.0f} s")


# -- process trees -------------------------------------------------------------------------


def tree(pid: int) -> list[psutil.Process]:
    return process_tree(pid)


def _tree_sum(pid: int, measure) -> int:
    """``measure(proc)`` summed over a process tree; processes that ended meanwhile count 0."""
    return tree_sum(process_tree(pid), measure)


def tree_rss(pid: int) -> int:
    return _tree_sum(pid, lambda proc: proc.memory_info().rss)


def tree_pss(pid: int) -> int:
    """PSS (bytes) of a process tree: pages shared between its processes (a forked
    flow-run process and the warm engine it came from) are counted once in total, not
    once per process as RSS does. Needs root or the same user (``/proc/PID/smaps``)."""
    return _tree_sum(pid, lambda proc: proc.memory_full_info().pss)


class Periodic:
    """Calls ``sample()`` every ``interval`` seconds on a thread, from ``with`` to its end."""

    def __init__(self, interval: float, name: str) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class RssSampler(Periodic):
    """Peak RSS and PSS (bytes) of process trees, sampled in a thread: ``{role: [root pids]}``.

    RSS every ``interval`` seconds; PSS (reading smaps costs more) every ``pss_every``-th
    sample, and on the first.
    """

    def __init__(self, roots: dict[str, list[int]], interval: float = 0.1,
                 pss_every: int = 5) -> None:
        super().__init__(interval, "rss-sampler")
        self.roots = roots
        self.pss_every = pss_every
        self.peaks: dict[str, int] = {role: 0 for role in roots}
        self.pss_peaks: dict[str, int] = {role: 0 for role in roots}
        self.samples = 0

    def sample(self) -> None:
        for role, pids in self.roots.items():
            self.peaks[role] = max(self.peaks[role], sum(tree_rss(p) for p in pids))
            if self.samples % self.pss_every == 0:
                self.pss_peaks[role] = max(self.pss_peaks[role], sum(tree_pss(p) for p in pids))
        self.samples += 1

    def mib(self) -> dict:
        """``{"server_mib": .., "server_pss_mib": .., "worker_mib": .., ...}`` and the count."""
        out: dict = {"samples": self.samples}
        for role in self.roots:
            out[f"{role}_mib"] = self.peaks[role] / 2**20
            out[f"{role}_pss_mib"] = self.pss_peaks[role] / 2**20
        return out


def stack_memory_roots(pids: dict) -> dict[str, list[int]]:
    """The process trees whose memory is measured: the server's, and the worker side's
    (the workers, the warm engine with the flow-run processes it forks and their runs)."""
    return {"server": [pids["server"]] if pids.get("server") else [],
            "worker": [*(pids.get("workers") or []),
                       *([pids["warm_engine"]] if pids.get("warm_engine") else [])]}


def done_markers(scratch: Path) -> int:
    """Runs that succeeded, from the batch's ledger (``<scratch>/sierra-prefect/runs/*/done.json``,
    flows/plan.py): independent of how the flow reports progress."""
    return sum(1 for _ in (scratch / "sierra-prefect" / "runs").glob("*/done.json"))


@dataclass(frozen=True)
class Found:
    pid: int
    create_time: float
    cmdline: str


class TreeWatcher(Periodic):
    """Remembers every descendant of ``pid`` (with its start time) while it runs.

    Used for SIERRA's built-in Prefect plugin, which backgrounds a server and a
    worker: they are reparented once their shell exits, so they are found both by
    having been seen as descendants and by their session (the SIERRA process we
    started leads its own session).
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(interval, "tree-watcher")
        self.pid = pid
        self.seen: dict[int, Found] = {}

    def sample(self) -> None:
        for proc in tree(self.pid)[1:]:
            self._remember(proc)

    def _remember(self, proc: psutil.Process) -> None:
        try:
            if proc.pid not in self.seen:
                self.seen[proc.pid] = Found(
                    proc.pid, proc.create_time(), " ".join(proc.cmdline())[:200]
                )
        except psutil.Error:
            pass

    def leftovers(self) -> list[Found]:
        """Processes still alive that we saw under ``pid`` or that are in its session."""
        alive: dict[int, Found] = {}
        for found in self.seen.values():
            if _same_process(found):
                alive[found.pid] = found
        for proc in psutil.process_iter():
            try:
                if proc.pid != self.pid and os.getsid(proc.pid) == self.pid:
                    self._remember(proc)
                    found = self.seen[proc.pid]
                    if _same_process(found):
                        alive[proc.pid] = found
            except (OSError, psutil.Error, KeyError):
                continue
        return sorted(alive.values(), key=lambda f: f.pid)


def _same_process(found: Found) -> bool:
    try:
        proc = psutil.Process(found.pid)
        return (abs(proc.create_time() - found.create_time) < 0.01
                and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def stop_processes(found: list[Found], grace: float = 20.0) -> list[str]:
    """SIGTERM these exact processes (pid + start time), wait, SIGKILL what is left."""
    lines = []
    for f in found:
        if _same_process(f):
            try:
                os.kill(f.pid, signal.SIGTERM)
                lines.append(f"SIGTERM pid {f.pid}: {f.cmdline}")
            except ProcessLookupError:
                pass
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_same_process(f) for f in found):
        time.sleep(0.1)
    for f in found:
        if _same_process(f):
            try:
                os.kill(f.pid, signal.SIGKILL)
                lines.append(f"SIGKILL pid {f.pid} (still running after {grace:.0f} s)")
            except ProcessLookupError:
                pass
    return lines


# -- statistics and machine ---------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def pairwise_ratios(ours: list[float | None], base: list[float | None]) -> list[float]:
    """ours[i] / base[i] for every repeat i where both were measured."""
    return [o / b for o, b in zip(ours, base, strict=True) if o is not None and b not in (None, 0)]


def machine_info() -> dict:
    import prefect

    try:
        # Not `import sierra`: importing it reconfigures matplotlib (usetex).
        from importlib.metadata import version

        sierra_version = version("sierra-research")
    except Exception:  # optional
        sierra_version = None
    try:
        parallel_version = subprocess.run(
            ["parallel", "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        parallel_version = None
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "prefect": prefect.__version__,
        "sierra_research": sierra_version,
        "gnu_parallel": parallel_version,
        "hostname": platform.node(),
    }


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []

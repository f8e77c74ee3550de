"""What test modules share that is not a fixture: the CLI, batches, waits, versions.

Fixtures live in conftest.py and the ``*_support`` plugins it names; test modules import
only plain helpers from here.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.common import max_at_once, read_intervals, span, stack_env
from sierra_prefect.lock import locked_version
from sierra_prefect.processes import terminate

PROJECT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "sierra-prefect")


def prefect_version() -> str:
    """The Prefect version uv.lock pins for this project: what client and server must be."""
    return locked_version(PROJECT)


def base_env(home: Path) -> dict[str, str]:
    """A stack of its own in ``home`` (any free port, telemetry off), as the benchmarks use."""
    return stack_env(home)


def basic_auth(auth_string: str | None) -> dict[str, str]:
    """HTTP headers that carry ``auth_string`` as Prefect's clients send it."""
    if not auth_string:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


@dataclass
class StackHandle:
    home: Path
    env: dict[str, str]
    api_url: str

    def cli(self, *args: str, timeout: float = 300, check: bool = False, **kw) -> subprocess.CompletedProcess:
        return sierra_prefect(*args, env=self.env, timeout=timeout, check=check, **kw)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    @property
    def auth_string(self) -> str:
        """The stack's credential, found as its owner would: SIERRA_PREFECT_AUTH_STRING if
        it was given, else the file `up` made in the home."""
        return (self.env.get("SIERRA_PREFECT_AUTH_STRING")
                or (self.home / "auth-string").read_text().strip())

    @property
    def headers(self) -> dict[str, str]:
        """For plain HTTP calls to this stack's API."""
        return basic_auth(self.auth_string)

    @property
    def client_env(self) -> dict[str, str]:
        """Environment of a client pointed at this stack (what `eval $(sierra-prefect env)` does)."""
        return {**self.env, "PREFECT_API_URL": self.api_url, "PREFECT_API_AUTH_STRING": self.auth_string}


def api_of(target: StackHandle | str) -> tuple[str, dict[str, str]]:
    """The API URL and the headers for plain HTTP calls to a stack, or to a server given by
    its URL alone (one without a credential, e.g. the compose services)."""
    if isinstance(target, StackHandle):
        return target.api_url, target.headers
    return target, {}


def sierra_prefect(*args: str, env: dict, timeout: float = 300, check: bool = False, **kw):
    result = subprocess.run(
        [CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"sierra-prefect {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def bring_up(home: Path, *extra: str) -> StackHandle:
    env = base_env(home)
    sierra_prefect("up", *extra, env=env, timeout=300, check=True)
    status = json.loads(sierra_prefect("status", "--json", env=env, check=True).stdout)
    return StackHandle(home=home, env=env, api_url=status["api_url"])


def make_batch(root: Path, commands: list[str]) -> tuple[Path, Path]:
    """A batch dir with commands.txt, and a scratch dir path (not created)."""
    batch = root / "batch"
    batch.mkdir(parents=True, exist_ok=True)
    (batch / "commands.txt").write_text("\n".join(commands) + "\n")
    return batch, root / "scratch"


def timed_command(out_dir: Path, name: str, seconds: float, extra: str = "") -> str:
    """A run that records when it started and ended (for overlap checks)."""
    return (
        f"date +%s.%N > {out_dir}/{name}.start; sleep {seconds}; {extra}"
        f"date +%s.%N > {out_dir}/{name}.end"
    )


def max_overlap(out_dir: Path) -> tuple[int, float]:
    """The most runs that were running at once, and the span from first start to last end."""
    intervals = read_intervals(out_dir)
    return max_at_once(intervals), span(intervals)


def wait_until(condition, deadline: float, what: str, interval: float = 0.1):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {deadline} s waiting for {what}")


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop a process group this test started (``proc`` leads it), by its pid: SIGTERM,
    ``grace`` seconds, then SIGKILL, as the shim stops its own processes."""
    def signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # already gone

    if proc.poll() is None:
        terminate([psutil.Process(proc.pid)], grace, signal_all=signal_group)
    proc.wait(timeout=10)


def until_two_workers(seen: Path, deadline: float = 120) -> str:
    """Shell for the start of a run: record this run's worker in ``seen``, then wait until
    runs have started on two workers, or until ``deadline`` seconds after the first run of
    the batch started (one deadline for the whole batch: a batch that never reaches a
    second worker is late once, not once per run). Spread tests use it so that which host
    takes runs does not depend on how fast a cold child starts on a loaded machine."""
    t0 = f"{seen}.t0"
    return (f"echo $PREFECT__WORKER_NAME >> {seen}; [ -s {t0} ] || date +%s > {t0}; "
            f"end=$(( $(cat {t0}) + {int(deadline)} )); "
            f"while [ $(sort -u {seen} | wc -l) -lt 2 ] && [ $(date +%s) -lt $end ]; "
            "do sleep 0.2; done")

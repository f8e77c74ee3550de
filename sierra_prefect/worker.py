"""The stack's Prefect workers: a process worker on ``sierra-pool`` and, with ``up
--docker``, a Docker worker on ``sierra-docker-pool`` (whose image it also builds when it
is missing or stale). Both are our worker types (``sierra-process``, ``sierra-docker``:
sierra_prefect/worker_types.py), started as ``prefect worker start --type ...``.

Each ``Worker`` owns its start, its readiness (seen online by the API) and its stop::

    worker = Worker("process", settings, state, say, save)
    worker.start(api_url, warm_socket)       # returns at once
    worker.wait_online(connection)           # the API lists it ONLINE, within a deadline
    worker.stop()

``workers_online`` is the one answer to "which workers of this pool are online?" (the
stack, ``status`` and the tests ask it), in plain HTTP so no Prefect import is needed.
``wake_workers`` makes the stack's own worker of a pool look for flow runs at once
(SIGUSR1): ``sierra-prefect run`` calls it right after creating a flow run.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from sierra_prefect import warm_engine
from sierra_prefect.connection import Connection
from sierra_prefect.errors import ShimError
from sierra_prefect.processes import ProcessRecord, wait_for
from sierra_prefect.settings import Settings, venv_env
from sierra_prefect.state import StackState
from sierra_prefect.wake import WAKE_SIGNAL, catches

# The pool each kind of worker serves, and its worker type (see workpools/: the pool's type).
WORKER_POOLS = {"process": "sierra-pool", "docker": "sierra-docker-pool"}
WORKER_TYPES = {"process": "sierra-process", "docker": "sierra-docker"}


def workers_online(connection: Connection, pool: str) -> list[str]:
    """Names of the workers of ``pool`` that the server sees online (none if there is no
    such pool, or the server does not answer)."""
    try:
        response = httpx.post(f"{connection.api_url}/work_pools/{pool}/workers/filter", json={},
                              headers=connection.headers(), timeout=10)
        response.raise_for_status()
    except httpx.HTTPError:
        return []
    return sorted(w["name"] for w in response.json() if str(w.get("status", "")).upper() == "ONLINE")


class Worker:
    """One kind of worker of the stack in ``settings.home`` (records: ``state.workers``)."""

    def __init__(self, kind: str, settings: Settings, state: StackState,
                 say: Callable[[str], None], save: Callable[[], None]) -> None:
        self.kind, self.pool, self.role = kind, WORKER_POOLS[kind], f"worker:{kind}"
        self.settings, self.state, self.say, self.save = settings, state, say, save
        self._started: ProcessRecord | None = None
        self._name: str | None = None

    def running(self) -> ProcessRecord | None:
        return next((w for w in self.state.workers if w.role == self.role and w.is_running()), None)

    def is_current(self, project: Path) -> bool:
        """Ours runs (and, for Docker, its image was built from this checkout)."""
        if self.running() is None:
            return False
        if self.kind == "docker":
            from sierra_prefect import docker

            return docker.image_is_current(docker.DEFAULT_TAG, project)
        return True

    def name(self, index: int) -> str:
        # Unique per user, host and home, so stacks sharing a server never collide.
        home = hashlib.sha256(str(self.settings.home).encode()).hexdigest()[:6]
        return f"sierra-{self.kind}-{getpass.getuser()}-{socket.gethostname()}-{home}-{index}"

    def ensure_image(self, project: Path) -> None:
        """The Docker worker's image, built unless current (the process worker has none)."""
        if self.kind != "docker":
            return
        from sierra_prefect import docker

        if docker.image_is_current(docker.DEFAULT_TAG, project):
            self.say(f"image {docker.DEFAULT_TAG} is current")
            return
        log = self.settings.logs_dir / "image-build.log"
        self.say(f"building image {docker.DEFAULT_TAG} (log: {log})")
        docker.build_image(project, docker.DEFAULT_TAG, self.settings.base_image, log,
                           self.settings.docker_network_mode)

    def start(self, api_url: str, warm_socket: Path | None = None) -> None:
        """Start ours unless it runs; returns at once (see ``wait_online``). Flow runs of
        the process pool fork from the warm engine at ``warm_socket`` (workpools/)."""
        alive = self.running()
        if alive:
            self.say(f"{self.kind} worker already running (pid {alive.pid})")
            return
        self.state.workers = [w for w in self.state.workers if w.role != self.role]
        name = self.name(len(self.state.workers))
        argv = [sys.executable, "-m", "prefect", "worker", "start",
                "--pool", self.pool, "--type", WORKER_TYPES[self.kind], "--name", name]
        env = venv_env(api_url, self.settings, on_this_host=self.kind == "process",
                       PREFECT_WORKER_QUERY_SECONDS=str(self.settings.worker_query_seconds))
        if self.kind == "process" and warm_socket is not None:
            env[warm_engine.SOCKET_ENV] = str(warm_socket)
        record = ProcessRecord.spawn(self.role, argv, env,
                                     self.settings.logs_dir / f"worker-{self.kind}.log",
                                     self.settings.home)
        self.state.workers.append(record)
        self.save()
        self._started, self._name = record, name
        self.say(f"starting {self.kind} worker {name} on pool {self.pool} (pid {record.pid})")

    def wait_online(self, connection: Connection) -> None:
        """If ``start`` started one: wait until the API lists it online (fail early if it
        exits, late at the deadline)."""
        if self._started is None:
            return
        name = self._name
        wait_for(lambda: name in workers_online(connection, self.pool),
                 self.settings.worker_start_timeout, self._started, f"{self.kind} worker")

    def stop(self) -> list[str]:
        """Stop ours; a line per record for ``down``."""
        mine = [w for w in self.state.workers if w.role == self.role]
        self.state.workers = [w for w in self.state.workers if w.role != self.role]
        return [record.stop_and_report() for record in mine]


def wake_workers(state_file: Path, pool: str, api_url: str) -> list[int]:
    """SIGUSR1 to the workers of ``pool`` that a stack (its ``state_file``) started for the
    server at ``api_url``: they look for flow runs now instead of at their next poll. Only
    a process that is still ours (pid and start time, as ``down`` checks) and catches the
    signal gets it; returns their pids (none: the next poll finds the flow run)."""
    try:
        state = StackState.load(state_file)
    except ShimError:
        return []
    if state.api_url != api_url:
        return []
    roles = {f"worker:{kind}" for kind, name in WORKER_POOLS.items() if name == pool}
    woken = []
    for record in state.workers:
        if record.role in roles and record.is_running() and catches(record.pid, WAKE_SIGNAL):
            try:
                os.kill(record.pid, WAKE_SIGNAL)
                woken.append(record.pid)
            except ProcessLookupError:
                pass  # it just exited
    return woken

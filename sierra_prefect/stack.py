"""The embedded stack: a Prefect server, the pools, the deployments, and workers.

``Stack.up`` starts what is missing and reuses what runs: a server (SQLite, bound to
127.0.0.1, healthy within a deadline), the pools from ``workpools/``, every deployment of
``prefect.yaml`` (only when they changed), and a process worker (plus a Docker worker
with ``docker=True``). With ``PREFECT_API_URL`` set it starts no server and uses that one.
``Stack.down`` stops exactly the processes ``up`` started, by pid and start time.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sierra_prefect import automations, deployments, pools, sqlite_template, warm_engine
from sierra_prefect.connection import Connection
from sierra_prefect.errors import ShimError
from sierra_prefect.processes import ProcessRecord
from sierra_prefect.settings import DEFAULT_PORT, Settings, prefect_env
from sierra_prefect.state import StackState, locked

# The pool each kind of worker serves (see workpools/).
WORKER_POOLS = {"process": "sierra-pool", "docker": "sierra-docker-pool"}


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server binds: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _import_in_background(module: str) -> threading.Thread:
    """Import ``module`` on another thread (Prefect's client: ~2 s of CPU) while this one
    waits on something else; ``join()`` before using it."""
    thread = threading.Thread(target=importlib.import_module, args=(module,), daemon=True)
    thread.start()
    return thread


def _wait_for(condition, deadline: float, proc: ProcessRecord | None, what: str) -> None:
    """Poll ``condition`` until true; fail early if ``proc`` died, late at the deadline."""
    end = time.monotonic() + deadline
    delay = 0.05
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and not proc.is_running():
            raise ShimError(f"{what} exited while starting (see {proc.log}): {proc.log_tail()}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    log = f" (see {proc.log})" if proc else ""
    raise ShimError(f"{what} not ready after {deadline:.0f} s{log}: check the log and retry")


@dataclass(frozen=True)
class _Booting:
    """A server just started: its process, and its new SQLite file if it migrates one."""

    record: ProcessRecord
    new_database: Path | None


@dataclass
class Stack:
    settings: Settings
    say: callable = print
    state: StackState = field(init=False)

    def __post_init__(self) -> None:
        self.state = StackState.load(self.settings.state_file)

    # -- what URL, whose server --------------------------------------------------

    @property
    def external(self) -> bool:
        return bool(self.settings.api_url)

    def api_url(self) -> str | None:
        return self.settings.api_url or self.state.api_url

    def connection(self) -> Connection:
        """The server this stack's commands talk to; error if there is none yet."""
        url = self.api_url()
        if not url:
            raise ShimError(
                f"no Prefect server known for SIERRA_PREFECT_HOME={self.settings.home}: "
                "run `sierra-prefect up` or set PREFECT_API_URL"
            )
        return Connection(url, self.settings.auth_secret())

    def worker_name(self, kind: str, index: int) -> str:
        # Unique per user, host and home, so stacks sharing a server never collide.
        home = hashlib.sha256(str(self.settings.home).encode()).hexdigest()[:6]
        return f"sierra-{kind}-{getpass.getuser()}-{socket.gethostname()}-{home}-{index}"

    # -- up ------------------------------------------------------------------------

    def up(self, docker: bool = False) -> Connection:
        project = self.settings.require_project()
        specs = pools.WorkPoolSpec.load_all(project / "workpools")
        with locked(self.settings.home):
            self.state = StackState.load(self.settings.state_file)
            digest = deployments.digest(project)  # prefect.yaml, flows/, workpools/
            warm = self._already_up(project, digest, docker)
            if warm is not None:
                return warm
            code_changed = self.state.deployed_digest != digest
            # Steps overlap where they can (2 cores here): while the server boots, this
            # process imports Prefect's client and the warm engine imports Prefect and
            # flows/; the deploy then forks from the warm engine while the worker boots.
            client_import = _import_in_background("prefect.client.orchestration")
            api_url, booting = self._ensure_server()
            engine = self._ensure_warm_engine(api_url, project, restart=code_changed)
            self._wait_for_server(api_url, booting)
            connection = Connection(api_url, self.settings.auth_secret())
            connection.server_version()  # fails clearly on wrong credentials
            client_import.join()
            with connection.client() as client:
                for change in pools.apply(client, specs) + automations.apply(client):
                    self.say(change)
                worker = self._ensure_worker(api_url, "process")
                warm = self._wait_for_warm_engine(engine)
                if self._deploy_needed(client, project, digest):
                    self._deploy(client, api_url, project, digest, warm)
                self._wait_for_worker(client, "process", worker)
                if docker:
                    self._ensure_image(project)
                    self._wait_for_worker(client, "docker", self._ensure_worker(api_url, "docker"))
            self.state.save(self.settings.state_file)
        return connection

    def _already_up(self, project: Path, digest: str, docker: bool) -> Connection | None:
        """The warm path: everything this ``up`` would start runs, healthy and current.

        Checked from the state file and plain HTTP only, without importing Prefect, so a
        second ``up`` answers in well under a second. Anything missing: None, full path."""
        api_url = self.api_url()
        server = self.state.server
        if not api_url or api_url != self.state.api_url:
            return None
        if not self.external and not (server and server.is_running()):
            return None
        workers = {w.role for w in self.state.workers if w.is_running()}
        if "worker:process" not in workers or (docker and "worker:docker" not in workers):
            return None
        engine = self.state.warm_engine
        if warm_engine.socket_path(self.settings.home) and not (engine and engine.is_running()):
            return None
        if self.state.deployed_digest != digest:
            return None  # prefect.yaml, flows/ or workpools/ changed since the last deploy
        connection = Connection(api_url, self.settings.auth_secret())
        if not connection.is_healthy() or connection.server_version() is None:
            return None  # server_version raises on wrong credentials, as the full path does
        if not all(connection.has_deployment(name) for name in deployments.declared(project)):
            return None
        if docker:
            from sierra_prefect import docker as images

            if not images.image_is_current(images.DEFAULT_TAG, project):
                return None
        pids = ", ".join(str(w.pid) for w in self.state.workers if w.is_running())
        where = "" if self.external else f", server pid {server.pid}"
        if engine:
            where += f", warm engine pid {engine.pid}"
        self.say(f"already up at {api_url}{where}, worker pid {pids}; deployments current")
        return connection

    def _ensure_server(self) -> tuple[str, "_Booting | None"]:
        """The server's API URL, starting our server if needed (then also what
        ``_wait_for_server`` waits on: it returns before the server is healthy)."""
        if self.external:
            Connection(self.settings.api_url).require_healthy()
            self.say(f"using the Prefect server at {self.settings.api_url} (PREFECT_API_URL)")
            self.state.api_url = self.settings.api_url
            return self.settings.api_url, None
        server = self.state.server
        if server and server.is_running() and self.state.api_url and Connection(self.state.api_url).is_healthy():
            self.say(f"server already up at {self.state.api_url} (pid {server.pid})")
            return self.state.api_url, None
        if server and server.is_running():
            # Ours but not answering: restart it rather than leave a zombie server.
            self.say(f"server pid {server.pid} is not healthy; restarting it")
            server.stop()
        self.settings.require_safe_exposure()
        self._require_same_server_settings()
        port = self._choose_port()
        api_url = f"http://{self.settings.connect_host}:{port}/api"
        argv = [sys.executable, "-m", "prefect", "server", "start",
                "--host", self.settings.host, "--port", str(port)]
        self.settings.prefect_home.mkdir(parents=True, exist_ok=True)
        database = self.settings.prefect_home / "prefect.db"  # Prefect's default SQLite file
        fresh = not (self.settings.database_url or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
                     or database.exists())
        seeded = fresh and sqlite_template.seed(database)
        record = ProcessRecord.spawn(
            "server", argv, prefect_env(None, self.settings, **self.settings.server_env()),
            self.settings.logs_dir / "server.log", self.settings.home,
        )
        self.state.server, self.state.api_url, self.state.port = record, api_url, port
        self.state.host = self.settings.host
        self.state.database = self.settings.public()["database_url"]
        self.state.deployed_digest = None
        self.state.save(self.settings.state_file)
        seed = " from the cached empty database" if seeded else ""
        self.say(f"starting Prefect server on {api_url}{seed} (pid {record.pid})")
        return api_url, _Booting(record, database if fresh and not seeded else None)

    def _wait_for_server(self, api_url: str, booting: "_Booting | None") -> None:
        if booting is None:
            return
        _wait_for(lambda: Connection(api_url).is_healthy(), self.settings.server_start_timeout,
                  booting.record, "Prefect server")
        if booting.new_database is not None:
            sqlite_template.save(booting.new_database)  # the next fresh home skips migrations

    def _require_same_server_settings(self) -> None:
        """A server that comes back must come back with the host and database it had."""
        if self.state.api_url is None or self.state.host is None:
            return  # never started, or brought down on purpose
        now = (self.settings.host, self.settings.public()["database_url"])
        if now != (self.state.host, self.state.database):
            raise ShimError(
                f"this stack's server ran with --host {self.state.host} and database "
                f"{self.state.database or 'SQLite'}: pass the same --host/--database again "
                "(or `sierra-prefect down` first to start afresh)"
            )

    def _choose_port(self) -> int:
        host, port = self.settings.host, self.settings.port
        # After a crash, come back where workers and running flows expect the server.
        previous = self.state.port
        if port in (None, "auto") and previous and _port_is_free(host, previous):
            return previous
        if port == "auto":
            return _free_port(host)
        if port is None:
            return DEFAULT_PORT if _port_is_free(host, DEFAULT_PORT) else _free_port(host)
        if not _port_is_free(host, port):
            raise ShimError(
                f"port {port} on {host} is taken by another program: "
                "choose another with --port, or --port auto"
            )
        return port

    def _deploy_needed(self, client, project: Path, digest: str) -> bool:
        names = deployments.declared(project)
        if not deployments.missing(client, names) and self.state.deployed_digest == digest:
            self.say(f"deployments up to date: {', '.join(names)}")
            return False
        return True

    def _deploy(self, client, api_url: str, project: Path, digest: str, warm: Path | None) -> None:
        names = deployments.declared(project)
        self.say(f"deploying {', '.join(names)} (prefect deploy --all)")
        deployments.deploy_all(
            project, prefect_env(api_url, self.settings, **self.settings.client_env()),
            self.settings.logs_dir / "deploy.log", warm,
        )
        still = deployments.missing(client, names)
        if still:
            raise ShimError(f"deployments {', '.join(still)} missing after deploy: see "
                            f"{self.settings.logs_dir / 'deploy.log'}")
        self.state.deployed_digest = digest

    def _venv_env(self, api_url: str, **extra: str) -> dict[str, str]:
        """A Prefect client's environment with this venv first on PATH: the worker's flow
        runs and the warm engine run `python -m ...` and must get this venv's Python."""
        env = prefect_env(api_url, self.settings, **self.settings.client_env(), **extra)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _ensure_warm_engine(self, api_url: str, project: Path, restart: bool) -> ProcessRecord | None:
        """Start the warm engine the process worker's flow runs fork from, unless it runs
        and the flow code is unchanged (it holds flows/ imported)."""
        path = warm_engine.socket_path(self.settings.home)
        if path is None:
            self.say(f"no warm engine: {self.settings.home} is too long a path for a Unix "
                     "socket; flow runs start cold (~2 s more each)")
            return None
        running = self.state.warm_engine
        if running and running.is_running():
            if not restart:
                self.say(f"warm engine already running (pid {running.pid})")
                return running
            self.say(f"flow code changed: restarting the warm engine (pid {running.pid})")
            running.stop()
        record = ProcessRecord.spawn(
            "warm-engine", [sys.executable, "-m", "sierra_prefect.warm_engine", "serve", str(path)],
            self._venv_env(api_url), self.settings.logs_dir / "warm-engine.log", project,
        )
        self.state.warm_engine = record
        self.state.save(self.settings.state_file)
        self.say(f"starting warm engine (pid {record.pid})")
        return record

    def _wait_for_warm_engine(self, record: ProcessRecord | None) -> Path | None:
        """Its socket, once it listens. Without it flow runs and the deploy just start
        cold, so a failure here is a warning, never a failed ``up``."""
        path = warm_engine.socket_path(self.settings.home)
        if record is None or path is None:
            return None
        try:
            _wait_for(lambda: warm_engine.is_listening(path), self.settings.worker_start_timeout,
                      record, "warm engine")
        except ShimError as exc:
            self.say(f"warning: {exc}; flow runs start cold")
            return None
        return path

    def _ensure_image(self, project) -> None:
        from sierra_prefect import docker

        if docker.image_is_current(docker.DEFAULT_TAG, project):
            self.say(f"image {docker.DEFAULT_TAG} is current")
            return
        log = self.settings.logs_dir / "image-build.log"
        self.say(f"building image {docker.DEFAULT_TAG} (log: {log})")
        docker.build_image(project, docker.DEFAULT_TAG, self.settings.base_image, log)

    def _ensure_worker(self, api_url: str, kind: str) -> tuple[ProcessRecord, str] | None:
        """Start a worker of ``kind`` unless ours runs; see ``_wait_for_worker``."""
        pool = WORKER_POOLS[kind]
        mine = [w for w in self.state.workers if w.role == f"worker:{kind}"]
        alive = [w for w in mine if w.is_running()]
        if alive:
            self.say(f"{kind} worker already running (pid {alive[0].pid})")
            return None
        self.state.workers = [w for w in self.state.workers if w not in mine]
        name = self.worker_name(kind, len(self.state.workers))
        argv = [sys.executable, "-m", "prefect", "worker", "start",
                "--pool", pool, "--type", kind, "--name", name]
        env = self._venv_env(
            api_url, PREFECT_WORKER_QUERY_SECONDS=str(self.settings.worker_query_seconds))
        # Flow runs start `python -m sierra_prefect.warm_engine` (workpools/), which forks
        # them from our warm engine when there is one.
        socket_path = warm_engine.socket_path(self.settings.home)
        if kind == "process" and socket_path is not None:
            env[warm_engine.SOCKET_ENV] = str(socket_path)
        record = ProcessRecord.spawn(
            f"worker:{kind}", argv, env,
            self.settings.logs_dir / f"worker-{kind}.log", self.settings.home,
        )
        self.state.workers.append(record)
        self.state.save(self.settings.state_file)
        self.say(f"starting {kind} worker {name} on pool {pool} (pid {record.pid})")
        return record, name

    def _wait_for_worker(self, client, kind: str, started: tuple[ProcessRecord, str] | None) -> None:
        if started is not None:
            record, name = started
            _wait_for(lambda: _worker_online(client, WORKER_POOLS[kind], name),
                      self.settings.worker_start_timeout, record, f"{kind} worker")

    # -- down ----------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop what ``up`` started; return a line per process stopped or skipped."""
        lines = []
        with locked(self.settings.home):
            self.state = StackState.load(self.settings.state_file)
            records = [*self.state.workers,
                       *([self.state.warm_engine] if self.state.warm_engine else []),
                       *([self.state.server] if self.state.server else [])]
            for record in records:
                if record.stop():
                    lines.append(f"stopped {record.role} (pid {record.pid})")
                else:
                    lines.append(
                        f"{record.role} pid {record.pid} was already gone (or is now "
                        "another program's): left alone"
                    )
            self.state.workers, self.state.warm_engine, self.state.server = [], None, None
            if not self.external:
                self.state.api_url, self.state.port = None, None
                self.state.host, self.state.database = None, None
            self.state.save(self.settings.state_file)
        return lines

    # -- status --------------------------------------------------------------------

    def status(self) -> dict:
        from prefect import __version__ as client_version

        api_url = self.api_url()
        connection = Connection(api_url, self.settings.auth_secret()) if api_url else None
        healthy = bool(connection) and connection.is_healthy(timeout=10.0)
        report: dict = {
            "home": str(self.settings.home),
            "api_url": api_url,
            "ui_url": connection.ui_url if connection else None,
            "external_server": self.external,
            "healthy": healthy,
            "prefect_client_version": client_version,
            "prefect_server_version": connection.server_version() if healthy else None,
            "pids": self.state.pids(),
            "server_started_with": {"host": self.state.host, "database": self.state.database},
            "pools": {},
            "deployments": [],
            "settings": self.settings.public(),
        }
        if healthy:
            with connection.client() as client:
                for pool in client.read_work_pools():
                    workers = client.read_workers_for_work_pool(pool.name)
                    report["pools"][pool.name] = {
                        "type": pool.type,
                        "workers_online": sorted(
                            w.name for w in workers if str(w.status).upper().endswith("ONLINE")
                        ),
                    }
                flows = {f.id: f.name for f in client.read_flows()}
                report["deployments"] = sorted(
                    f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments()
                )
        return report


def _worker_online(client, pool: str, name: str) -> bool:
    return any(
        w.name == name and str(w.status).upper().endswith("ONLINE")
        for w in client.read_workers_for_work_pool(pool)
    )

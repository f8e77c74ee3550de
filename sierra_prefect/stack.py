"""The embedded stack: a Prefect server, the pools, the deployments, a warm engine and
workers, brought up in order and recorded in one state file.

Use (what ``sierra-prefect up``/``down``/``status`` do)::

    stack = Stack(Settings(), say=print)
    connection = stack.up(docker=False)   # start what is missing, reuse what runs
    stack.status()                        # a dict: URLs, health, versions, pids, pools
    stack.down()                          # stop exactly what ``up`` started, by pid

Each piece owns its start, readiness and stop (``server.Server``, ``warm_engine.WarmEngine``,
``worker.Worker``, ``deployments.Deployments``); this module only orders them and owns
``$SIERRA_PREFECT_HOME/stack.json``. With ``PREFECT_API_URL`` set no server is started.
A second ``up`` of a stack that is up answers from the state file and plain HTTP, without
importing Prefect.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sierra_prefect import automations, pools
from sierra_prefect.connection import Connection
from sierra_prefect.deployments import Deployments
from sierra_prefect.server import Server
from sierra_prefect.settings import Settings, venv_env
from sierra_prefect.state import StackState, locked
from sierra_prefect.warm_engine import WarmEngine
from sierra_prefect.worker import WORKER_POOLS, Worker, workers_online


def _import_in_background(module: str) -> threading.Thread:
    """Import ``module`` on another thread (Prefect's client: ~2 s of CPU) while this one
    waits on something else; ``join()`` before using it."""
    thread = threading.Thread(target=importlib.import_module, args=(module,), daemon=True)
    thread.start()
    return thread


@dataclass
class Stack:
    settings: Settings
    say: Callable[[str], None] = print
    state: StackState = field(init=False)

    def __post_init__(self) -> None:
        self._load()

    def _load(self) -> None:
        """(Re)read the state file and give every piece that state to work on."""
        self.state = StackState.load(self.settings.state_file)
        pieces = (self.settings, self.state, self.say, self._save)
        self.server = Server(*pieces)
        self.warm_engine = WarmEngine(*pieces)
        self.workers = {kind: Worker(kind, *pieces) for kind in WORKER_POOLS}

    def _save(self) -> None:
        self.state.save(self.settings.state_file)

    @property
    def external(self) -> bool:
        return self.server.external

    def api_url(self) -> str | None:
        return self.server.api_url

    def connection(self) -> Connection:
        """The server this stack's commands talk to; error if there is none yet."""
        return self.server.connection()

    # -- up ------------------------------------------------------------------------

    def up(self, docker: bool = False, worker: bool = True) -> Connection:
        project = self.settings.require_project()
        specs = pools.WorkPoolSpec.load_all(project / "workpools")
        with locked(self.settings.home):
            self._load()
            self.server.require_port()
            deployments = Deployments(self.settings, self.state, self.say)
            kinds = ["process", "docker"] if docker else ["process"] if worker else []
            if self._is_current(deployments, kinds):
                return self._report_current()
            connection = self._bring_up(deployments, specs, kinds)
            self._save()
        return connection

    def _is_current(self, deployments: Deployments, kinds: list[str]) -> bool:
        """The warm path: everything this ``up`` would start runs, healthy and current.
        Cheap checks first (state file, pids), then plain HTTP; no Prefect import."""
        project = deployments.project
        return (self.server.is_current()
                and all(self.workers[kind].running() for kind in kinds)
                and self.warm_engine.is_current()
                and not deployments.code_changed
                and self.server.is_ready()
                and deployments.is_current(self.server.connection())
                and all(self.workers[kind].is_current(project) for kind in kinds))

    def _report_current(self) -> Connection:
        pids = ", ".join(str(w.pid) for w in self.state.workers if w.is_running())
        where = "" if self.external else f", server pid {self.state.server.pid}"
        if self.state.warm_engine:
            where += f", warm engine pid {self.state.warm_engine.pid}"
        workers = f"worker pid {pids}" if pids else "no worker"
        self.say(f"already up at {self.server.api_url}{where}, {workers}; deployments current")
        return self.server.connection()

    def _bring_up(self, deployments: Deployments, specs: list, kinds: list[str]) -> Connection:
        # Steps overlap where they can (2 cores here): while the server boots, this
        # process imports Prefect's client and the warm engine imports Prefect and
        # flows/; the deploy then forks from the warm engine while the worker boots.
        client_import = _import_in_background("prefect.client.orchestration")
        api_url = self.server.start()
        self.warm_engine.start(venv_env(api_url, self.settings, on_this_host=True), deployments.project,
                               restart=deployments.code_changed)
        self.server.wait_ready()
        connection = self.server.connection()
        connection.server_version()  # fails clearly on wrong credentials
        client_import.join()
        with connection.client() as client:
            for change in pools.apply(client, specs) + automations.apply(client):
                self.say(change)
            process = self.workers["process"] if kinds else None
            if process:
                process.start(api_url, self.warm_engine.path)
            deployments.ensure(client, api_url, self.warm_engine.wait_ready())
            if process:
                process.wait_online(connection)
        for kind in kinds[1:]:  # Docker: its image first, then its worker
            worker = self.workers[kind]
            worker.ensure_image(deployments.project)
            worker.start(api_url)
            worker.wait_online(connection)
        return connection

    # -- down ----------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop what ``up`` started; return a line per process stopped or skipped."""
        with locked(self.settings.home):
            self._load()
            lines = [line for worker in self.workers.values() for line in worker.stop()]
            lines += self.warm_engine.stop()
            lines += self.server.stop()
            self._save()
        return lines

    # -- status --------------------------------------------------------------------

    def status(self) -> dict:
        from prefect import __version__ as client_version

        api_url = self.api_url()
        connection = self.connection() if api_url else None
        healthy = bool(connection) and connection.is_healthy(timeout=10.0)
        credential = self.settings.credential()
        report: dict = {
            "home": str(self.settings.home),
            # Where the credential is (the file, or the variable), never what it is.
            "credential": credential.describe() if credential else None,
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
                    report["pools"][pool.name] = {
                        "type": pool.type, "workers_online": workers_online(connection, pool.name)}
                flows = {f.id: f.name for f in client.read_flows()}
                report["deployments"] = sorted(
                    f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments()
                )
        return report

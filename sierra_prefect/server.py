"""The stack's Prefect server: SQLite (default) or PostgreSQL, on 127.0.0.1 unless told.

``Server`` owns the server's start (port choice, database, credential, the UI's API URL),
its readiness (``/api/health`` within a deadline) and its stop::

    server = Server(settings, state, say, save)
    api_url = server.start()        # returns while it boots (or at once if it runs)
    server.wait_ready()             # healthy, or a one-line error naming its log
    server.stop()

With ``PREFECT_API_URL`` set (``settings.api_url``) the server is someone else's: nothing
is started or stopped, and ``start`` only checks that it answers.

Ours always requires the stack's credential (``settings.credential()``, made by the first
``start``), given in its environment, never on its command line; every API route but
``GET /api/health`` and ``GET /api/ready`` answers 401 without it. It runs with umask 077:
its database and files in the home are its owner's alone.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sierra_prefect import sqlite_template
from sierra_prefect.connection import Connection
from sierra_prefect.credential import Credential
from sierra_prefect.errors import ShimError
from sierra_prefect.private import private_dir
from sierra_prefect.processes import ProcessRecord, wait_for
from sierra_prefect.settings import DEFAULT_PORT, Settings, prefect_env
from sierra_prefect.state import StackState

# Where Prefect's UI takes its server's address from; Prefect's default is built from port
# 4200 whatever --port says, so a UI on any other port would talk to another server.
UI_API_URL_ENV = ("PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL")


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


@dataclass(frozen=True)
class _Booting:
    """A server just started: its process, and its new SQLite file if it migrates one."""

    record: ProcessRecord
    new_database: Path | None


class Server:
    """The Prefect server of the stack in ``settings.home`` (record: ``state.server``)."""

    def __init__(self, settings: Settings, state: StackState, say: Callable[[str], None],
                 save: Callable[[], None]) -> None:
        self.settings, self.state, self.say, self.save = settings, state, say, save
        self._booting: _Booting | None = None

    @property
    def external(self) -> bool:
        return bool(self.settings.api_url)

    @property
    def api_url(self) -> str | None:
        return self.settings.api_url or self.state.api_url

    def connection(self) -> Connection:
        """The server this stack's commands talk to; error if there is none yet."""
        if not self.api_url:
            raise ShimError(
                f"no Prefect server known for SIERRA_PREFECT_HOME={self.settings.home}: "
                "run `sierra-prefect up` or set PREFECT_API_URL"
            )
        return Connection(self.api_url, self.settings.auth_secret())

    def is_current(self) -> bool:
        """The server ``up`` last used is the one wanted now and (if ours) still runs."""
        if not self.api_url or self.api_url != self.state.api_url:
            return False
        server = self.state.server
        return self.external or bool(server and server.is_running())

    def is_ready(self) -> bool:
        """Answers ``/api/health`` and its version (raises on wrong credentials, and if
        ours lets in clients without the credential)."""
        connection = self.connection()
        if not connection.is_healthy():
            return False
        self._require_guarded(connection)
        return connection.server_version() is not None

    def _require_guarded(self, connection: Connection) -> None:
        """Ours, running, accepts our credential and nothing less (a server started before
        stacks had one, or with another one, is refused with what to do)."""
        if self.external:
            return
        credential = self._credential()
        connection = Connection(connection.api_url, credential.value)
        record, redo = self.state.server, "run `sierra-prefect down`, then `sierra-prefect up`"
        pid = f" (pid {record.pid})" if record else ""
        try:
            connection.server_version()
        except ShimError:
            raise ShimError(
                f"this stack's server{pid} refuses its credential ({credential.describe()}): "
                f"it was started with another one; {redo}"
            ) from None
        if connection.is_open():
            raise ShimError(
                f"this stack's server{pid} lets in anyone on this machine: it was started "
                f"without a credential (by an older sierra-prefect); {redo}"
            )

    def _credential(self) -> Credential:
        """Ours: made once, at random, if the stack has none; its file kept 0600."""
        credential = self.settings.ensure_credential()
        if not credential.is_private():
            credential.make_private()
            self.say(f"warning: {credential.file} was readable by other users: made it 0600 "
                     "(for a new credential: `sierra-prefect down`, delete it, `sierra-prefect up`)")
        return credential

    def require_port(self) -> None:
        """Refuse ``--port P`` while ours runs on another port: moving it would strand
        its workers and flow runs (``down`` first)."""
        wanted, running = self.settings.port, self.state.server
        if self.external or not isinstance(wanted, int) or not (running and running.is_running()):
            return
        if self.state.port != wanted:
            raise ShimError(
                f"this stack is already up on port {self.state.port}: run `sierra-prefect down` "
                f"first to restart it on port {wanted}, or drop --port"
            )

    def start(self) -> str:
        """The server's API URL, starting ours if needed. Returns while it boots: see
        ``wait_ready``."""
        self._booting = None
        if self.external:
            Connection(self.settings.api_url).require_healthy()
            self.say(f"using the Prefect server at {self.settings.api_url} (PREFECT_API_URL)")
            self.state.api_url = self.settings.api_url
            return self.settings.api_url
        server = self.state.server
        if server and server.is_running():
            if self.state.api_url and self.connection().is_healthy():
                self._require_guarded(self.connection())
                self.say(f"server already up at {self.state.api_url} (pid {server.pid})")
                return self.state.api_url
            # Ours but not answering: restart it rather than leave a zombie server.
            self.say(f"server pid {server.pid} is not healthy; restarting it")
            server.stop()
        return self._spawn()

    def _spawn(self) -> str:
        # Any address, loopback or not, gets the same guard: the stack's credential (the
        # generated one in the home, or SIERRA_PREFECT_AUTH_STRING), made before it starts.
        self._require_same_server_settings()
        port = self._choose_port()
        api_url = f"http://{self.settings.connect_host}:{port}/api"
        database = self.settings.prefect_home / "prefect.db"  # Prefect's default SQLite file
        private_dir(self.settings.prefect_home)
        self._credential()
        fresh = not (self.settings.database_url or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
                     or database.exists())
        seeded = fresh and sqlite_template.seed(database)
        # Prefect's `prefect server start`, with the fix prefect_server.py explains.
        argv = [sys.executable, "-m", "sierra_prefect.prefect_server", "server", "start",
                "--host", self.settings.host, "--port", str(port)]
        record = ProcessRecord.spawn("server", argv, self._env(api_url),
                                     self.settings.logs_dir / "server.log", self.settings.home,
                                     umask=0o077)
        self.state.server, self.state.api_url, self.state.port = record, api_url, port
        self.state.host = self.settings.host
        self.state.database = self.settings.masked_database()
        self.state.deployed_digest = None  # a new server process: deploy to it again
        self.save()
        seed = " from the cached empty database" if seeded else ""
        self.say(f"starting Prefect server on {api_url}{seed} (pid {record.pid})")
        self._booting = _Booting(record, database if fresh and not seeded else None)
        return api_url

    def _env(self, api_url: str) -> dict[str, str]:
        env = prefect_env(None, self.settings, server=True, **self.settings.server_env())
        if not any(os.environ.get(name) for name in UI_API_URL_ENV):  # the user's choice wins
            env["PREFECT_UI_API_URL"] = api_url
        return env

    def wait_ready(self) -> None:
        """If ``start`` started it: wait until healthy (fail early if it exits, late at
        the deadline); keep a freshly migrated SQLite file as the template."""
        booting, self._booting = self._booting, None
        if booting is None:
            return
        connection = Connection(self.state.api_url)
        wait_for(connection.is_healthy, self.settings.server_start_timeout, booting.record,
                 "Prefect server")
        if booting.new_database is not None:
            sqlite_template.save(booting.new_database)  # the next fresh home skips migrations

    def stop(self) -> list[str]:
        """Stop ours (never an external one) and forget where it listened."""
        record, self.state.server = self.state.server, None
        if not self.external:
            self.state.api_url, self.state.port = None, None
            self.state.host, self.state.database = None, None
        return [record.stop_and_report()] if record else []

    def _require_same_server_settings(self) -> None:
        """A server that comes back must come back with the host and database it had."""
        if self.state.api_url is None or self.state.host is None:
            return  # never started, or brought down on purpose
        now = (self.settings.host, self.settings.masked_database())
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

"""A real PostgreSQL server for the tests, run as an unprivileged system user.

PostgreSQL refuses to run as root, so the server runs as ``postgres`` (the Debian package
creates it) or, failing that, ``nobody``, through ``runuser``. Its data, socket and log
live in a fresh directory under /tmp owned by that user; it listens on 127.0.0.1 on a free
port. A database and a password user are created for Prefect, and the fixture yields a
``PostgresServer`` whose ``url`` is what ``SIERRA_PREFECT_DATABASE_URL`` takes (it holds a
password, so never ``up --database``: that would put it on a command line).

Teardown is ``pg_ctl stop -m fast`` on exactly that data directory (the postmaster's pid
file), never a kill by name. If the machine cannot run PostgreSQL at all (no binaries,
no unprivileged user, no ``runuser``, no asyncpg), the tests that need it are skipped
with the reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_DEADLINE = 60.0
CANDIDATE_USERS = ("postgres", "nobody")
DB_NAME = "sierra_prefect"
DB_USER = "sierra_prefect"


def postgres_bindir() -> Path | None:
    """Debian's versioned bin dir (newest first), else wherever pg_ctl is on PATH."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "pg_ctl").is_file() and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def unprivileged_user() -> pwd.struct_passwd | None:
    for name in CANDIDATE_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return entry
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    bindir: Path
    os_user: str
    base: Path
    port: int
    db: str
    user: str
    password: str
    # A network namespace to run in (tests/netns_support.py): its own 127.0.0.1.
    netns: str | None = None

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.db}"

    def as_os_user(self, *argv: str, check: bool = True, timeout: float = 60,
                   env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run a PostgreSQL binary as the server's system user."""
        cmd = ["runuser", "-u", self.os_user, "--", str(self.bindir / argv[0]), *argv[1:]]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                cwd=self.base, env=env, input=stdin,
                                stdin=None if stdin is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:2])} exited {result.returncode}: {result.stderr.strip()}"
                f"\n--- server log ---\n{self.log_tail()}"
            )
        return result

    def superuser_sql(self, sql: str) -> str:
        """SQL as the superuser over the Unix socket (trust auth, socket dir is private),
        on psql's stdin: it may hold a password, which a command line would show to all."""
        return self.as_os_user(
            "psql", "-h", str(self.base), "-p", str(self.port), "-U", "postgres",
            "-d", "postgres", "-X", "-v", "ON_ERROR_STOP=1", "-tA", stdin=sql,
        ).stdout.strip()

    def psql(self, sql: str) -> str:
        """SQL as the Prefect user, over TCP with its password (as Prefect connects)."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": self.password,
               "PGCONNECT_TIMEOUT": "10"}
        return self.as_os_user(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", self.db,
            "-X", "-v", "ON_ERROR_STOP=1", "-tAc", sql, env=env,
        ).stdout.strip()

    def is_ready(self) -> bool:
        result = self.as_os_user("pg_isready", "-h", "127.0.0.1", "-p", str(self.port),
                                 "-t", "2", check=False)
        return result.returncode == 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _skip_reason() -> str | None:
    if os.geteuid() != 0 and not os.environ.get("SIERRA_PREFECT_TEST_PG_AS_SELF"):
        # runuser needs root; an unprivileged test user would need its own variant.
        return "running PostgreSQL as another user needs root (runuser): run the tests as root"
    if shutil.which("runuser") is None:
        return "runuser is not installed (apt-get install util-linux)"
    if postgres_bindir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) are not installed "
                "(apt-get install postgresql, or scripts/setup.sh --test)")
    if unprivileged_user() is None:
        return (f"no unprivileged system user to run PostgreSQL as (tried {', '.join(CANDIDATE_USERS)}; "
                "apt-get install postgresql creates the postgres user)")
    try:
        import asyncpg  # noqa: F401  (Prefect's PostgreSQL driver)
    except ImportError:
        return ("asyncpg (Prefect's PostgreSQL driver) is not installed in this venv "
                "(scripts/setup.sh installs it, with Prefect)")
    return None


def _start(server: PostgresServer) -> None:
    server.as_os_user(
        "pg_ctl", "-D", str(server.datadir), "-l", str(server.log), "-w", "-t", str(int(START_DEADLINE)),
        "-o", (f"-h 127.0.0.1 -p {server.port} -k {server.base} -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"),
        "start", timeout=START_DEADLINE + 10,
    )
    end = time.monotonic() + START_DEADLINE
    while not server.is_ready():
        if time.monotonic() > end:
            raise RuntimeError(f"PostgreSQL not ready after {START_DEADLINE} s:\n{server.log_tail()}")
        time.sleep(0.1)


def _stop(server: PostgresServer) -> None:
    if (server.datadir / "postmaster.pid").exists():
        server.as_os_user("pg_ctl", "-D", str(server.datadir), "-m", "fast", "-w", "stop", check=False)


def start_postgres(netns: str | None = None) -> Iterator[PostgresServer]:
    """Start PostgreSQL (skip the caller if impossible), yield it, stop it and clean up.
    With ``netns``, it runs in that network namespace, on the namespace's loopback."""
    reason = _skip_reason()
    if reason:
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    user = unprivileged_user()
    base = Path(tempfile.mkdtemp(prefix="sierra-prefect-pg-", dir="/tmp"))
    os.chown(base, user.pw_uid, user.pw_gid)
    os.chmod(base, 0o700)
    server = PostgresServer(
        bindir=postgres_bindir(), os_user=user.pw_name, base=base, port=0,
        db=DB_NAME, user=DB_USER, password=secrets.token_hex(16), netns=netns,
    )
    started = False
    try:
        pwfile = base / "superuser.pw"  # initdb wants one for scram; trust locally anyway
        pwfile.write_text(secrets.token_hex(16) + "\n")
        os.chown(pwfile, user.pw_uid, user.pw_gid)
        init = server.as_os_user(
            "initdb", "-D", str(server.datadir), "-U", "postgres", "-E", "UTF8",
            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
            "--no-sync", check=False, timeout=120,
        )
        if init.returncode != 0:
            pytest.skip(f"PostgreSQL unavailable: initdb as {user.pw_name} failed "
                        "(PostgreSQL from apt-get install postgresql): "
                        f"{(init.stderr.strip().splitlines() or ['no output'])[-1]}")
        # A port chosen free can be taken before the server binds it: retry a few times.
        for attempt in range(3):
            server.port = _free_port()
            try:
                _start(server)
                started = True
                break
            except RuntimeError:
                _stop(server)
                if attempt == 2:
                    raise
        server.superuser_sql(f"CREATE ROLE {server.user} LOGIN PASSWORD '{server.password}'")
        server.superuser_sql(f"CREATE DATABASE {server.db} OWNER {server.user}")
        assert server.psql("SELECT 1") == "1"
        yield server
    finally:
        if started or (server.datadir / "postmaster.pid").exists():
            _stop(server)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    yield from start_postgres()

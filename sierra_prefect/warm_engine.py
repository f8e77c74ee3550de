"""A warm start for flow runs: Prefect's own engine, forked from a process that already
imported it.

The process pool starts every flow run as a fresh ``python -m prefect.engine``, and
importing Prefect costs about 2 s of CPU here: most of the time from "picked up by the
worker" to "first experimental run starts" (see benchmarks/NOTES.md). So
``sierra-prefect up`` also starts a *warm engine* next to its process worker: one
single-threaded process that imports Prefect and ``flows/`` once, then listens on a Unix
socket in ``SIERRA_PREFECT_HOME`` (mode 0600, peers must be the same uid).

The pool's job command (``workpools/sierra-pool.yaml``) is this module as a thin client::

    python -m sierra_prefect.warm_engine          # what the worker starts per flow run

It hands the flow run's environment, working directory and stdin/stdout/stderr to the
warm engine, which forks a child that runs ``prefect.engine`` as ``__main__``, exactly as
``python -m prefect.engine`` would, with that environment. The client forwards the
signals it gets (the worker's cancel) to the child, and exits with the child's exit code;
if the client dies, the child is killed. With no warm engine to reach (a stock worker on
another host, where ``SIERRA_PREFECT_WARM_ENGINE`` is unset), the client becomes
``python -m prefect.engine`` itself: the same flow run, started cold.

Any module can be run this way, as ``python -m MODULE ARGS`` would run it: the
``sierra-prefect`` entry point (``sierra_prefect/__main__.py``) hands ``run`` and
``check`` (what SIERRA calls) to ``run_module_warm(home, "sierra_prefect.cli", argv)``, so a
trigger does not pay Prefect's import either, and ``sierra-prefect up`` deploys with
``prefect --no-prompt deploy --all`` forked the same way (``run_forked``). This module
knows nothing of the CLI.

The server side (started by ``sierra-prefect up``, role ``warm-engine``)::

    python -m sierra_prefect.warm_engine serve SOCKET

and its lifecycle in a stack (start, ready, stop; ``down`` also removes the socket)::

    engine = WarmEngine(settings, state, say, save)
    engine.start(env, project, restart=False); engine.wait_ready(); engine.stop()

Only the standard library is imported at module level: the client must start fast.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the lifecycle's types; the client imports none of them
    from sierra_prefect.settings import Settings
    from sierra_prefect.state import StackState

# The worker's environment names the socket; flow-run processes inherit it.
SOCKET_ENV = "SIERRA_PREFECT_WARM_ENGINE"
# Unix socket paths are limited to 108 bytes; past that there is no warm engine.
MAX_SOCKET_PATH = 100
_HEADER = struct.Struct("!Q")
_STDIO = 3
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def socket_path(home: Path) -> Path | None:
    path = home / "warm-engine.sock"
    return path if len(str(path)) <= MAX_SOCKET_PATH else None


def is_listening(path: Path) -> bool:
    sock = _connect(path)
    if sock is None:
        return False
    sock.close()
    return True


# -- the client: the pool's job command --------------------------------------------------


def _connect(path: str | Path | None) -> socket.socket | None:
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:  # not running (down, or never started): start cold
        sock.close()
        return None
    return sock


def _forward(sock: socket.socket, signum: int) -> None:
    try:
        sock.sendall(f"{signum}\n".encode())
    except OSError:
        pass  # the child already ended


def _send(sock: socket.socket, module: str, argv: list[str], env: dict[str, str], cwd: str,
          stdio: tuple[int, int, int]) -> None:
    umask = os.umask(0o077)
    os.umask(umask)
    # "kind": what warm engines started before requests named the module understand.
    kind = {"prefect.engine": "engine", "sierra_prefect.cli": "cli"}.get(module, module)
    request = json.dumps({"module": module, "kind": kind, "env": env, "cwd": cwd,
                          "umask": umask, "argv": argv}).encode()
    socket.send_fds(sock, [_HEADER.pack(len(request))], list(stdio))
    sock.sendall(request)


def _exit_code(sock: socket.socket) -> int | None:
    """The child's exit code, once it exits; None if the warm engine went away first."""
    reply = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        reply += chunk
    try:
        return int(json.loads(reply)["exit"])
    except (ValueError, KeyError):
        return None


def _delegate(sock: socket.socket, module: str, argv: list[str]) -> int:
    """Have the warm engine fork a child that runs ``python -m MODULE ARGV`` as this process
    would (its environment, directory and stdio); relay signals; return its exit code."""
    _send(sock, module, argv, dict(os.environ), os.getcwd(), (0, 1, 2))
    for signum in _FORWARDED:  # the worker cancels a flow run by signalling us; Ctrl-C
        signal.signal(signum, lambda signum, _frame: _forward(sock, signum))
    code = _exit_code(sock)
    if code is None:
        print("sierra-prefect: the warm engine went away before the end", file=sys.stderr)
        return 1
    return code


def run_forked(path: Path | None, argv: list[str], env: dict[str, str], cwd: Path,
               stdio: tuple[int, int, int]) -> int | None:
    """``prefect ARGV`` forked from the warm engine at ``path`` (``up`` deploys this way);
    its exit code, or None if no warm engine answered (the caller starts it cold)."""
    sock = _connect(path)
    if sock is None:
        return None
    with sock:
        _send(sock, "prefect", argv, env, str(cwd), stdio)
        return _exit_code(sock)


def run_module_warm(home: Path, module: str, argv: list[str]) -> int | None:
    """``python -m MODULE ARGV`` with this process's environment and terminal, forked from
    the warm engine of the stack in ``home``; its exit code, or None if none answered."""
    sock = _connect(socket_path(home))
    if sock is None:
        return None
    return _delegate(sock, module, argv)


def engine_client() -> int:
    """The pool's job command: this flow run, forked warm, or ``python -m prefect.engine``."""
    sock = _connect(os.environ.get(SOCKET_ENV))
    if sock is None:
        os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])
    return _delegate(sock, "prefect.engine", sys.argv[1:])


# -- the server: one per worker host, started by `sierra-prefect up` ----------------------


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client closed the connection")
        data += chunk
    return data


def forget_edited(package: str, since: float) -> bool:
    """A cold engine reads flows/ from disk for every flow run; so must a forked one. If
    any loaded module of ``package`` changed since ``since`` (when the warm engine imported
    it), drop them all, so this child imports them afresh. True if it dropped them."""
    loaded = [name for name in sys.modules if name == package or name.startswith(package + ".")]
    for name in loaded:
        try:
            if os.stat(sys.modules[name].__file__).st_mtime <= since:
                continue
        except (OSError, TypeError, AttributeError):
            pass  # no file to compare: assume it changed
        for stale in loaded:
            del sys.modules[stale]
        return True
    return False


def _run_child(request: dict, stdio: list[int], warm_since: float) -> None:
    """In the forked child: become ``python -m MODULE ARGV`` as the client asked, as if
    started afresh: ``prefect.engine`` for a flow run, ``sierra_prefect.cli`` for a
    ``sierra-prefect`` command, or ``prefect`` (``up``'s deploy)."""
    code = 1
    try:
        for fd, target in zip(stdio, range(_STDIO), strict=True):
            os.dup2(fd, target)
            os.close(fd)
        for signum in _FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, as usual
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.umask(request.get("umask", 0o022))
        os.environ.clear()
        os.environ.update(request["env"])
        module = request["module"]
        forget_edited("flows", warm_since)

        import runpy

        import prefect.context

        # Settings as this flow run's environment says, not as the parent's. (Logging keeps
        # the parent's configuration: the worker's, which the job's environment shares.)
        prefect.context.refresh_global_settings_context()
        sys.argv = [module, *request["argv"]]
        sys.modules.pop(module, None)  # run as __main__ afresh, as `python -m` does
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        import atexit

        atexit._run_exitfuncs()  # what interpreter exit does: flush Prefect's logs and events
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _session(conn: socket.socket, warm_since: float) -> None:
    """In a forked child per flow run: fork the engine, relay signals in and the exit out."""
    # Its own process group: restarting or stopping the warm engine (a group kill) leaves
    # flow runs in flight alone; they end with their client, i.e. with their worker.
    os.setpgid(0, 0)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    header, stdio, _flags, _addr = socket.recv_fds(conn, _HEADER.size, _STDIO)
    if len(header) != _HEADER.size or len(stdio) != _STDIO:
        return
    request = json.loads(_recv_exactly(conn, _HEADER.unpack(header)[0]))
    engine = os.fork()
    if engine == 0:
        conn.close()
        _run_child(request, stdio, warm_since)
    for fd in stdio:
        os.close(fd)
    what = _describe(request)
    print(f"{what}: engine pid {engine}", flush=True)
    exited = os.pidfd_open(engine)
    watched = [conn, exited]
    while True:
        ready, _, _ = select.select(watched, [], [])
        if exited in ready:
            _, status = os.waitpid(engine, 0)
            code = os.waitstatus_to_exitcode(status)
            print(f"engine pid {engine} exited {code}", flush=True)
            try:
                conn.sendall(json.dumps({"exit": code}).encode())
            except OSError:
                pass  # the client is gone
            return
        data = conn.recv(1024)
        if not data:  # the client died (e.g. its worker was killed): the flow run goes too
            print(f"client of engine pid {engine} went away: killing it", flush=True)
            os.kill(engine, signal.SIGKILL)
            watched = [exited]
            continue
        for line in data.decode().split():
            os.kill(engine, int(line))


# How the warm engine's log names what a child runs (tests and people read it).
_LOG_NAMES = {"sierra_prefect.cli": "sierra-prefect", "prefect": "prefect"}


def _describe(request: dict) -> str:
    module = request["module"]
    if module == "prefect.engine":
        return f"flow run {request['env'].get('PREFECT__FLOW_RUN_ID')}"
    return f"{_LOG_NAMES.get(module, module)} {' '.join(request['argv'][:3])}"


def serve(path: Path) -> None:
    """Import Prefect and the flow once, then fork a session per client, forever."""
    import time

    warm_since = time.time()  # flows/ as about to be imported (see forget_edited)
    import threading

    # What every flow run imports (not prefect.engine: that runs as __main__), and what
    # `sierra-prefect run` and `check` import: libraries only, so the CLI's own code is
    # always read afresh from the checkout.
    import prefect.deployments
    import prefect.flow_engine  # noqa: F401
    import pydantic_settings  # noqa: F401
    import rich.progress  # noqa: F401
    import typer  # noqa: F401

    import flows.sierra_batch  # noqa: F401  the flow (cwd: the project)

    if threading.active_count() != 1:  # fork() only copies the calling thread
        raise SystemExit(f"warm engine: {threading.active_count()} threads after import; cannot fork safely")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    if path.exists() or path.is_symlink():
        path.unlink()  # a stale socket of ours (up holds the home's lock while starting us)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    print(f"warm engine ready on {path} (pid {os.getpid()})", flush=True)
    me = os.getuid()
    while True:
        conn, _ = listener.accept()
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != me:
            conn.close()  # only our own user's worker may start flow runs here
            continue
        if os.fork() == 0:
            listener.close()
            try:
                _session(conn, warm_since)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(0)
        conn.close()


# -- its lifecycle in a stack: `sierra-prefect up` starts it, `down` stops it -------------------


class WarmEngine:
    """The warm engine of the stack in ``settings.home``: start, ready, stop.

    Its record lives in the stack's state (``state.warm_engine``); ``save`` persists the
    state right after a start, so a failing ``up`` still leaves a pid ``down`` can stop."""

    ROLE = "warm-engine"

    def __init__(self, settings: Settings, state: StackState, say: Callable[[str], None],
                 save: Callable[[], None]) -> None:
        self.settings, self.state, self.say, self.save = settings, state, say, save
        self.path = socket_path(settings.home)

    def is_current(self) -> bool:
        """Running, or impossible here (a home too long for a socket path)."""
        record = self.state.warm_engine
        return self.path is None or bool(record and record.is_running())

    def start(self, env: dict[str, str], project: Path, restart: bool) -> None:
        """Start it unless it runs and the flow code is unchanged (``restart``: it holds
        flows/ imported); returns at once, see ``wait_ready``."""
        from sierra_prefect.processes import ProcessRecord

        if self.path is None:
            self.say(f"no warm engine: {self.settings.home} is too long a path for a Unix "
                     "socket; flow runs start cold (~2 s more each)")
            return
        running = self.state.warm_engine
        if running and running.is_running():
            if not restart:
                self.say(f"warm engine already running (pid {running.pid})")
                return
            self.say(f"flow code changed: restarting the warm engine (pid {running.pid})")
            running.stop()
        record = ProcessRecord.spawn(
            self.ROLE, [sys.executable, "-m", "sierra_prefect.warm_engine", "serve", str(self.path)],
            env, self.settings.logs_dir / "warm-engine.log", project,
        )
        self.state.warm_engine = record
        self.save()
        self.say(f"starting warm engine (pid {record.pid})")

    def wait_ready(self) -> Path | None:
        """Its socket, once it listens. Without it flow runs and the deploy just start
        cold, so a failure here is a warning, never a failed ``up``."""
        from sierra_prefect.errors import ShimError
        from sierra_prefect.processes import wait_for

        record = self.state.warm_engine
        if record is None or self.path is None:
            return None
        path = self.path
        try:
            wait_for(lambda: is_listening(path), self.settings.worker_start_timeout, record,
                     "warm engine")
        except ShimError as exc:
            self.say(f"warning: {exc}; flow runs start cold")
            return None
        return path

    def stop(self) -> list[str]:
        """Stop it and remove its socket; a line for ``down`` (none if there was none)."""
        record, self.state.warm_engine = self.state.warm_engine, None
        lines = [record.stop_and_report()] if record else []
        # The engine removes a stale socket when it starts, but nothing else does: a
        # stopped stack leaves no socket behind.
        if self.path is not None and self.path.is_socket():
            self.path.unlink(missing_ok=True)
        return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        if len(argv) != 2 or not Path(argv[1]).parent.is_dir():
            print("sierra_prefect.warm_engine: usage: serve SOCKET (a path in an existing "
                  "directory); `sierra-prefect up` starts it for you", file=sys.stderr)
            return 2
        serve(Path(argv[1]))
        return 0
    return engine_client()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

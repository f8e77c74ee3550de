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
signals it gets (the worker's cancel) to the child, and exits with the child's exit code.
If the client dies (its worker was killed), the child gets SIGTERM, so the flow ends its
experimental runs with their grace period, and SIGKILL if it still runs ``grace`` seconds
later. With no warm engine to reach (a stock worker on another host, where
``SIERRA_PREFECT_WARM_ENGINE`` is unset), the client becomes ``python -m prefect.engine``
itself: the same flow run, started cold.

The warm engine runs exactly the code of the stack that started it. Every request carries
the client's ``Code``: its venv, the checkout it imported ``sierra_prefect`` from, and the
state of that checkout's ``uv.lock``. A client of another venv or checkout, or one that
comes after ``uv.lock`` changed (an upgrade), is refused and starts cold (with
``PREFECT_LOGGING_LEVEL=DEBUG`` it says why on stderr; the warm engine's log always does);
``sierra-prefect up`` restarts a warm engine whose code is not the checkout's any more.
Within that code, a forked child re-imports the ``flows`` and ``sierra_prefect`` modules
edited since the warm engine imported them (``forget_edited``), as a cold start would.

Any module can be run this way, as ``python -m MODULE ARGS`` would run it: the
``sierra-prefect`` entry point (``sierra_prefect/__main__.py``) hands ``run`` and
``check`` (what SIERRA calls) to ``run_module_warm(home, "sierra_prefect.cli", argv)``, so a
trigger does not pay Prefect's import either, and ``sierra-prefect up`` deploys with
``prefect --no-prompt deploy --all`` forked the same way (``run_forked``). This module
knows nothing of the CLI.

Client and warm engine speak in typed frames (``Kind``, ``Channel``): a ``REQUEST`` with the
client's stdio attached; ``ACCEPTED`` or ``REFUSED`` (the client then starts cold); then
``SIGNAL`` frames in and one ``EXIT`` frame out.

The server side (started by ``sierra-prefect up``, role ``warm-engine``)::

    python -m sierra_prefect.warm_engine serve SOCKET [GRACE_SECONDS]

and its lifecycle in a stack (start, ready, stop; ``down`` also removes the socket)::

    engine = WarmEngine(settings, state, say, save)
    engine.start(env, project, restart=False); engine.wait_ready(); engine.stop()

Only the standard library is imported at module level: the client must start fast (its
identity is one ``realpath`` and one ``stat``; digests are the warm engine's and ``up``'s).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the lifecycle's types; the client imports none of them
    from sierra_prefect.settings import Settings
    from sierra_prefect.state import StackState

# The worker's environment names the socket; flow-run processes inherit it.
SOCKET_ENV = "SIERRA_PREFECT_WARM_ENGINE"
# Unix socket paths are limited to 108 bytes; past that there is no warm engine.
MAX_SOCKET_PATH = 100
# How long a child whose client died gets between SIGTERM and SIGKILL: the flow ends its
# runs within flows/execute.py's KILL_GRACE_SECONDS, then Prefect reports the flow run's
# state; Prefect's process worker gives a cancelled flow run as long.
CLIENT_GONE_GRACE_SECONDS = 30.0
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


def _debug(message: str) -> None:
    """A line on stderr at Prefect's debug level (the client has no logging of its own)."""
    if os.environ.get("PREFECT_LOGGING_LEVEL", "").upper() == "DEBUG":
        print(f"sierra-prefect: {message}", file=sys.stderr, flush=True)


# -- frames: what client and warm engine say to each other ------------------------------------


class ProtocolError(Exception):
    """Bytes on the socket that are not a frame this protocol knows."""


class Kind:
    """The types of frame. (Plain ints, not an enum: the client starts for every flow run
    and pays for every class it builds.)"""

    REQUEST = 1   # client -> engine, first: JSON (module, argv, env, cwd, umask, code) + stdio
    SIGNAL = 2    # client -> engine: a signal number for the child
    ACCEPTED = 3  # engine -> client: the child runs here; the client must not start it cold
    REFUSED = 4   # engine -> client: why not (UTF-8); nothing ran, the client starts cold
    EXIT = 5      # engine -> client: the child's exit code (-N: killed by signal N)


_KIND_NAMES = {value: name for name, value in vars(Kind).items() if name.isupper()}


# Header: the payload's length, then its kind. The length comes first, as 8 bytes, because
# warm engines of the unframed protocol before read exactly that and then JSON: they read the
# kind byte as the start of the JSON, fail, and close the connection, so their new client
# starts cold instead of waiting on an engine that waits for more bytes.
_HEADER = struct.Struct("!QB")
_NUMBER = struct.Struct("!i")
# Payload sizes fixed by kind; the others are at most MAX_PAYLOAD (an environment is large).
_SIZES = {Kind.SIGNAL: _NUMBER.size, Kind.ACCEPTED: 0, Kind.EXIT: _NUMBER.size}
MAX_PAYLOAD = 16 * 1024 * 1024
_CHUNK = 65536


class Frame:
    """One message: its ``Kind`` and its payload."""

    __slots__ = ("kind", "payload")

    def __init__(self, kind: int, payload: bytes = b"") -> None:
        self.kind, self.payload = kind, payload

    @property
    def name(self) -> str:
        return _KIND_NAMES[self.kind]

    @classmethod
    def number(cls, kind: int, value: int) -> Frame:
        return cls(kind, _NUMBER.pack(value))

    def as_number(self) -> int:
        return _NUMBER.unpack(self.payload)[0]

    def encode(self) -> bytes:
        return _HEADER.pack(len(self.payload), self.kind) + self.payload


class FrameReader:
    """Frames out of a byte stream however it arrives: a frame split over many reads, or
    several in one. A header of an unknown kind or a wrong size is refused as soon as it
    is complete, before its payload is waited for."""

    def __init__(self, limit: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            length, kind = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + self._check(length, kind)
            if len(self._buffer) < end:
                break
            frames.append(Frame(kind, bytes(self._buffer[_HEADER.size:end])))
            del self._buffer[:end]
        return frames

    def _check(self, length: int, kind: int) -> int:
        name = _KIND_NAMES.get(kind)
        if name is None:
            raise ProtocolError(f"unknown message type {kind}")
        expected = _SIZES.get(kind)
        if expected is not None and length != expected:
            raise ProtocolError(f"{name} of {length} bytes (it has {expected})")
        if length > self._limit:
            raise ProtocolError(f"{name} of {length} bytes (at most {self._limit})")
        return length

    def end(self) -> None:
        """The peer closed: fine between frames, a ProtocolError within one."""
        if self._buffer:
            raise ProtocolError(f"connection closed {len(self._buffer)} bytes into a message")


class Channel:
    """Frames over one connected Unix socket, both ways."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = FrameReader()
        self._ready: list[Frame] = []

    def send(self, frame: Frame, fds: Iterable[int] = ()) -> None:
        data = frame.encode()
        fds = list(fds)
        sent = socket.send_fds(self.sock, [data], fds) if fds else 0  # fds ride on byte one
        self.sock.sendall(data[sent:])

    def receive_some(self) -> list[Frame] | None:
        """The frames complete after one read (maybe none yet); None once the peer closed."""
        data = self.sock.recv(_CHUNK)
        if not data:
            self._reader.end()
            return None
        frames, self._ready = self._ready + self._reader.feed(data), []
        return frames

    def receive(self) -> Frame | None:
        """The next frame, waiting for it; None if the peer closed first."""
        while not self._ready:
            try:
                frames = self.receive_some()
            except InterruptedError:
                continue
            if frames is None:
                return None
            self._ready = frames
        return self._ready.pop(0)

    def receive_with_fds(self, count: int) -> tuple[Frame | None, list[int]]:
        """The first frame and the file descriptors sent with it (at most ``count``)."""
        data, fds, _flags, _addr = socket.recv_fds(self.sock, _CHUNK, count)
        try:
            if not data:
                self._reader.end()
                return None, fds
            self._ready = self._reader.feed(data)
            return self.receive(), fds
        except BaseException:
            _close_all(fds)
            raise


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


# -- code identity: which code a process runs ---------------------------------------------


def _lock_stat(checkout: str) -> str:
    try:
        stat = os.stat(os.path.join(checkout, "uv.lock"))
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def lock_digest(checkout: str) -> str:
    """SHA-256 of ``uv.lock`` in ``checkout`` ("" if it has none): what ``up`` and the warm
    engine compare to tell an upgrade."""
    from sierra_prefect.digests import files_digest

    root = Path(checkout)
    return files_digest(root, [root / "uv.lock"]) if (root / "uv.lock").is_file() else ""


class Code:
    """Which code a process runs: its venv, the checkout it imported this package from, and
    the state of that checkout's ``uv.lock`` (size, mtime and inode: one stat, cheap enough
    for every client; the warm engine digests the file only when the stat differs)."""

    __slots__ = ("python", "checkout", "lock")

    def __init__(self, python: str, checkout: str, lock: str) -> None:
        self.python, self.checkout, self.lock = python, checkout, lock

    def as_dict(self) -> dict[str, str]:
        return {"python": self.python, "checkout": self.checkout, "lock": self.lock}

    @classmethod
    def here(cls) -> Code:
        checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        return cls(os.path.realpath(sys.prefix), checkout, _lock_stat(checkout))


class EngineCode:
    """The code the warm engine runs, taken as it starts: its ``Code``, the digest of
    ``uv.lock`` and of this module (which a running engine cannot re-import)."""

    def __init__(self, code: Code, lock_digest: str, engine_digest: str) -> None:
        self.code, self.lock_digest, self.engine_digest = code, lock_digest, engine_digest

    @classmethod
    def here(cls) -> EngineCode:
        from sierra_prefect.digests import files_digest

        code = Code.here()
        this = Path(os.path.realpath(__file__))
        return cls(code, lock_digest(code.checkout), files_digest(this.parent, [this]))

    def record(self) -> dict[str, str]:
        """What ``up`` keeps in the stack's state to tell, later, whether it is current."""
        return {"python": self.code.python, "checkout": self.code.checkout,
                "lock_digest": self.lock_digest, "engine_digest": self.engine_digest}

    def refusal(self, client: object) -> str | None:
        """Why a client whose request carries ``client`` (a ``Code`` as a dict) must not be
        served here but start cold; None if it runs exactly this code."""
        try:
            theirs = Code(**client)  # type: ignore[arg-type]  # a dict, from JSON
        except TypeError:
            return "the request names no code it runs (a client of another version)"
        if theirs.python != self.code.python:
            return f"its venv {theirs.python} is not the warm engine's ({self.code.python})"
        if theirs.checkout != self.code.checkout:
            return f"its checkout {theirs.checkout} is not the warm engine's ({self.code.checkout})"
        if theirs.lock != self.code.lock and lock_digest(self.code.checkout) != self.lock_digest:
            return (f"{self.code.checkout}/uv.lock changed since the warm engine started (an "
                    "upgrade?): `sierra-prefect up` restarts it")
        return None


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


def _request(sock: socket.socket, module: str, argv: list[str], env: dict[str, str], cwd: str,
             stdio: tuple[int, int, int]) -> Channel | None:
    """Ask the warm engine at ``sock`` to run ``python -m MODULE ARGV``: the channel to
    follow it on once accepted; None if the engine did not take it (it refused, or closed:
    an engine of an older protocol), so the caller starts it cold."""
    umask = os.umask(0o077)
    os.umask(umask)
    request = json.dumps({"module": module, "argv": argv, "env": env, "cwd": cwd,
                          "umask": umask, "code": Code.here().as_dict()}).encode()
    channel = Channel(sock)
    why = "it closed the connection unanswered (an engine of an older sierra-prefect?)"
    try:
        channel.send(Frame(Kind.REQUEST, request), stdio)
        answer = channel.receive()
    except ConnectionResetError:  # closed with our request unread: unanswered too
        answer = None
    except (OSError, ProtocolError) as exc:
        answer, why = None, f"its answer was unreadable ({exc})"
    if answer is not None and answer.kind == Kind.ACCEPTED:
        return channel
    if answer is not None:
        why = (answer.payload.decode(errors="replace") if answer.kind == Kind.REFUSED
               else f"it answered {answer.name}")
    _debug(f"the warm engine did not take `{module}` ({why}): starting it cold")
    sock.close()
    return None


def _forward(channel: Channel, signum: int) -> None:
    try:
        channel.send(Frame.number(Kind.SIGNAL, signum))
    except OSError:
        pass  # the child already ended


def _exit_code(channel: Channel) -> int | None:
    """The child's exit code, once it exits; None if the warm engine went away first."""
    try:
        frame = channel.receive()
    except (OSError, ProtocolError):
        return None
    return frame.as_number() if frame is not None and frame.kind == Kind.EXIT else None


def _run_warm(path: str | Path | None, module: str, argv: list[str]) -> int | None:
    """``python -m MODULE ARGV`` as this process would run it (its environment, directory
    and stdio), forked from the warm engine at ``path``; signals relayed. Its exit code, or
    None if no warm engine took it (the caller starts it cold)."""
    sock = _connect(path)
    if sock is None:
        return None
    channel = _request(sock, module, argv, dict(os.environ), os.getcwd(), (0, 1, 2))
    if channel is None:
        return None
    for signum in _FORWARDED:  # the worker cancels a flow run by signalling us; Ctrl-C
        signal.signal(signum, lambda signum, _frame: _forward(channel, signum))
    code = _exit_code(channel)
    if code is None:
        print("sierra-prefect: the warm engine went away before the end", file=sys.stderr)
        return 1
    return code


def run_forked(path: Path | None, argv: list[str], env: dict[str, str], cwd: Path,
               stdio: tuple[int, int, int]) -> int | None:
    """``prefect ARGV`` forked from the warm engine at ``path`` (``up`` deploys this way);
    its exit code, or None if no warm engine took it or it went away (the caller starts it
    cold)."""
    sock = _connect(path)
    if sock is None:
        return None
    channel = _request(sock, "prefect", argv, env, str(cwd), stdio)
    if channel is None:
        return None
    with sock:
        return _exit_code(channel)


def run_module_warm(home: Path, module: str, argv: list[str]) -> int | None:
    """``python -m MODULE ARGV`` with this process's environment and terminal, forked from
    the warm engine of the stack in ``home``; its exit code, or None if none took it."""
    return _run_warm(socket_path(home), module, argv)


def engine_client() -> int:
    """The pool's job command: this flow run, forked warm, or ``python -m prefect.engine``."""
    code = _run_warm(os.environ.get(SOCKET_ENV), "prefect.engine", sys.argv[1:])
    if code is None:
        os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])
    return code


# -- the server: one per worker host, started by `sierra-prefect up` ----------------------


# What a forked child re-imports when edited: the flow (as a cold engine reads it from disk
# for every flow run) and this package (what the flow and the CLI import of it).
_RELOADED = ("flows", "sierra_prefect")
# The shim's modules `sierra-prefect run` and `check` import (~50 ms a command otherwise).
PRELOADED = ("sierra_prefect.docker", "sierra_prefect.stack", "sierra_prefect.trigger")


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
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        module = request["module"]
        for package in _RELOADED:
            forget_edited(package, warm_since)

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


# What a request must hold, and of which type.
_REQUEST_FIELDS = {"module": str, "argv": list, "env": dict, "cwd": str, "umask": int, "code": dict}


def _parse_request(frame: Frame | None, fds: list[int]) -> dict:
    if frame is None or frame.kind != Kind.REQUEST:
        raise ProtocolError(f"a {frame.name if frame else 'closed connection'} where a "
                            "REQUEST was due")
    if len(fds) != _STDIO:
        raise ProtocolError(f"a REQUEST with {len(fds)} file descriptors (stdin/out/err are due)")
    try:
        request = json.loads(frame.payload)
    except ValueError as exc:
        raise ProtocolError(f"a REQUEST that is not JSON ({exc})") from exc
    if not isinstance(request, dict):
        raise ProtocolError("a REQUEST that is not a JSON object")
    wrong = [name for name, kind in _REQUEST_FIELDS.items() if not isinstance(request.get(name), kind)]
    if wrong:
        raise ProtocolError(f"a REQUEST without a valid {', '.join(wrong)}")
    return request


# How the warm engine's log names what a child runs (tests and people read it).
_LOG_NAMES = {"sierra_prefect.cli": "sierra-prefect", "prefect": "prefect"}


def _describe(request: dict) -> str:
    module = request["module"]
    if module == "prefect.engine":
        return f"flow run {request['env'].get('PREFECT__FLOW_RUN_ID')}"
    return f"{_LOG_NAMES.get(module, module)} {' '.join(request['argv'][:3])}"


class Session:
    """One client's request, in a child of the warm engine: check it, fork the child that
    runs it, relay signals in and the exit code out, and end the child if the client dies."""

    def __init__(self, conn: socket.socket, code: EngineCode, warm_since: float, grace: float) -> None:
        self.channel = Channel(conn)
        self.code, self.warm_since, self.grace = code, warm_since, grace

    def run(self) -> None:
        # Its own process group: restarting or stopping the warm engine (a group kill) leaves
        # flow runs in flight alone; they end with their client, i.e. with their worker.
        os.setpgid(0, 0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        request, stdio = self._request()
        if request is None:
            return
        try:
            self.channel.send(Frame(Kind.ACCEPTED))
        except OSError:  # the client is gone already: nothing runs
            _close_all(stdio)
            return
        engine = os.fork()
        if engine == 0:
            self.channel.sock.close()
            _run_child(request, stdio, self.warm_since)
        _close_all(stdio)
        print(f"{_describe(request)}: engine pid {engine}", flush=True)
        self._relay(engine)

    def _request(self) -> tuple[dict | None, list[int]]:
        """The client's request and stdio if it may run here; else it is refused (None)."""
        fds: list[int] = []
        try:
            frame, fds = self.channel.receive_with_fds(_STDIO)
            if frame is None and not fds:
                return None, []  # a probe (is_listening), or a client that gave up
            request = _parse_request(frame, fds)
        except (OSError, ProtocolError) as exc:
            return self._refuse("a request", f"malformed: {exc}", fds)
        reason = self.code.refusal(request["code"])
        if reason:
            return self._refuse(_describe(request), reason, fds)
        return request, fds

    def _refuse(self, what: str, reason: str, fds: list[int]) -> tuple[None, list[int]]:
        _close_all(fds)
        print(f"refused {what}: {reason}", flush=True)
        try:
            self.channel.send(Frame(Kind.REFUSED, reason.encode()))
        except OSError:
            pass  # the client is gone
        return None, []

    def _relay(self, engine: int) -> None:
        exited = os.pidfd_open(engine)
        watched: list = [self.channel.sock, exited]
        kill_at: float | None = None
        while True:
            timeout = None if kill_at is None else max(0.0, kill_at - time.monotonic())
            ready, _, _ = select.select(watched, [], [], timeout)
            if exited in ready:
                self._report_exit(engine)
                return
            if not ready:  # the grace after SIGTERM is over
                print(f"engine pid {engine} still runs {self.grace:g} s after SIGTERM: SIGKILL",
                      flush=True)
                os.kill(engine, signal.SIGKILL)
                kill_at = None
            elif not self._pass_signals(engine):
                # The client died (e.g. its worker was killed): the flow run goes too, but by
                # SIGTERM first, so it ends its runs (their process groups, children included)
                # instead of leaving them to run on.
                print(f"client of engine pid {engine} went away: SIGTERM, and SIGKILL if it "
                      f"still runs in {self.grace:g} s", flush=True)
                os.kill(engine, signal.SIGTERM)
                watched, kill_at = [exited], time.monotonic() + self.grace

    def _pass_signals(self, engine: int) -> bool:
        """Pass the signals the client sent on to the child; False if the client is gone
        (or speaks out of turn, which is treated the same)."""
        try:
            frames = self.channel.receive_some()
        except (OSError, ProtocolError) as exc:
            print(f"client of engine pid {engine}: {exc}", flush=True)
            return False
        if frames is None:
            return False
        for frame in frames:
            signum = frame.as_number() if frame.kind == Kind.SIGNAL else None
            if signum not in _FORWARDED:
                print(f"client of engine pid {engine} sent {frame.name} {signum or ''}: "
                      "not a signal it may pass on", flush=True)
                return False
            os.kill(engine, signum)
        return True

    def _report_exit(self, engine: int) -> None:
        _, status = os.waitpid(engine, 0)
        code = os.waitstatus_to_exitcode(status)
        print(f"engine pid {engine} exited {code}", flush=True)
        try:
            self.channel.send(Frame.number(Kind.EXIT, code))
        except OSError:
            pass  # the client is gone


def serve(path: Path, grace: float = CLIENT_GONE_GRACE_SECONDS) -> None:
    """Import Prefect and the flow once, then fork a session per client, forever."""
    warm_since = time.time()  # flows/ as about to be imported (see forget_edited)
    code = EngineCode.here()  # before the imports: what they will read
    import importlib
    import threading

    # What every flow run imports (not prefect.engine: that runs as __main__), and what
    # `sierra-prefect run` and `check` import. The shim's and the flow's own modules are
    # read afresh by a child when any of them changed since (forget_edited), as a cold
    # start would.
    import prefect.deployments
    import prefect.flow_engine
    import prefect.task_engine  # noqa: F401  the experiments' task runs
    import psutil  # noqa: F401  the flow's resources and watchdog
    import pydantic_settings  # noqa: F401
    import rich.progress  # noqa: F401
    import typer  # noqa: F401

    import flows.sierra_batch  # noqa: F401  the flow (cwd: the project)

    for name in PRELOADED:  # by name: warming them is not depending on them
        importlib.import_module(name)

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
    print(f"warm engine ready on {path} (pid {os.getpid()}): venv {code.code.python}, checkout "
          f"{code.code.checkout}, uv.lock {code.lock_digest[:12] or 'none'}", flush=True)
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
                Session(conn, code, warm_since, grace).run()
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(0)
        conn.close()


# -- its lifecycle in a stack: `sierra-prefect up` starts it, `down` stops it -------------------


# Why a recorded warm engine is stale, by the field of ``EngineCode.record`` that differs.
_STALE = {
    "python": "it runs another venv ({was})",
    "checkout": "it runs another checkout ({was})",
    "lock_digest": "uv.lock changed since it started (an upgrade?)",
    "engine_digest": "its own module (sierra_prefect/warm_engine.py) changed since it started",
}


class WarmEngine:
    """The warm engine of the stack in ``settings.home``: start, ready, stop.

    Its record lives in the stack's state (``state.warm_engine``, and the code it runs in
    ``state.warm_engine_code``); ``save`` persists the state right after a start, so a
    failing ``up`` still leaves a pid ``down`` can stop."""

    ROLE = "warm-engine"

    def __init__(self, settings: Settings, state: StackState, say: Callable[[str], None],
                 save: Callable[[], None]) -> None:
        self.settings, self.state, self.say, self.save = settings, state, say, save
        self.path = socket_path(settings.home)
        self._here: EngineCode | None = None

    def is_current(self) -> bool:
        """Running this checkout's code (``stale``), or impossible here (a home too long for
        a socket path)."""
        record = self.state.warm_engine
        return self.path is None or bool(record and record.is_running() and self.stale() is None)

    def _code(self) -> EngineCode:
        """The code ``start`` would start: this process's (same venv, same checkout)."""
        if self._here is None:
            self._here = EngineCode.here()
        return self._here

    def stale(self) -> str | None:
        """Why the recorded warm engine does not run this checkout's code any more (another
        venv or checkout, an upgraded ``uv.lock``, its own module edited); None if it does."""
        recorded = self.state.warm_engine_code
        if not recorded:
            return "no record of the code it runs (started by an older sierra-prefect)"
        now = self._code().record()
        reasons = [why.format(was=recorded.get(name)) for name, why in _STALE.items()
                   if recorded.get(name) != now[name]]
        return "; ".join(reasons) or None

    def start(self, env: dict[str, str], project: Path, restart: bool) -> None:
        """Start it unless it runs this checkout's code and the flow code is unchanged
        (``restart``: it holds flows/ imported); returns at once, see ``wait_ready``."""
        from sierra_prefect.processes import ProcessRecord

        if self.path is None:
            self.say(f"no warm engine: {self.settings.home} is too long a path for a Unix "
                     "socket; flow runs start cold (~2 s more each)")
            return
        running = self.state.warm_engine
        if running and running.is_running():
            reason = self.stale() or ("flow code changed" if restart else None)
            if reason is None:
                self.say(f"warm engine already running (pid {running.pid})")
                return
            self.say(f"{reason}: restarting the warm engine (pid {running.pid})")
            running.stop()
        code = self._code().record()  # before it starts: an edit from now on restarts it
        record = ProcessRecord.spawn(
            self.ROLE, [sys.executable, "-m", "sierra_prefect.warm_engine", "serve", str(self.path)],
            env, self.settings.logs_dir / "warm-engine.log", project,
        )
        self.state.warm_engine, self.state.warm_engine_code = record, code
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
        self.state.warm_engine_code = None
        lines = [record.stop_and_report()] if record else []
        # The engine removes a stale socket when it starts, but nothing else does: a
        # stopped stack leaves no socket behind.
        if self.path is not None and self.path.is_socket():
            self.path.unlink(missing_ok=True)
        return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        grace = _grace(argv[2:])
        if len(argv) not in (2, 3) or grace is None or not Path(argv[1]).parent.is_dir():
            print("sierra_prefect.warm_engine: usage: serve SOCKET [GRACE_SECONDS] (a path in an "
                  "existing directory; seconds a child whose client died gets between SIGTERM "
                  "and SIGKILL); `sierra-prefect up` starts it for you", file=sys.stderr)
            return 2
        serve(Path(argv[1]), grace)
        return 0
    return engine_client()


def _grace(args: list[str]) -> float | None:
    if not args:
        return CLIENT_GONE_GRACE_SECONDS
    try:
        grace = float(args[0])
    except ValueError:
        return None
    return grace if 0 <= grace < float("inf") else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What another user's process tries against a stack: run *as that user* by the multi-user
tests (tests/test_multi_user.py), never imported by pytest itself.

Usage (from the checkout, with its venv's Python)::

    echo '{"paths": ["/home/a/.sierra-prefect"]}' | python -m tests.users_probe read

The request is JSON on stdin (never on the command line, where every user can read it);
the answer is JSON on stdout. Each action reports what happened and decides nothing: the
tests judge. Only the standard library and Prefect's own dependencies (httpx, websockets)
are imported, so the probe runs in a venv without the test group.

Actions:

- ``read``: for each path, ``"ok"`` if it could be listed (a directory) or read (a file), else
  the error's name (``PermissionError``, ...).
- ``http``: each ``[method, path, body]`` against ``base``: ``[status, start of the body]``,
  or ``[error name, error]``. With ``"auth": true`` it sends ``PREFECT_API_AUTH_STRING`` from this process's
  environment as Prefect's client does (HTTP basic).
- ``websocket``: each of Prefect's websocket routes at ``base``, opened as Prefect's client
  opens them (subprotocol ``prefect`` and an auth message) and as old clients do (no
  subprotocol): ``"accepted"`` or ``"refused: ..."``.
- ``unix``: connect to each Unix socket path: ``"connected"`` or the error's name.
- ``proc``: every ``/proc/PID/cmdline`` this user can read (``{pid: text}``), and for the pids
  of ``uid`` whether their ``environ`` could be read.
- ``find_readable``: every file and directory under ``roots`` this user can read (only those
  owned by ``uid``, if given).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
from pathlib import Path


def _outcome(action) -> str:
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def _read_one(path: str) -> str:
    # os.path.isdir: False (not an error) where the path cannot even be looked at.
    if os.path.isdir(path):
        return _outcome(lambda: os.listdir(path))
    return _outcome(lambda: Path(path).open("rb").read(1))


def read(request: dict) -> dict:
    return {path: _read_one(path) for path in request["paths"]}


def _auth_headers(request: dict) -> dict[str, str]:
    secret = os.environ.get("PREFECT_API_AUTH_STRING") if request.get("auth") else None
    if not secret:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


def http(request: dict) -> list:
    import httpx

    headers = _auth_headers(request)
    answers = []
    with httpx.Client(base_url=request["base"], headers=headers, timeout=30) as client:
        for method, path, body in request["requests"]:
            try:
                response = client.request(method, path, json=body)
                answers.append([response.status_code, response.text[:2000]])
            except httpx.HTTPError as exc:
                answers.append([type(exc).__name__, str(exc)])
    return answers


def _prefect_handshake(url: str, token: str | None) -> str:
    """As Prefect's client: subprotocol ``prefect``, then ``{"type": "auth"}`` first."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect

    try:
        with connect(url, subprotocols=["prefect"], open_timeout=20) as ws:
            ws.send(json.dumps({"type": "auth", "token": token}))
            reply = json.loads(ws.recv(timeout=20))
    except (ConnectionClosed, InvalidHandshake, OSError) as exc:
        return f"refused: {type(exc).__name__}"
    return "accepted" if reply.get("type") == "auth_success" else f"refused: {reply}"


def _legacy_handshake(url: str) -> str:
    """As clients before the ``prefect`` subprotocol: a plain websocket, no auth message."""
    from websockets.exceptions import InvalidHandshake
    from websockets.sync.client import connect

    try:
        with connect(url, open_timeout=20):
            return "accepted"
    except (InvalidHandshake, OSError) as exc:
        return f"refused: {type(exc).__name__}"


def websocket(request: dict) -> dict:
    base = request["base"].replace("http://", "ws://", 1)
    token = os.environ.get("PREFECT_API_AUTH_STRING") if request.get("auth") else None
    results = {}
    for route in request["routes"]:
        results[f"{route} (prefect)"] = _prefect_handshake(base + route, token)
        results[f"{route} (legacy)"] = _legacy_handshake(base + route)
    return results


def unix(request: dict) -> dict:
    results = {}
    for path in request["paths"]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            results[path] = "connected"
        except OSError as exc:
            results[path] = type(exc).__name__
        finally:
            sock.close()
    return results


def proc(request: dict) -> dict:
    cmdlines, environ = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdlines[entry.name] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            if entry.stat().st_uid == request["uid"]:
                environ[entry.name] = _outcome(lambda e=entry: (e / "environ").read_bytes())
        except OSError:
            continue  # exited meanwhile, or hidden from us
    return {"cmdlines": cmdlines, "environ": environ}


def _owned_by(path: str, uid: int | None) -> bool:
    try:
        return uid is None or os.lstat(path).st_uid == uid
    except OSError:
        return False


def find_readable(request: dict) -> list[str]:
    found, uid = [], request.get("uid")
    for root in request["roots"]:
        for directory, _dirs, files in os.walk(root, onerror=lambda _exc: None):
            if _owned_by(directory, uid):
                found.append(directory)  # os.walk lists only directories it could read
            for name in files:
                path = os.path.join(directory, name)
                if _owned_by(path, uid) and _read_one(path) == "ok":
                    found.append(path)
    return found


ACTIONS = {"read": read, "http": http, "websocket": websocket, "unix": unix, "proc": proc,
           "find_readable": find_readable}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ACTIONS:
        print(f"usage: python -m tests.users_probe {{{','.join(ACTIONS)}}} < request.json",
              file=sys.stderr)
        return 2
    print(json.dumps(ACTIONS[argv[0]](json.load(sys.stdin))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A busy or slow server never gives a user a traceback.

A real HTTP proxy on 127.0.0.1 stands in front of the session stack's real server: it
answers 503 (or nothing, for a while) to ``create_flow_run`` as a server busy writing a
backlog does, and passes everything else through. ``sierra-prefect run`` talks to the
proxy (``PREFECT_API_URL``, with the stack's credential as any client of a server given by
URL needs it); the worker still talks to the server.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from tests.helpers import make_batch, sierra_prefect

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding",
              "content-length", "proxy-connection", "upgrade"}


class BusyProxy:
    """Passes requests to ``upstream``; ``create_flow_run`` gets ``mode`` (503, or 503 after
    a long silence) for ``busy_seconds`` from the first such request on."""

    def __init__(self, upstream: str, mode: str = "503", busy_seconds: float = 0.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.mode = mode
        self.busy_seconds = busy_seconds
        self.until: float | None = None
        self.refused = 0  # create_flow_run requests answered busy
        self.created = 0  # create_flow_run requests passed through
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                creates = self.path.endswith("/create_flow_run")
                if creates and proxy.until is None:
                    proxy.until = time.monotonic() + proxy.busy_seconds
                if creates and time.monotonic() < proxy.until:
                    proxy.refused += 1
                    if proxy.mode == "slow":
                        time.sleep(proxy.until - time.monotonic())
                    self._answer(503, b'{"exception_message": "Service Unavailable"}', {})
                    return
                if creates:
                    proxy.created += 1
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP and k.lower() != "host"}
                with httpx.Client(timeout=60) as client:
                    reply = client.request(self.command, proxy.upstream + self.path,
                                           content=body, headers=headers)
                self._answer(reply.status_code, reply.content,
                             {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP})

            def _answer(self, status: int, body: bytes, headers: dict) -> None:
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", headers.get("content-type", "application/json"))
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> BusyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _run_through(stack, proxy: BusyProxy, tmp_path, deadline: float, extra: tuple = ()):
    batch, scratch = make_batch(tmp_path, ["echo ran"])
    env = {**stack.env, "PREFECT_API_URL": proxy.url + "/api",
           "PREFECT_API_AUTH_STRING": stack.auth_string,
           "SIERRA_PREFECT_BUSY_DEADLINE": str(deadline), "COLUMNS": "300"}
    started = time.monotonic()
    result = sierra_prefect("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                            str(scratch), *extra, env=env, timeout=300)
    return result, time.monotonic() - started, batch


def _flow_runs_tagged(stack, tag: str) -> list[dict]:
    reply = httpx.post(f"{stack.api_url}/flow_runs/filter", timeout=30, headers=stack.headers,
                       json={"flow_runs": {"tags": {"all_": [tag]}}})
    reply.raise_for_status()
    return reply.json()


def test_503_for_a_while_is_waited_through_visibly_and_the_batch_runs_once(stack, tmp_path):
    from flows.plan import batch_tag

    with BusyProxy(stack.api_url.removesuffix("/api"), mode="503", busy_seconds=3.0) as proxy:
        result, seconds, batch = _run_through(stack, proxy, tmp_path, deadline=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output
    assert proxy.refused >= 1 and proxy.created == 1
    assert "server busy (HTTP 503) while creating the flow run: retrying for up to" in result.stdout
    assert "COMPLETED: 1 runs: 1 succeeded" in result.stdout
    # Exactly one flow run for the batch, carrying the batch's tag.
    tag = batch_tag(str(batch))
    assert f"batch tag {tag}" in result.stdout
    [flow_run] = _flow_runs_tagged(stack, tag)
    assert flow_run["state"]["type"] == "COMPLETED"


def test_503_past_the_deadline_is_one_line_and_starts_nothing(stack, tmp_path):
    from flows.plan import batch_tag

    with BusyProxy(stack.api_url.removesuffix("/api"), mode="503", busy_seconds=600) as proxy:
        result, seconds, batch = _run_through(stack, proxy, tmp_path, deadline=3)
    assert result.returncode == 2  # a ShimError: the batch could not be started
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert re.match(rf"sierra-prefect: error: Prefect server at {proxy.url}/api stayed busy "
                    r"\(HTTP 503\) for \d+ s while creating the flow run; nothing was started",
                    lines[0]), lines[0]
    assert "SIERRA_PREFECT_BUSY_DEADLINE" in lines[0]
    assert "server busy (HTTP 503)" in result.stdout  # the visible reason while it waited
    assert proxy.refused >= 2 and proxy.created == 0
    assert seconds < 60, f"gave up after {seconds:.0f} s, not about the 3 s deadline"
    assert _flow_runs_tagged(stack, batch_tag(str(batch))) == []


def test_a_server_that_does_not_answer_is_one_line(stack, tmp_path):
    with BusyProxy(stack.api_url.removesuffix("/api"), mode="slow", busy_seconds=30) as proxy:
        result, seconds, _ = _run_through(stack, proxy, tmp_path, deadline=3, extra=("--json",))
    assert result.returncode == 2  # a ShimError: the batch could not be started
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "stayed busy (no answer in time)" in errors[0], result.stderr
    assert "server busy (no answer in time) while creating the flow run" in result.stderr
    assert result.stdout.strip() == "" or json.loads(result.stdout)
    assert seconds < 30

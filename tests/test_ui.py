"""The Prefect UI of a stack on a port other than 4200, in a real (headless) browser.

Prefect builds the UI's API URL from port 4200 whatever ``--port`` says, so before the
stack set ``PREFECT_UI_API_URL`` the UI of any other port showed "Can't connect to Server
API at http://127.0.0.1:4200/api" (or another user's stack on 4200). The stack's server
requires its credential, so the UI first asks for it (a login page); the test types what
``sierra-prefect auth-string`` prints, as a user would. Chromium is driven over its
DevTools protocol and may only reach 127.0.0.1: every other host name resolves to nothing.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from flows.plan import batch_tag
from tests.helpers import make_batch, stop_group, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """A headless Chromium of this test's own (its own profile), driven over the DevTools
    protocol: go to a page, read its text, type, click. Stopped by its process group."""

    def __init__(self, profile: Path) -> None:
        self.log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        active = profile / "DevToolsActivePort"  # Chromium writes its port here when it listens
        wait_until(lambda: active.is_file() and len(active.read_text().split()) == 2, 60,
                   "Chromium's DevTools port")
        port = active.read_text().split()[0]
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        target = next(p for p in pages if p["type"] == "page")
        from websockets.sync.client import connect

        self.socket = connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        """One DevTools command; its result (events in between are not ours to read)."""
        ident = next(self.ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == ident:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        return result["result"].get("value")

    def go(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        """The page's text: its DOM less scripts, styles and tags (hidden text included,
        e.g. a tag the layout truncates)."""
        dom = self.evaluate("document.documentElement.outerHTML") or ""
        dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
        return re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", dom))

    def wait_for_text(self, wanted: str, what: str, deadline: float = 300) -> str:
        """The page's text once it shows ``wanted``."""
        return wait_until(lambda: (t := self.text()) and wanted in t and t, deadline, what,
                          interval=0.25)

    def log_in(self, auth_string: str) -> None:
        """Type ``auth_string`` into the login page's password field and submit it."""
        self.evaluate("document.querySelector('input[type=password]').focus()")
        self.call("Input.insertText", text=auth_string)
        self.evaluate("document.querySelector('button[type=submit]').click()")

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            stop_group(self.proc, grace=10)  # our own Chromium, by its session's id
            self.log.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package `chromium`)")
def test_ui_on_a_non_default_port_shows_the_flow_run_and_its_runs(stack, tmp_path):
    ui_url = stack.api_url.removesuffix("/api")
    assert not ui_url.endswith(":4200"), "the session stack runs on a free port, not 4200"
    settings = httpx.get(f"{ui_url}/ui-settings", timeout=10).json()
    assert settings["api_url"] == stack.api_url
    assert settings["auth"] == "BASIC"  # the UI asks for the credential

    batch, scratch = make_batch(tmp_path, ["true", "true"])
    result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                       str(scratch), "--json")
    assert result.returncode == 0, result.stderr
    flow_run_id = json.loads(result.stdout)["flow_run_id"]
    flow_run_name = httpx.get(f"{stack.api_url}/flow_runs/{flow_run_id}", timeout=10,
                              headers=stack.headers).json()["name"]

    browser = Browser(tmp_path / "profile")
    try:
        # The UI's front page asks for the credential first, and shows nothing of the stack;
        # a user pastes what `sierra-prefect auth-string` prints.
        browser.go(f"{ui_url}/")
        text = browser.wait_for_text("Login", f"{ui_url} to ask for the credential", deadline=120)
        assert flow_run_name not in text
        credential = stack.cli("auth-string", check=True).stdout.strip()
        assert credential == stack.auth_string
        browser.log_in(credential)
        token = base64.b64encode(credential.encode()).decode()  # what the UI keeps and sends
        wait_until(lambda: browser.evaluate("localStorage.getItem('prefect-password')") == token,
                   60, "the UI to accept the credential")

        # The page `sierra-prefect run` links to (the classic UI): the flow run, from the API.
        page = f"{ui_url}/runs/flow-run/{flow_run_id}"
        browser.go(page)
        text = browser.wait_for_text(flow_run_name, f"{page} to show flow run {flow_run_name}")
        # One task run per experiment (here the batch's one), not one per run.
        text = browser.wait_for_text("1 Task run", f"{page} to count the task runs")
        assert "Can't connect" not in text and "Login" not in text, text[:600]

        # The task-run tab lists the experiment by name.
        tab = f"{ui_url}/v2/runs/flow-run/{flow_run_id}?tab=TaskRuns"
        browser.go(tab)
        text = browser.wait_for_text("batch", f"{tab} to list the task runs")
        assert "Can't connect" not in text

        # The new UI's artifacts tab shows the progress and the per-run table; the flow run
        # carries the batch's tag (the UI filters flow runs by it).
        tab = f"{ui_url}/v2/runs/flow-run/{flow_run_id}?tab=Artifacts"
        browser.go(tab)
        text = browser.wait_for_text("2 of 2 runs done: 2 succeeded, 0 failed, 0 skipped",
                                     f"{tab} to show the progress artifact")
        text = browser.wait_for_text("batch: runs (page 1)", f"{tab} to show the run table")
        assert batch_tag(str(batch)) in text, text[:2000]
    finally:
        browser.close()

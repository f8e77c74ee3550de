"""The Prefect UI of a stack on a port other than 4200, in a real (headless) browser.

Prefect builds the UI's API URL from port 4200 whatever ``--port`` says, so before the
stack set ``PREFECT_UI_API_URL`` the UI of any other port showed "Can't connect to Server
API at http://127.0.0.1:4200/api" (or another user's stack on 4200). Chromium here may
only reach 127.0.0.1: every other host name resolves to nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from flows.plan import batch_tag
from tests.helpers import make_batch, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _page_text(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (up to 20 s of virtual time)."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}",
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", result.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", dom))


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package `chromium`)")
def test_ui_on_a_non_default_port_shows_the_flow_run_and_its_runs(stack, tmp_path):
    ui_url = stack.api_url.removesuffix("/api")
    assert not ui_url.endswith(":4200"), "the session stack runs on a free port, not 4200"
    settings = httpx.get(f"{ui_url}/ui-settings", timeout=10).json()
    assert settings["api_url"] == stack.api_url

    batch, scratch = make_batch(tmp_path, ["true", "true"])
    result = stack.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                       str(scratch), "--json")
    assert result.returncode == 0, result.stderr
    flow_run_id = json.loads(result.stdout)["flow_run_id"]
    flow_run_name = httpx.get(f"{stack.api_url}/flow_runs/{flow_run_id}", timeout=10).json()["name"]

    # The page `sierra-prefect run` links to (the classic UI): the flow run, from the API.
    page = f"{ui_url}/runs/flow-run/{flow_run_id}"
    text = wait_until(lambda: (t := _page_text(page, tmp_path / "profile")) and flow_run_name in t and t,
                      300, f"{page} to show flow run {flow_run_name}", interval=0)
    # One task run per experiment (here the batch's one), not one per run.
    assert "Can't connect" not in text and "1 Task run" in text, text[:600]

    # The task-run tab lists the experiment by name.
    tab = f"{ui_url}/v2/runs/flow-run/{flow_run_id}?tab=TaskRuns"
    text = wait_until(lambda: (t := _page_text(tab, tmp_path / "profile")) and "batch" in t and t,
                      300, f"{tab} to list the task runs", interval=0)
    assert "Can't connect" not in text

    # The new UI's artifacts tab shows the progress and the per-run table; the flow run
    # carries the batch's tag (the UI filters flow runs by it).
    tab = f"{ui_url}/v2/runs/flow-run/{flow_run_id}?tab=Artifacts"
    text = wait_until(lambda: (t := _page_text(tab, tmp_path / "profile"))
                      and "2 of 2 runs done: 2 succeeded, 0 failed, 0 skipped" in t and t,
                      300, f"{tab} to show the progress artifact", interval=0)
    assert "batch: runs (page 1)" in text and batch_tag(str(batch)) in text, text[:2000]

"""3. Trigger latency: from starting ``sierra-prefect run`` to the first run starting.

Warm stack (up, deployed, worker online, flows already run once). The batch is one run,
``date +%s.%N > FILE``; the latency is that timestamp minus the wall-clock time just
before the CLI was started. The flow run's state history (server timestamps, same
clock) splits it into: the CLI until the flow run exists, the worker picking it up
(PENDING), the flow-run process starting the flow (RUNNING), and the flow body until
the command runs.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from benchmarks.common import (
    CLI,
    Stack,
    flow_run_timeline,
    log,
    prefect_api,
    wait_server_quiet,
    write_batch,
)

PHASES = (
    ("cli_to_created", "CLI start -> flow run created"),
    ("created_to_pending", "created -> picked up by the worker (PENDING)"),
    ("pending_to_running", "picked up -> flow running (flow-run process started)"),
    ("running_to_first", "flow running -> first run's command starts"),
)


def measure(stack: Stack, work: Path, repeats: int) -> dict:
    api_url = stack.api_url
    samples = []
    for r in range(repeats):
        wait_server_quiet(stack)
        sample = one(stack, work / f"trigger-{r}", api_url)
        samples.append(sample)
        if sample["ok"]:
            log(f"trigger {r + 1}/{repeats}: first run after {sample['latency']:.2f} s "
                + ", ".join(f"{k} {sample[k]:.2f}" for k, _ in PHASES))
    return {"samples": samples}


def one(stack: Stack, case: Path, api_url: str, timeout: float = 300) -> dict:
    """One trigger of a one-run batch, now (the caller decides whether the server is quiet)."""
    stamp = case / "first.start"
    batch = write_batch(case / "batch", [f"date +%s.%N > {stamp}"])
    argv = [CLI, "run", "sierra/local", "--input-root", str(batch),
            "--scratch-root", str(case / "scratch"), "--no-resume", "--json"]
    t0 = time.time()
    try:
        result = subprocess.run(argv, env=stack.env, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "exit_code": None, "wall": time.time() - t0,
                "error": f"sierra-prefect run did not exit within {timeout:.0f} s"}
    t_end = time.time()
    sample: dict = {"exit_code": result.returncode, "wall": t_end - t0}
    if result.returncode != 0 or not stamp.exists():
        sample.update(ok=False, error=(result.stderr or result.stdout)[-1500:] or "no stamp")
        return sample
    first = float(stamp.read_text())
    sample.update(ok=True, latency=first - t0)
    flow_run_id = json.loads(result.stdout)["flow_run_id"]
    with prefect_api(api_url, stack.auth_string) as client:
        tl = flow_run_timeline(client, flow_run_id)
    running = tl.get("running", tl.get("start_time"))
    sample.update(
        flow_run_id=flow_run_id,
        cli_to_created=tl["created"] - t0,
        created_to_pending=tl.get("pending", tl["created"]) - tl["created"],
        pending_to_running=running - tl.get("pending", tl["created"]),
        running_to_first=first - running,
        first_to_cli_exit=t_end - first,
    )
    return sample

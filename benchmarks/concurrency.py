"""1. Concurrency: N runs of ``sleep S`` at cap C, three ways, on the same stack.

- ``ours``: ``sierra-prefect run sierra/local --max-parallel C`` (the flow's local
  thread pool is the cap).
- ``tag``: the same commands as tasks tagged with a tag-based task concurrency limit
  of C slots (SIERRA's approach), flow ``bench-tag-limit`` from
  :mod:`benchmarks.limit_flows`.
- ``gcl``: the same commands as tasks that each hold one slot of a global concurrency
  limit of C slots, flow ``bench-gcl``.

All three go through the same pool and worker (the baselines are deployed to
``sierra-pool`` from this checkout) and are triggered by a subprocess that then follows
the flow run, so each wall time covers the same path. Every run writes its start and end
time (``date +%s.%N``); from those come the span (first start to last end), the
efficiency ``ideal / span`` with ``ideal = N * S / C`` and the most runs at once. The
variants alternate within each repeat, so the ratios are taken pair by pair.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from benchmarks import limit_flows
from benchmarks.common import (
    CLI,
    PROJECT,
    Stack,
    log,
    max_at_once,
    prefect_api,
    read_intervals,
    span,
    timed_commands,
    wait_server_quiet,
    write_batch,
)

VARIANTS = ("ours", "tag", "gcl")


def measure(stack: Stack, work: Path, repeats: int, n: int, seconds: float, cap: int,
            deadline: float) -> dict:
    api_url = stack.api_url
    ideal = n * seconds / cap
    suffix = uuid.uuid4().hex[:8]
    tag, gcl_name = f"bench-tag-{suffix}", f"bench-gcl-{suffix}"
    with prefect_api(api_url, stack.auth_string) as client:
        deployments = limit_flows.deploy(PROJECT, "sierra-pool")
        limit_flows.create_limits(client, tag, gcl_name, cap)
    env = stack.client_env
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        for r in range(repeats):
            order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
            for variant in order:
                case = work / f"concurrency-{r}-{variant}"
                stamps = case / "stamps"
                batch = write_batch(case / "batch", timed_commands(stamps, n, seconds))
                if variant == "ours":
                    argv = [CLI, "run", "sierra/local", "--input-root", str(batch),
                            "--scratch-root", str(case / "scratch"), "--max-parallel", str(cap),
                            "--no-resume", "--json"]
                else:
                    param = f"tag={tag}" if variant == "tag" else f"limit_name={gcl_name}"
                    argv = [sys.executable, "-m", "benchmarks.limit_flows",
                            deployments[variant], str(batch), param, "--deadline", str(deadline)]
                quiet = wait_server_quiet(stack)
                sample = _one(argv, env, stamps, n, ideal, deadline)
                sample["waited_for_quiet_server"] = quiet
                samples[variant].append(sample)
                log(f"concurrency {r + 1}/{repeats} {variant}: wall {sample['wall']:.2f} s, "
                    f"span {sample.get('span') or float('nan'):.2f} s, "
                    f"max at once {sample.get('max_at_once')}, ok {sample['ok']}")
    finally:
        with prefect_api(api_url, stack.auth_string) as client:
            limit_flows.delete_limits(client, tag, gcl_name)
    return {"n": n, "seconds": seconds, "cap": cap, "ideal": ideal, "variants": samples}


def _one(argv: list[str], env: dict, stamps: Path, n: int, ideal: float, deadline: float) -> dict:
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=PROJECT, capture_output=True, text=True,
                            timeout=deadline + 120, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    intervals = read_intervals(stamps)
    sample: dict = {"wall": wall, "runs_finished": len(intervals), "exit_code": result.returncode}
    sample["flow_run_id"] = _flow_run_id(result.stdout)
    sample["ok"] = result.returncode == 0 and len(intervals) == n
    if not sample["ok"]:
        sample["error"] = (result.stderr or result.stdout)[-1500:]
    if intervals:
        sample["span"] = span(intervals)
        sample["efficiency"] = ideal / sample["span"] if len(intervals) == n else None
        sample["efficiency_end_to_end"] = ideal / wall if len(intervals) == n else None
        sample["max_at_once"] = max_at_once(intervals)
    return sample


def _flow_run_id(stdout: str) -> str | None:
    """From ``sierra-prefect run --json`` (one JSON document) or limit_flows (one line)."""
    for text in (stdout, (stdout.strip().splitlines() or [""])[-1]):
        try:
            return json.loads(text).get("flow_run_id")
        except (ValueError, AttributeError):
            continue
    return None

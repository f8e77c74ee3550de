"""2. Per-run overhead (and 6. memory, and 3b. a trigger right after): N runs of ``true``.

- ``ours``: ``sierra-prefect run sierra/local --max-parallel C`` on the warm stack.
  Milliseconds per run = wall time of the CLI / N (everything the user waits for), and
  inside the flow run = (flow run end - start) / N. The runs that succeeded are counted
  from the batch's ledger (``<scratch>/sierra-prefect/runs/*/done.json``), not from task
  runs or the CLI's summary.
- ``parallel``: GNU parallel on the same commands file, invoked as SIERRA's
  ``hpc.local`` invokes it (``--jobs C --results DIR --joblog LOG``, bash as the shell).

While ours runs, the memory of the server's process tree and of the worker side's
process trees (the worker; the warm engine with the flow-run process it forks; the runs)
is sampled: RSS every 0.1 s and PSS every 0.5 s; the peaks are item 6. RSS is summed per
process, so pages a forked flow-run process still shares with the warm engine count
twice (an upper bound); PSS counts them once. The pids come from
``sierra-prefect status --json``.

The moment ours's ``sierra-prefect run`` exits, a one-run batch is triggered (item 3's
measurement, without waiting for the server to be quiet): the trigger latency a user
sees when SIERRA starts its next stage 2 straight after a big one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks import trigger_latency
from benchmarks.common import (
    CLI,
    RssSampler,
    Stack,
    clean_env,
    done_markers,
    flow_run_timeline,
    log,
    prefect_api,
    run_cli,
    stack_memory_roots,
    wait_server_quiet,
    write_batch,
)


def measure(stack: Stack, work: Path, repeats: int, n: int, cap: int) -> dict:
    api_url = stack.api_url
    batch = write_batch(work / "overhead" / "batch", ["true"] * n)
    ours: list[dict] = []
    parallel: list[dict] = []
    rss: list[dict] = []
    after: list[dict] = []
    have_parallel = shutil.which("parallel") is not None
    for r in range(repeats):
        order = ("ours", "parallel") if r % 2 == 0 else ("parallel", "ours")
        for variant in order:
            wait_server_quiet(stack)
            if variant == "ours":
                case = work / f"overhead-{r}-ours"
                sample, peaks = run_batch(stack, api_url, batch, case / "scratch", n, cap)
                # Straight away: nothing between the batch's CLI exiting and this trigger.
                after.append(trigger_latency.one(stack, case / "trigger-after", api_url))
                add_flow_times(sample, api_url, stack.auth_string, n)
                ours.append(sample)
                rss.append(peaks)
                _log_ours(r, repeats, sample, peaks, after[-1])
            elif have_parallel:
                sample = _parallel(batch, work / f"overhead-{r}-parallel", n, cap)
                parallel.append(sample)
                log(f"overhead {r + 1}/{repeats} GNU parallel: {sample['ms_per_run']:.2f} ms/run "
                    f"({sample['wall']:.2f} s)")
            else:
                parallel.append({"ok": False, "error": "GNU parallel is not installed", "wall": None})
    return {"n": n, "cap": cap, "ours": ours, "parallel": parallel, "rss": rss,
            "trigger_after": after}


def _log_ours(r: int, repeats: int, sample: dict, peaks: dict, after: dict) -> None:
    log(f"overhead {r + 1}/{repeats} ours: {sample.get('ms_per_run', float('nan')):.2f} "
        f"ms/run ({sample['wall']:.2f} s), in flow "
        f"{sample.get('ms_per_run_in_flow') or float('nan'):.2f} ms/run; peak server "
        f"RSS {peaks['server_mib']:.0f} / PSS {peaks['server_pss_mib']:.0f} MiB, worker side "
        f"RSS {peaks['worker_mib']:.0f} / PSS {peaks['worker_pss_mib']:.0f} MiB; trigger right "
        f"after: {after.get('latency', float('nan')):.2f} s, ok {after['ok']}")


def run_batch(stack: Stack, api_url: str, batch: Path, scratch: Path, n: int, cap: int,
              timeout: float = 1800) -> tuple[dict, dict]:
    """``sierra-prefect run`` of ``batch`` with the memory sampled; the sample and the peaks.

    Returns as soon as the CLI has exited and the ledger is counted (no API calls)."""
    argv = [CLI, "run", "sierra/local", "--input-root", str(batch),
            "--scratch-root", str(scratch), "--max-parallel", str(cap),
            "--no-resume", "--json"]
    with RssSampler(stack_memory_roots(stack.pids), interval=0.1) as sampler:
        start = time.perf_counter()
        result = run_cli(argv, stack.env, timeout)
        wall = time.perf_counter() - start
    peaks = sampler.mib()
    done = done_markers(scratch)
    sample: dict = {"wall": wall, "exit_code": result.returncode, "runs_done": done}
    sample["ok"] = result.returncode == 0 and done == n
    if not sample["ok"]:
        sample["error"] = f"{done}/{n} runs done; " + (result.stderr or result.stdout)[-1500:]
        return sample, peaks
    sample["ms_per_run"] = wall / n * 1000
    try:
        sample["flow_run_id"] = json.loads(result.stdout)["flow_run_id"]
    except (ValueError, KeyError, TypeError):
        pass
    return sample, peaks


def add_flow_times(sample: dict, api_url: str, auth_string: str, n: int) -> None:
    """The flow run's own start to end, from its state history (after the batch: API calls)."""
    if not sample.get("flow_run_id"):
        return
    with prefect_api(api_url, auth_string) as client:
        tl = flow_run_timeline(client, sample["flow_run_id"])
    if "start_time" in tl and "end_time" in tl:
        sample["flow_seconds"] = tl["end_time"] - tl["start_time"]
        sample["ms_per_run_in_flow"] = sample["flow_seconds"] / n * 1000


def _parallel(batch: Path, case: Path, n: int, cap: int) -> dict:
    case.mkdir(parents=True, exist_ok=True)
    joblog = case / "parallel.log"
    env = clean_env()
    env["PARALLEL_SHELL"] = shutil.which("bash") or "/bin/sh"
    argv = ["parallel", "--jobs", str(cap), "--results", str(case / "results"),
            "--joblog", str(joblog), "--no-notice"]
    with open(batch / "commands.txt") as commands:
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, stdin=commands, capture_output=True, text=True,
                                timeout=1800)
        wall = time.perf_counter() - start
    lines = joblog.read_text().splitlines()[1:] if joblog.exists() else []
    ok_jobs = sum(1 for line in lines if line.split("\t")[6:7] == ["0"])
    sample = {"wall": wall, "exit_code": result.returncode, "ms_per_run": wall / n * 1000,
              "ok": result.returncode == 0 and ok_jobs == n}
    if not sample["ok"]:
        sample["error"] = f"{ok_jobs}/{n} jobs ok; {result.stderr[-1000:]}"
    return sample

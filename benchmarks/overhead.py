"""2. Per-run overhead (and 6. memory): N runs of ``true`` in one batch.

- ``ours``: ``sierra-prefect run sierra/local --max-parallel C`` on the warm stack.
  Milliseconds per run = wall time of the CLI / N (everything the user waits for), and
  inside the flow run = (flow run end - start) / N.
- ``parallel``: GNU parallel on the same commands file, invoked as SIERRA's
  ``hpc.local`` invokes it (``--jobs C --results DIR --joblog LOG``, bash as the shell).

While ours runs, the RSS of the server's process tree and of the worker side's process
trees (the worker; the warm engine with the flow-run process it forks; the runs) is
sampled every 0.1 s; the peaks are item 6. RSS is summed per process, so pages a forked
flow-run process still shares with the warm engine count twice: an upper bound. The pids
come from ``sierra-prefect status --json``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.common import (
    CLI,
    RssSampler,
    Stack,
    clean_env,
    flow_run_timeline,
    log,
    prefect_api,
    wait_server_quiet,
    write_batch,
)

MIB = 2**20


def measure(stack: Stack, work: Path, repeats: int, n: int, cap: int) -> dict:
    api_url = stack.api_url
    pids = stack.pids
    batch = write_batch(work / "overhead" / "batch", ["true"] * n)
    ours: list[dict] = []
    parallel: list[dict] = []
    rss: list[dict] = []
    have_parallel = shutil.which("parallel") is not None
    for r in range(repeats):
        order = ("ours", "parallel") if r % 2 == 0 else ("parallel", "ours")
        for variant in order:
            wait_server_quiet(stack)
            if variant == "ours":
                sample, peaks = _ours(stack, api_url, batch, work / f"overhead-{r}-ours", n, cap, pids)
                ours.append(sample)
                rss.append(peaks)
                log(f"overhead {r + 1}/{repeats} ours: {sample.get('ms_per_run', float('nan')):.2f} "
                    f"ms/run ({sample['wall']:.2f} s), in flow "
                    f"{sample.get('ms_per_run_in_flow') or float('nan'):.2f} ms/run; peak RSS server "
                    f"{peaks['server_mib']:.0f} MiB, worker {peaks['worker_mib']:.0f} MiB")
            elif have_parallel:
                sample = _parallel(batch, work / f"overhead-{r}-parallel", n, cap)
                parallel.append(sample)
                log(f"overhead {r + 1}/{repeats} GNU parallel: {sample['ms_per_run']:.2f} ms/run "
                    f"({sample['wall']:.2f} s)")
            else:
                parallel.append({"ok": False, "error": "GNU parallel is not installed", "wall": None})
    return {"n": n, "cap": cap, "ours": ours, "parallel": parallel, "rss": rss}


def _ours(stack: Stack, api_url: str, batch: Path, case: Path, n: int, cap: int,
          pids: dict) -> tuple[dict, dict]:
    argv = [CLI, "run", "sierra/local", "--input-root", str(batch),
            "--scratch-root", str(case / "scratch"), "--max-parallel", str(cap),
            "--no-resume", "--json"]
    roots = {"server": [pids["server"]] if pids.get("server") else [],
             "worker": [*(pids.get("workers") or []),
                        *([pids["warm_engine"]] if pids.get("warm_engine") else [])]}
    with RssSampler(roots, interval=0.1) as sampler:
        start = time.perf_counter()
        result = subprocess.run(argv, env=stack.env, capture_output=True, text=True,
                                timeout=1800, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - start
    peaks = {"server_mib": sampler.peaks["server"] / MIB,
             "worker_mib": sampler.peaks["worker"] / MIB, "samples": sampler.samples}
    sample: dict = {"wall": wall, "exit_code": result.returncode}
    try:
        summary = json.loads(result.stdout)
    except ValueError:
        summary = {}
    sample["ok"] = result.returncode == 0 and summary.get("succeeded") == n
    if not sample["ok"]:
        sample["error"] = (result.stderr or result.stdout)[-1500:]
        return sample, peaks
    sample["ms_per_run"] = wall / n * 1000
    with prefect_api(api_url) as client:
        tl = flow_run_timeline(client, summary["flow_run_id"])
    if "start_time" in tl and "end_time" in tl:
        sample["flow_seconds"] = tl["end_time"] - tl["start_time"]
        sample["ms_per_run_in_flow"] = sample["flow_seconds"] / n * 1000
    sample["flow_run_id"] = summary["flow_run_id"]
    return sample, peaks


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

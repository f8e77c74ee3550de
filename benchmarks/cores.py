"""8. CPU-bound runs of 2 busy processes each: cap by runs vs cores per run + pinning.

Every run of the batch starts two busy processes (the threads of a multi-threaded
simulation) that each do the same FIXED amount of work, a counted Python loop calibrated
once per measurement to take about ``work_seconds`` alone on an idle core, then waits for
both. The processes inherit the run's CPU affinity, as a simulation's threads would. The
same batch of N runs on the C usable CPUs of this host, three ways, on the warm stack:

- ``parallel``: the cap counts runs, as SIERRA's ``hpc.local`` does it (and as ours did
  before cores per run): GNU parallel ``--jobs C``, nothing pinned, so C runs = 2C busy
  processes share C CPUs.
- ``ours_1``: ``sierra-prefect run --max-parallel C --cores-per-run 1`` (the default):
  C runs at once, each pinned to its own single CPU, so a run's 2 processes share it.
- ``ours_2``: ``--max-parallel C --cores-per-run 2``: C // 2 runs at once, each pinned to
  its own 2 CPUs (``taskset``, ``OMP_NUM_THREADS=2``).

Each run writes its start and end (``date +%s.%N``, bash) and each busy process a JSON
line: its own start/end, CPU seconds, involuntary context switches (``getrusage``), the
CPUs it was allowed (``sched_getaffinity``) and ``OMP_NUM_THREADS``. From those: the span
of the batch, each run's duration, the most runs at once, the pairs of runs that ran
at the same time on a shared CPU, and each busy process's CPU share (CPU seconds / the
seconds it ran: 1.0 when it had a core to itself). The variants alternate within each repeat (the order
rotates), so ratios are taken pair by pair.

The total work is the same in every variant, so on C CPUs a batch of pure CPU loops
takes about the same span whichever way it is packed; what cores per run changes is
that no two busy processes of different runs share a core (no oversubscription: each
run takes its solo time, and takes it predictably).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

from benchmarks import overhead
from benchmarks.common import (
    CLI,
    Stack,
    log,
    max_at_once,
    read_intervals,
    run_cli,
    span,
    wait_server_quiet,
    write_batch,
)

VARIANTS = ("parallel", "ours_1", "ours_2")
THREADS_PER_RUN = 2

# One busy process: a counted loop (fixed work, not a fixed time), then what it saw.
# Run with ``python -S`` (no site: ~10 ms to start).
BUSY = """\
import json, os, resource, sys, time
n, out = int(sys.argv[1]), sys.argv[2]
start, cpu_start = time.time(), time.process_time()
x = 0
for i in range(n):
    x += i
end, cpu_loop = time.time(), time.process_time() - cpu_start
ru = resource.getrusage(resource.RUSAGE_SELF)
with open(out, "w") as f:
    json.dump({"start": start, "end": end, "cpu": ru.ru_utime + ru.ru_stime, "cpu_loop": cpu_loop,
               "nivcsw": ru.ru_nivcsw, "cpus": sorted(os.sched_getaffinity(0)),
               "omp": os.environ.get("OMP_NUM_THREADS")}, f)
"""


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def measure(stack: Stack, work: Path, repeats: int, n: int, work_seconds: float) -> dict:
    cpus = usable_cpus()
    root = work / "cores"
    root.mkdir(parents=True, exist_ok=True)
    busy = root / "busy.py"
    busy.write_text(BUSY)
    iterations, per_iteration = calibrate(busy, work_seconds)
    log(f"cores: {iterations:,} iterations per busy process (~{iterations * per_iteration:.2f} s "
        f"alone), {n} runs × {THREADS_PER_RUN} on {cpus} CPUs")
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    deadline = 300 + 4 * n * THREADS_PER_RUN * iterations * per_iteration
    for r in range(repeats):
        for variant in VARIANTS[r % 3:] + VARIANTS[: r % 3]:
            case = root / f"{r}-{variant}"
            stamps = case / "stamps"
            batch = write_batch(case / "batch", busy_commands(busy, stamps, n, iterations))
            quiet = wait_server_quiet(stack)
            if variant == "parallel" and not shutil.which("parallel"):
                sample = {"ok": False, "error": "GNU parallel is not installed", "wall": None}
            elif variant == "parallel":
                sample = overhead._parallel(batch, case, n, cpus)
            else:
                sample = _ours(stack, batch, case / "scratch", cpus, int(variant[-1]), deadline)
            sample.update(waited_for_quiet_server=quiet, **analyse(stamps, n))
            sample["ok"] = bool(sample["ok"] and sample["complete"])
            samples[variant].append(sample)
            log(f"cores {r + 1}/{repeats} {variant}: wall {sample['wall'] or float('nan'):.2f} s, span "
                f"{sample.get('span') or float('nan'):.2f} s, mean run "
                f"{sample.get('run_mean') or float('nan'):.2f} s, at once {sample.get('max_at_once')}, "
                f"CPUs per run {sample.get('cpus_per_run')}, shared-CPU pairs "
                f"{sample.get('shared_cpu_pairs')}, ok {sample['ok']}")
    return {"n": n, "cpus": cpus, "threads_per_run": THREADS_PER_RUN, "iterations": iterations,
            "work_seconds": iterations * per_iteration, "variants": samples}


def calibrate(busy: Path, seconds: float, probe: int = 2_000_000) -> tuple[int, float]:
    """Iterations for ``seconds`` of one busy process, and seconds per iteration (the best
    of 3 probes: the least disturbed). Fixed from then on for every variant and repeat."""
    best = None
    out = busy.with_name("calibration.json")
    for _ in range(3):
        subprocess.run([sys.executable, "-S", str(busy), str(probe), str(out)], check=True,
                       timeout=120, stdin=subprocess.DEVNULL)
        took = json.loads(out.read_text())
        elapsed = took["end"] - took["start"]
        best = elapsed if best is None else min(best, elapsed)
    per_iteration = max(best, 1e-6) / probe
    return max(1000, round(seconds / per_iteration)), per_iteration


def busy_commands(busy: Path, stamps: Path, n: int, iterations: int) -> list[str]:
    """Runs that stamp their start, start 2 busy processes, wait for both, stamp their end."""
    stamps.mkdir(parents=True, exist_ok=True)
    py, script = shlex.quote(sys.executable), shlex.quote(str(busy))
    commands = []
    for i in range(n):
        base = shlex.quote(str(stamps / f"r{i:05d}"))
        workers = " ".join(f"{py} -S {script} {iterations} {base}.w{t}.json &"
                           for t in range(THREADS_PER_RUN))
        commands.append(f"date +%s.%N > {base}.start; {workers} wait; date +%s.%N > {base}.end")
    return commands


def _ours(stack: Stack, batch: Path, scratch: Path, cpus: int, cores_per_run: int,
          timeout: float) -> dict:
    argv = [CLI, "run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch),
            "--max-parallel", str(cpus), "--cores-per-run", str(cores_per_run), "--no-resume",
            "--json"]
    start = time.perf_counter()
    result = run_cli(argv, stack.env, timeout)
    sample: dict = {"wall": time.perf_counter() - start, "exit_code": result.returncode,
                    "ok": result.returncode == 0}
    try:
        sample["cap"] = json.loads(result.stdout).get("max_parallel")
    except (ValueError, AttributeError):
        pass
    if not sample["ok"]:
        sample["error"] = (result.stderr or result.stdout)[-1500:]
    return sample


def _workers(stamps: Path) -> dict[str, list[dict]]:
    """Each run's busy processes' records: ``{"r00000": [{...}, {...}]}``."""
    found: dict[str, list[dict]] = {}
    for path in sorted(stamps.glob("r*.w*.json")):
        try:
            found.setdefault(path.name.split(".")[0], []).append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def analyse(stamps: Path, n: int) -> dict:
    """What the runs recorded: durations, overlap, CPUs, context switches."""
    intervals = read_intervals(stamps)  # sorted by run name, like _workers
    workers = _workers(stamps)
    complete = (len(intervals) == n and len(workers) == n
                and all(len(w) == THREADS_PER_RUN for w in workers.values()))
    out: dict = {"runs_finished": len(intervals), "complete": complete}
    if not complete:
        return out
    durations = [e - s for s, e in intervals]
    run_cpus = [frozenset(c for w in ws for c in w["cpus"]) for ws in workers.values()]
    procs = [w for ws in workers.values() for w in ws]
    out.update(
        span=span(intervals), run_mean=sum(durations) / n, run_min=min(durations),
        run_max=max(durations), max_at_once=max_at_once(intervals),
        cpus_per_run=sorted({len(c) for c in run_cpus}),
        shared_cpu_pairs=shared_cpu_pairs(intervals, run_cpus),
        nivcsw_per_run=sum(w["nivcsw"] for w in procs) / n,
        cpu_per_process=sum(w["cpu"] for w in procs) / len(procs),
        # The loop's CPU seconds / its seconds: 1.0 when a busy process had a core to itself.
        cpu_share=sum(w["cpu_loop"] / max(w["end"] - w["start"], 1e-9) for w in procs) / len(procs),
        omp=sorted({str(w["omp"]) for w in procs}),
    )
    return out


def shared_cpu_pairs(intervals: list[tuple[float, float]], run_cpus: list[frozenset]) -> int:
    """Pairs of runs that ran at the same time and were allowed a common CPU."""
    return sum(1 for (a, ca), (b, cb) in combinations(zip(intervals, run_cpus, strict=True), 2)
               if a[0] < b[1] and b[0] < a[1] and ca & cb)

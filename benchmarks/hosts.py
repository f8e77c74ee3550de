"""9. One batch over two worker hosts (``--spread 2``) against one host.

Hosts are network namespaces (tests/hosts_support.py): a server host with PostgreSQL and
``sierra-prefect up --host <address> --no-worker``, and two worker hosts each running a
stock ``prefect worker start --pool sierra-pool`` (Prefect's default poll,
``PREFECT_WORKER_QUERY_SECONDS`` = 10 s: the set-up of the issue's first try), confined
with ``taskset`` to CPU 0 (host A) and CPU 1 (host B), so each host runs one run at a
time (its flow runs' cap is its usable CPUs) and neither steals the other's CPU.

A batch of N runs of ``sleep 1`` is triggered on the server host, per repeat in
alternating order:

- ``one``: ``sierra-prefect run`` without ``--spread``: one flow run, on whichever host
  polls first, one run at a time (ideal N s);
- ``spread``: ``--spread 2``: children on both hosts share the runs through claims, the
  second host joining at its first poll (ideal N / 2 s plus that wait).

Figures: wall time of ``sierra-prefect run``; the time until the first run started (a
worker's poll and a flow run's cold start: luck of the 10 s poll, the same for both
variants on average); the span from the first run's start to the last run's end (what
spreading changes); and the runs each host did (from the summary).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.common import log, read_intervals, span, timed_commands, write_batch

VARIANTS = ("one", "spread")


def measure(work: Path, repeat: int, n: int, seconds: float = 1.0) -> dict:
    from tests.hosts_support import HostsLab
    from tests.netns_support import unavailable
    from tests.postgres_support import _skip_reason

    reason = unavailable() or _skip_reason()
    if reason:
        raise RuntimeError(f"hosts on a network cannot be made here: {reason}")
    root = work / "hosts"
    root.mkdir(parents=True, exist_ok=True)
    lab = HostsLab.start(root, ["a", "b"])
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        for host, cpu in (("a", "0"), ("b", "1")):
            lab.start_worker(host, cpus=cpu)
        for i in range(repeat):
            order = VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                samples[variant].append(_one_batch(lab, root / f"r{i}-{variant}", variant, n,
                                                   seconds))
    finally:
        lab.close()
    return {"n": n, "seconds": seconds, "variants": samples}


def _one_batch(lab, directory: Path, variant: str, n: int, seconds: float) -> dict:
    batch = directory / "batch"
    stamps = directory / "stamps"
    write_batch(batch, timed_commands(stamps, n, seconds))
    extra = ["--spread", "2"] if variant == "spread" else []
    started_at = time.time()
    started = time.monotonic()
    result = lab.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                     str(directory / "scratch"), "--json", *extra, timeout=600)
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{variant}: run exited {result.returncode}: {result.stderr[-2000:]}")
    summary = json.loads(result.stdout)
    if summary["succeeded"] != n:
        raise RuntimeError(f"{variant}: {summary['succeeded']} of {n} runs succeeded")
    intervals = read_intervals(stamps)
    first = min(s for s, _ in intervals) - started_at
    log(f"hosts {variant}: {n} runs in {wall:.1f} s (first run after {first:.1f} s, span "
        f"{span(intervals):.1f} s), per worker {summary['workers']}")
    return {"ok": True, "wall": round(wall, 2), "first_run": round(first, 2),
            "span": round(span(intervals), 2), "workers": summary["workers"]}

"""7. Scale: a big batch of ``true`` (20,000 at cap 4) next to a reference batch (2,000).

Both batches run on the warm stack with ``sierra-prefect run sierra/local`` (as item 2),
the reference first, each after the server is quiet. For each:

- it completes: the CLI exits 0 and the ledger holds one ``done.json`` per run
  (``<scratch>/sierra-prefect/runs/*/done.json``), within a deadline;
- the server answers API reads meanwhile: a thread reads the batch's flow run by id
  (``GET /api/flow_runs/{id}``, plain HTTP) every 0.2 s; until the flow run exists it reads
  the newest flow run (``POST /api/flow_runs/filter``, limit 1) instead. Every read is
  timed (a 10 s client timeout; a failed read counts with its time and as an error); the
  p99 is the figure;
- the server's log stays clean: the lines ``<SIERRA_PREFECT_HOME>/logs/server.log`` gained
  during the batch are counted, those with ``database is locked`` and those with
  ``ERROR`` or ``Traceback``;
- peak memory (RSS and PSS) of the server's and the worker side's process trees, as in
  item 6; the big batch's peaks over the reference's are the growth.

One repeat (the big batch alone takes minutes). Every loop is bounded: the batch by its
deadline, the reader by the batch's end and a cap on its number of reads.
"""

from __future__ import annotations

import base64
import math
import re
import time
from pathlib import Path

from benchmarks.common import Periodic, Stack, log, wait_server_quiet, write_batch
from benchmarks.overhead import add_flow_times, run_batch

READ_INTERVAL = 0.2
READ_TIMEOUT = 10.0
_LOCKED = "database is locked"
_ERROR = re.compile(r"\bERROR\b|Traceback")


def measure(stack: Stack, work: Path, n: int, reference_n: int, cap: int, timeout: float) -> dict:
    api_url = stack.api_url
    out: dict = {"n": n, "reference_n": reference_n, "cap": cap, "timeout": timeout}
    for key, size in (("reference", reference_n), ("big", n)):
        wait_server_quiet(stack)
        out[key] = _one(stack, api_url, work / f"scale-{key}", size, cap, timeout)
        s = out[key]
        log(f"scale {size:,} runs: ok {s['ok']} in {s['wall']:.1f} s "
            f"({s.get('ms_per_run') or float('nan'):.2f} ms/run); API reads p99 "
            f"{s['reads']['p99'] or float('nan'):.3f} s over {s['reads']['count']}, "
            f"{s['reads']['errors']} failed; server.log: {s['log']['locked']} locked, "
            f"{s['log']['errors']} ERROR/Traceback; peak PSS server "
            f"{s['memory']['server_pss_mib']:.0f} MiB, worker side {s['memory']['worker_pss_mib']:.0f} MiB")
    return out


def _one(stack: Stack, api_url: str, case: Path, n: int, cap: int, timeout: float) -> dict:
    batch = write_batch(case / "batch", ["true"] * n)
    server_log = stack.home / "logs" / "server.log"
    offset = _size(server_log)
    with ApiReader(api_url, stack.auth_string, since=time.time(),
                   max_reads=math.ceil(timeout / READ_INTERVAL) + 10) as reader:
        sample, peaks = run_batch(stack, api_url, batch, case / "scratch", n, cap, timeout=timeout)
    add_flow_times(sample, api_url, stack.auth_string, n)
    sample["memory"] = peaks
    sample["reads"] = reader.summary()
    sample["log"] = count_log_lines(server_log, offset)
    return sample


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def count_log_lines(path: Path, offset: int, examples: int = 5) -> dict:
    """Lines of ``path`` after byte ``offset`` (all of it if it shrank: rotated)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) >= offset:
                f.seek(offset)
            else:
                f.seek(0)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return {"lines": 0, "locked": 0, "errors": 0, "examples": [], "error": str(exc)}
    lines = text.splitlines()
    bad = [ln for ln in lines if _LOCKED in ln or _ERROR.search(ln)]
    return {"lines": len(lines), "locked": sum(1 for ln in lines if _LOCKED in ln),
            "errors": sum(1 for ln in lines if _ERROR.search(ln)),
            "examples": [ln[:300] for ln in bad[:examples]], "path": str(path)}


def p99(values: list[float]) -> float | None:
    """The nearest-rank 99th percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class ApiReader(Periodic):
    """Reads the newest flow run by id every READ_INTERVAL s on a thread, timing each read
    (at most ``max_reads`` reads, so the sampling is bounded whatever the batch does)."""

    def __init__(self, api_url: str, auth_string: str, since: float, max_reads: int) -> None:
        import httpx

        super().__init__(READ_INTERVAL, "api-reader")
        self.api_url = api_url.rstrip("/")
        self.since = since
        self.max_reads = max_reads
        self.flow_run_id: str | None = None
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.by_id = 0
        token = base64.b64encode(auth_string.encode()).decode()  # as Prefect's clients send it
        self._client = httpx.Client(timeout=READ_TIMEOUT, headers={"Authorization": f"Basic {token}"})

    def sample(self) -> None:
        if len(self.latencies) < self.max_reads:
            self._read(self._client)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._client.close()

    def _read(self, client) -> None:
        start = time.perf_counter()
        try:
            if self.flow_run_id:
                response = client.get(f"{self.api_url}/flow_runs/{self.flow_run_id}")
                response.raise_for_status()
                self.by_id += 1
            else:
                response = client.post(f"{self.api_url}/flow_runs/filter",
                                       json={"limit": 1, "sort": "EXPECTED_START_TIME_DESC"})
                response.raise_for_status()
                self._maybe_found(response.json())
        except Exception as exc:  # a failed read is a data point, not the end of the sampling
            self.errors.append(f"{exc.__class__.__name__}: {str(exc)[:200]}")
        self.latencies.append(time.perf_counter() - start)

    def _maybe_found(self, runs: list[dict]) -> None:
        from datetime import datetime

        for run in runs:
            created = datetime.fromisoformat(run["created"].replace("Z", "+00:00")).timestamp()
            if created >= self.since - 1.0:
                self.flow_run_id = run["id"]

    def summary(self) -> dict:
        lat = self.latencies
        return {"count": len(lat), "by_id": self.by_id, "errors": len(self.errors),
                "error_examples": self.errors[:5], "p99": p99(lat),
                "p50": sorted(lat)[len(lat) // 2] if lat else None,
                "max": max(lat) if lat else None, "flow_run_id": self.flow_run_id}

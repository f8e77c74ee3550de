#!/usr/bin/env python3
"""toysim: the "simulator" of the ``sptest.toysim`` SIERRA engine.

Usage::

    python3 toysim.py RUN_FILE.xml

Standard library only, so any ``python3`` can run it (the host, or a worker
container that has the SIERRA root mounted). SIERRA's stage 1 copies this file
into every experiment's input directory, next to the run files, and the
generated command lines point at that copy.

The run file (written by SIERRA from the project's ``toysim.xml`` template)
looks like::

    <toysim>
      <params value="2" steps="5" seed="1234" duration="0.0" threads="0" />
      <output dir="/abs/.../exp-outputs/c1-exp2/toysim_run0_output" leaf="output" />
    </toysim>

Effects, in order:

1. If ``<output dir>/toysim.fail`` exists, print a message to stderr and exit 3
   without writing any output (tests use this to make chosen runs fail). If
   ``<output dir>/toysim.fail-once`` exists, remove it, then do the same: the
   run fails once and succeeds when run again (tests of retries).
2. Spend ``duration`` seconds (the simulated work): asleep, or with
   ``threads`` > 0 in that many threads spinning busy loops (a multi-threaded
   simulator; ``--physics-n-threads`` of the engine).
3. Write ``<output dir>/<leaf>/data.csv`` (``step,value,noise``, ``steps`` rows,
   deterministic for a given seed), ``<output dir>/<leaf>/run.csv`` (one row:
   ``start,end,pid,host``, epoch seconds) and ``<output dir>/<leaf>/resources.json``:
   what the run was given, as the run itself saw it::

       {"start": ..., "end": ..., "pid": ..., "threads": N,
        "cpus_allowed_list": "2-3",        # /proc/self/status Cpus_allowed_list
        "cpus_allowed": [2, 3],            # the same, expanded
        "sched_getaffinity": [2, 3],       # os.sched_getaffinity(0)
        "thread_affinities": [[2, 3], ...],  # each busy thread's, from inside it
        "omp_num_threads": "2",            # $OMP_NUM_THREADS, or null
        "slurm_job_id": "12", "slurm_step_id": "0"}  # $SLURM_JOB_ID, $SLURM_STEP_ID, or null

   All are written to a temporary name and renamed, so a file that exists is
   complete.
"""

import csv
import json
import os
import pathlib
import random
import socket
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

FAIL_MARKER = "toysim.fail"
FAIL_ONCE_MARKER = "toysim.fail-once"


def _write_atomic(path: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_csv(path: pathlib.Path, header: list, rows: list) -> None:
    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)

    _write_atomic(path, write)


def _take(marker: pathlib.Path) -> bool:
    """Remove ``marker``; True if this call removed it."""
    try:
        marker.unlink()
    except FileNotFoundError:
        return False
    return True


def _cpus_allowed_list() -> str:
    """``Cpus_allowed_list`` of /proc/self/status (e.g. ``0-1,4``), "" if absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _expand(cpu_list: str) -> list:
    """``0-2,5`` -> [0, 1, 2, 5]."""
    cpus = []
    for part in filter(None, cpu_list.split(",")):
        low, _, high = part.partition("-")
        cpus += range(int(low), int(high or low) + 1)
    return cpus


def _affinity() -> list:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _spin(threads: int, seconds: float) -> list:
    """``threads`` threads busy for ``seconds``; each thread's affinity, read inside it."""
    until = time.monotonic() + seconds
    seen = [None] * threads

    def busy(k: int) -> None:
        seen[k] = _affinity()  # the calling thread's (pid 0)
        while time.monotonic() < until:
            pass

    workers = [threading.Thread(target=busy, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return seen


def main(argv: list) -> int:
    if len(argv) != 2:
        print("usage: toysim.py RUN_FILE.xml", file=sys.stderr)
        return 2

    start = time.time()
    root = ET.parse(argv[1]).getroot()
    params = root.find("params")
    output = root.find("output")
    if params is None or output is None or not output.get("dir"):
        print(f"toysim: {argv[1]}: missing <params> or <output dir=...>", file=sys.stderr)
        return 2

    value = float(params.get("value", "0"))
    steps = int(params.get("steps", "5"))
    seed = int(params.get("seed", "0"))
    duration = float(params.get("duration", "0"))
    threads = int(params.get("threads", "0"))

    run_dir = pathlib.Path(output.get("dir"))
    if (run_dir / FAIL_MARKER).exists():
        print(f"toysim: {run_dir / FAIL_MARKER} exists: failing on purpose", file=sys.stderr)
        return 3
    if _take(run_dir / FAIL_ONCE_MARKER):
        print(f"toysim: {run_dir / FAIL_ONCE_MARKER} was there: failing once on purpose",
              file=sys.stderr)
        return 3

    allowed = _cpus_allowed_list()
    affinity = _affinity()
    thread_affinities = []
    if threads > 0:
        thread_affinities = _spin(threads, duration)  # the simulated work itself
    elif duration > 0:
        time.sleep(duration)  # the simulated work itself

    out = run_dir / output.get("leaf", "output")
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    rows = [(step, value * step, round(rng.random(), 6)) for step in range(steps)]
    _write_csv(out / "data.csv", ["step", "value", "noise"], rows)
    _write_csv(
        out / "run.csv",
        ["start", "end", "pid", "host"],
        [(f"{start:.6f}", f"{time.time():.6f}", os.getpid(), socket.gethostname())],
    )
    resources = {
        "start": start,
        "end": time.time(),
        "pid": os.getpid(),
        "threads": threads,
        "cpus_allowed_list": allowed,
        "cpus_allowed": _expand(allowed),
        "sched_getaffinity": affinity,
        "thread_affinities": thread_affinities,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # Which SLURM job and step (if any) the run ran in: the allocation's worker's.
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_step_id": os.environ.get("SLURM_STEP_ID"),
    }
    _write_atomic(out / "resources.json", lambda f: json.dump(resources, f, indent=1))
    print(f"toysim: wrote {out / 'data.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

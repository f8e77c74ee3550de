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
      <params value="2" steps="5" seed="1234" duration="0.0" />
      <output dir="/abs/.../exp-outputs/c1-exp2/toysim_run0_output" leaf="output" />
    </toysim>

Effects, in order:

1. If ``<output dir>/toysim.fail`` exists, print a message to stderr and exit 3
   without writing any output (tests use this to make chosen runs fail).
2. Spend ``duration`` seconds (the simulated work).
3. Write ``<output dir>/<leaf>/data.csv`` (``step,value,noise``, ``steps`` rows,
   deterministic for a given seed) and ``<output dir>/<leaf>/run.csv`` (one row:
   ``start,end,pid,host``, epoch seconds). Both are written to a temporary name
   and renamed, so a file that exists is complete.
"""

import csv
import os
import pathlib
import random
import socket
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

FAIL_MARKER = "toysim.fail"


def _write_csv(path: pathlib.Path, header: list, rows: list) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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

    run_dir = pathlib.Path(output.get("dir"))
    if (run_dir / FAIL_MARKER).exists():
        print(f"toysim: {run_dir / FAIL_MARKER} exists: failing on purpose", file=sys.stderr)
        return 3

    if duration > 0:
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
    print(f"toysim: wrote {out / 'data.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

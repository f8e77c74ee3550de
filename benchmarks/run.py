"""The benchmark harness: one command, every measurement, BENCHMARKS.md and a plot.

    .venv/bin/python -m benchmarks.run [--smoke] [--repeat N] [--out BENCHMARKS.md]

Measures, in one run on this machine, side by side (see benchmarks/README.md):

1. concurrency (ours vs a tag-based and a global concurrency limit),
2. per-run overhead (ours vs GNU parallel),
3. trigger latency,
4. bring-up cold and warm,
5. SIERRA stage 2 end to end (prefectdeploy.local vs hpc.local vs prefectserver.local),
   per-batch and per-experiment,
6. peak memory of the server and the worker,
7. scale: a 20,000-run batch (API reads, server log, memory growth against 2,000 runs),
8. cores: CPU-bound runs of 2 busy processes each, cap by runs (GNU parallel) vs cores per
   run + pinning,
9. hosts: one batch over two worker hosts (network namespaces, ``--spread 2``) vs one host
   (needs root, iproute2 and PostgreSQL; not part of ``--smoke`` unless named in ``--only``).

Writes ``--out`` (default ``BENCHMARKS.md`` at the repository root), the plot at
``<out dir>/benchmarks/plot.png`` and the raw results as JSON under
``<out dir>/benchmarks/results/`` (a full run also as ``latest.json``, kept in the
repository so ``--render`` can rewrite the report). ``--smoke`` runs every measurement at tiny sizes
(one repeat) so the test suite can check that the harness still produces its table.
Exit status 0 iff every measurement ran (a missed target is not an error).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.common import Stack

# The cap every item gives both sides: 4, but never more than the usable CPUs, since our
# flow runs at most CPUs // cores-per-run at once (issue 10): comparing ours at 2 with GNU
# parallel or hpc.local at 4 on a 2-CPU machine would compare two different caps.
CAP = min(4, len(os.sched_getaffinity(0)))
FULL = dict(concurrency_n=64, concurrency_seconds=0.5, cap=CAP, overhead_n=2000,
            sierra_experiments=5, sierra_runs=4, sierra_duration=0.5, tag_deadline=600.0,
            scale_n=20000, scale_timeout=2400.0, cores_runs_per_cpu=4, cores_work=1.0,
            hosts_n=24)
SMOKE = dict(concurrency_n=8, concurrency_seconds=0.2, cap=2, overhead_n=20,
             sierra_experiments=2, sierra_runs=2, sierra_duration=0.0, tag_deadline=120.0,
             scale_n=200, scale_timeout=300.0, cores_runs_per_cpu=2, cores_work=0.1,
             hosts_n=4)
ITEMS = ("bringup", "concurrency", "trigger", "overhead", "sierra", "scale", "cores", "hosts")
# Left out of --smoke unless named in --only: it builds network namespaces and PostgreSQL.
NOT_IN_SMOKE = ("hosts",)

PROJECT = Path(__file__).resolve().parent.parent
NOTES = Path(__file__).resolve().parent / "NOTES.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for tests)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repeats per measurement (default 3, smoke 1)")
    parser.add_argument("--out", type=Path, default=PROJECT / "BENCHMARKS.md",
                        help="the markdown report to write (default: BENCHMARKS.md in the checkout)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="the PNG to write (default: <out dir>/benchmarks/plot.png)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {','.join(ITEMS)} (development; "
                        "bring-up is then not measured but a stack is still started)")
    parser.add_argument("--builtin", action=argparse.BooleanOptionalAction, default=None,
                        help="run SIERRA's built-in prefectserver.local column (default: yes, "
                        "but not with --smoke: it alone takes over a minute)")
    parser.add_argument("--scale-n", type=int, default=None, metavar="N",
                        help="runs in item 7's big batch (default 20,000; smoke 200)")
    parser.add_argument("--scale-timeout", type=float, default=None, metavar="SECONDS",
                        help="deadline of each of item 7's batches (default 2400; smoke 300)")
    parser.add_argument("--cores-n", type=int, default=None, metavar="N",
                        help="runs in item 8's batch (default 4 per usable CPU; smoke 2 per CPU)")
    parser.add_argument("--cores-work", type=float, default=None, metavar="SECONDS",
                        help="item 8: work of each busy process, calibrated to take about this "
                        "long alone on an idle core (default 1.0; smoke 0.1)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="parent of the temp work directory (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="measure nothing: write the report and plot from saved raw results")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.scale_n is not None and args.scale_n < 1:
        parser.error("--scale-n must be at least 1")
    if args.cores_n is not None and args.cores_n < 1:
        parser.error("--cores-n must be at least 1")
    if args.cores_work is not None and args.cores_work <= 0:
        parser.error("--cores-work must be above 0")
    default = [i for i in ITEMS if not (args.smoke and i in NOT_IN_SMOKE)]
    args.only = set(default if args.only is None else args.only.split(","))
    unknown = args.only - set(ITEMS)
    if unknown:
        parser.error(f"unknown items {', '.join(sorted(unknown))}: choose from {', '.join(ITEMS)}")
    return args


def _isolate_this_process(work: Path) -> None:
    """Prefect in this process (the client) must not touch ~/.prefect or any other server."""
    for key in list(os.environ):
        if key.startswith(("PREFECT_", "SIERRA_PREFECT_")):
            del os.environ[key]
    os.environ["PREFECT_HOME"] = str(work / "harness-prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def render(args: argparse.Namespace) -> int:
    from benchmarks import report

    results = json.loads(args.render.read_text())
    out = args.out.resolve()
    plot = (args.plot or out.parent / "benchmarks" / "plot.png").resolve()
    rows = report.build_rows(results)
    report.write_plot(results, rows, plot)
    report.write_markdown(results, rows, out, plot, NOTES)
    print(f"wrote {out} and {plot} from {args.render}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sierra-prefect-bench-", dir=args.workdir))
    _isolate_this_process(work)

    # SIGTERM ends the run like Ctrl-C does: through the finally that brings stacks down.
    signal.signal(signal.SIGTERM, _interrupt)

    from benchmarks import common
    from benchmarks.common import loadavg, log, machine_info

    common.WAIT_FOR_QUIET_SERVER = not args.smoke

    config = _config(args)
    started = time.time()
    results: dict = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config, "machine": machine_info(), "load_before": loadavg(),
        "work_dir": str(work), "errors": [],
    }
    log(f"work dir {work}; config {config}")
    stacks: list[Stack] = []
    try:
        stack = _bring_up(args.only, work, config["repeat"], stacks, results)
        _measure(_jobs(stack, work, config), args.only, stack, results, smoke=args.smoke)
    finally:
        _bring_down(stacks, results)
        results["load_after"] = loadavg()
        results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        results["elapsed_seconds"] = time.time() - started

    _write_report(args, results)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    for e in results["errors"]:
        log(f"error: {e}")
    return 1 if results["errors"] else 0


def _sizes(args: argparse.Namespace) -> dict:
    return SMOKE if args.smoke else FULL


def _config(args: argparse.Namespace) -> dict:
    """The sizes and options this run measures with (recorded in the raw results)."""
    repeat = args.repeat or (1 if args.smoke else 3)
    builtin = (not args.smoke) if args.builtin is None else args.builtin
    sizes = dict(_sizes(args))
    if args.scale_n is not None:
        sizes["scale_n"] = args.scale_n
    if args.scale_timeout is not None:
        sizes["scale_timeout"] = args.scale_timeout
    if args.cores_work is not None:
        sizes["cores_work"] = args.cores_work
    sizes["cores_n"] = args.cores_n or sizes["cores_runs_per_cpu"] * len(os.sched_getaffinity(0))
    return {**sizes, "smoke": args.smoke, "repeat": repeat, "items": sorted(args.only),
            "builtin": builtin}


def _attempt(item: str, fn: Callable[[], dict], only: set[str], stack: Stack | None,
             results: dict) -> None:
    """Measure ``item`` into ``results[item]``; a failure is recorded in ``results["errors"]``."""
    from benchmarks.common import loadavg, log

    if item not in only:
        return
    if item != "bringup" and stack is None:
        results["errors"].append(f"{item}: not measured, no stack is up")
        return
    t = time.monotonic()
    load_before = loadavg()
    try:
        results[item] = fn()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one failed item must not hide the others
        tail = "".join(traceback.format_exception(exc)).strip().splitlines()[-6:]
        results["errors"].append(f"{item}: {exc.__class__.__name__}: {str(exc)[:500]}")
        log(f"{item} FAILED:\n" + "\n".join(tail))
    results.setdefault("item_load", {})[item] = {
        "before": load_before, "after": loadavg(), "seconds": round(time.monotonic() - t)}
    log(f"{item} took {time.monotonic() - t:.0f} s")


def _bring_up(only: set[str], work: Path, repeat: int, stacks: list[Stack],
              results: dict) -> Stack | None:
    """The stack the measurements run against, or None if it is not up.

    Measures bring-up if asked to (its last stack stays up); otherwise just starts one.
    Every stack started is appended to ``stacks``, for the caller to bring down.
    """
    from benchmarks import bringup
    from benchmarks.common import Stack

    stack: Stack | None = None
    if "bringup" in only:
        def do_bringup():
            nonlocal stack
            samples, stack = bringup.measure(work, repeat, stacks)
            return samples

        _attempt("bringup", do_bringup, only, stack, results)
    else:
        stack = Stack(work / "stack" / "home")
        stacks.append(stack)
        stack.up()
        stack.require_ready()
    if stack is not None and not stack.is_up:
        return None
    return stack


def _jobs(stack: Stack | None, work: Path, config: dict) -> list[tuple[str, Callable[[], dict]]]:
    """The measurements after bring-up, in the order a real run takes them."""
    from benchmarks import concurrency, cores, hosts, overhead, scale, sierra_e2e, trigger_latency

    c = config
    return [
        ("concurrency", lambda: concurrency.measure(
            stack, work, c["repeat"], c["concurrency_n"], c["concurrency_seconds"], c["cap"],
            c["tag_deadline"])),
        ("trigger", lambda: trigger_latency.measure(stack, work, c["repeat"])),
        ("overhead", lambda: overhead.measure(stack, work, c["repeat"], c["overhead_n"], c["cap"])),
        ("sierra", lambda: sierra_e2e.measure(
            stack, work, c["repeat"], c["sierra_experiments"], c["sierra_runs"],
            c["sierra_duration"], c["cap"], builtin=c["builtin"])),
        # Before scale: its 20,000 runs leave the server with a much bigger database.
        ("cores", lambda: cores.measure(stack, work, c["repeat"], c["cores_n"], c["cores_work"])),
        ("scale", lambda: scale.measure(stack, work, c["scale_n"], c["overhead_n"], c["cap"],
                                        c["scale_timeout"])),
        ("hosts", lambda: hosts.measure(work, c["repeat"], c["hosts_n"])),
    ]


def _measure(jobs: list[tuple[str, Callable[[], dict]]], only: set[str], stack: Stack | None,
             results: dict, smoke: bool) -> None:
    if smoke:
        # Smoke figures are meaningless anyway: run the measurements at the same
        # time, so the test suite pays for the slowest one, not for all of them.
        # A real run measures one thing at a time.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            for future in [pool.submit(_attempt, item, fn, only, stack, results) for item, fn in jobs]:
                future.result()
    else:
        for item, fn in jobs:
            _attempt(item, fn, only, stack, results)


def _bring_down(stacks: list[Stack], results: dict) -> None:
    for s in stacks:
        try:
            s.down()
        except Exception as exc:  # bring the others down all the same
            results["errors"].append(f"down {s.home}: {exc}")


def _write_report(args: argparse.Namespace, results: dict) -> None:
    """The raw results as JSON, the plot and the markdown report."""
    from benchmarks import report
    from benchmarks.common import log

    out = args.out.resolve()
    plot = (args.plot or out.parent / "benchmarks" / "plot.png").resolve()
    raw_dir = out.parent / "benchmarks" / "results"
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw = raw_dir / f"results-{time.strftime('%Y%m%d-%H%M%S')}{'-smoke' if args.smoke else ''}.json"
    raw.write_text(json.dumps(results, indent=2, default=str))
    if not args.smoke and set(results["config"]["items"]) == set(ITEMS):
        # Kept in the repository (see .gitignore): `--render` rewrites the report from it.
        (raw_dir / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    rows = report.build_rows(results)
    try:
        report.write_plot(results, rows, plot)
    except Exception as exc:  # the table is still worth writing
        results["errors"].append(f"plot: {exc.__class__.__name__}: {exc}")
        plot = None
    report.write_markdown(results, rows, out, plot, NOTES)
    log(f"wrote {out}, {plot}, {raw} in {results['elapsed_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())

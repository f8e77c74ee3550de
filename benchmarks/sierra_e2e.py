"""5. A SIERRA batch end to end: stage 2 of one toysim batch, three execution environments.

Stage 1 runs once per paradigm of the engine (``sptest.toysim`` engine,
``sptest.toyproj`` project from ``tests/sierra_engine``, E experiments x R runs, each run
simulating D seconds of work): ``per-batch`` (one ``commands.txt`` for the whole batch:
one stage-2 trigger) and ``per-exp`` (one per experiment: SIERRA runs them one after the
other, so ours triggers E times). Its output does not depend on the execution
environment. Then, in every repeat and in rotating order, stage 2 runs on that same
batch with (the built-in environment on the per-batch batch only):

- ``ours``: ``--execenv prefectdeploy.local`` (our plugin: ``sierra-prefect check`` then
  ``sierra-prefect run sierra/local``) against the warm stack;
- ``hpc``: ``--execenv hpc.local`` (SIERRA's GNU parallel environment);
- ``builtin``: ``--execenv prefectserver.local`` (SIERRA's own Prefect environment: it
  starts ``prefect server start &`` on port 4200, sleeps 10 s, creates a pool, starts a
  worker, deploys its flow, runs it and ends with ``killall prefect``).

All three get ``--exec-jobs-per-node C``. The measured time is the wall time of the
SIERRA process for stage 2 (what a user waits for); every output file must exist
afterwards (they are deleted before each run), and each run's ``run.csv`` gives the
span of the runs and the most that ran at once.

The built-in environment runs in its own ``PREFECT_HOME`` (its database created
beforehand with ``prefect server database upgrade``, as for anyone who has used
Prefect before; not timed), with a ``PATH`` whose first entry holds a ``killall``
that only logs its arguments. Preferably it runs in a private network namespace
(``unshare --net``, loopback only), so its fixed port 4200 can never collide with
anything else on the machine; without one it runs only if 127.0.0.1:4200 is free and
is skipped otherwise. The processes it leaves running (its server and worker) are
found by pid, as descendants of the SIERRA process (watched while it runs) or members
of its session, and stopped by pid with their start times checked: nothing by name.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    BIN,
    PROJECT,
    Stack,
    TreeWatcher,
    clean_env,
    log,
    max_at_once,
    run_cmd,
    stop_processes,
    wait_server_quiet,
)

VARIANTS = ("ours", "hpc", "builtin")
PARADIGMS = ("per-batch", "per-exp")
# The built-in environment is measured on the per-batch batch only (its fixed cost, a
# server start per stage 2, is the same whatever the paradigm).
PARADIGM_VARIANTS = {"per-batch": VARIANTS, "per-exp": ("ours", "hpc")}
EXECENV = {"ours": "prefectdeploy.local", "hpc": "hpc.local", "builtin": "prefectserver.local"}
BUILTIN_PORT = 4200

KILLALL = """#!/bin/sh
# Stands in for killall during the benchmark: logs, kills nothing.
echo "$(date +%s.%N) killall $*" >> "${BENCH_KILLALL_LOG:-/dev/null}"
exit 0
"""


def _support():
    """tests/sierra_support.py: how the test suite drives SIERRA (imported lazily)."""
    import sys

    if str(PROJECT) not in sys.path:
        sys.path.insert(0, str(PROJECT))
    from tests import sierra_support

    return sierra_support


def netns_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        result = subprocess.run(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up"],
            capture_output=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def measure(stack: Stack, work: Path, repeats: int, n_experiments: int, n_runs: int,
            duration: float, cap: int, builtin: bool = True, timeout: float = 600) -> dict:
    ss = _support()
    common = ["--exec-jobs-per-node", str(cap)]
    sizes = dict(n_runs=n_runs, n_experiments=n_experiments)
    batches = {p: _Batch.prepare(ss, work / "sierra" / p, p, sizes, duration, common, timeout)
               for p in PARADIGMS}
    mode, why = _builtin_mode(builtin)
    builtin_env = _prepare_builtin(work / "sierra" / "builtin", ss) if mode != "skipped" else None

    samples = {p: {v: [] for v in PARADIGM_VARIANTS[p]} for p in PARADIGMS}
    for r in range(repeats):
        for paradigm, b in batches.items():
            variants = PARADIGM_VARIANTS[paradigm]
            for variant in variants[r % len(variants):] + variants[: r % len(variants)]:
                skipped = _builtin_skip_reason(variant, mode, why)
                if skipped:
                    samples[paradigm][variant].append({"ok": False, "skipped": skipped, "wall": None})
                    continue
                argv = ss.sierra_argv(b.root, execenv=EXECENV[variant], paradigm=paradigm,
                                      stages=(2,), extra_args=common, **sizes)
                argv, env = _variant_command(ss, variant, argv, stack, builtin_env, mode)
                log_path = b.root.parent / f"stage2-{r}-{variant}.log"
                sample = _measure_stage2(stack, argv, env, b.root.parent, log_path, timeout,
                                         b.outputs, b.run_csvs, watch=(variant == "builtin"))
                samples[paradigm][variant].append(sample)
                _log_sample(r, repeats, paradigm, variant, sample)
    return {
        "n_experiments": n_experiments, "n_runs": n_runs, "duration": duration, "cap": cap,
        "stage1_seconds": batches["per-batch"].stage1_seconds, "builtin_mode": mode,
        "builtin_why": why, "variants": samples["per-batch"],
        "per_exp": {"stage1_seconds": batches["per-exp"].stage1_seconds,
                    "variants": samples["per-exp"]},
    }


@dataclass
class _Batch:
    """One stage-1 batch (one paradigm) that stage 2 then runs again and again."""

    root: Path
    outputs: list[Path]
    run_csvs: list[Path]
    stage1_seconds: float

    @classmethod
    def prepare(cls, ss, base: Path, paradigm: str, sizes: dict, duration: float,
                common: list[str], timeout: float) -> _Batch:
        root = base / "sierra-root"
        root.parent.mkdir(parents=True, exist_ok=True)
        stage1 = _run_stage1(ss, root, base, paradigm, sizes, duration, common, timeout)
        outputs = ss.expected_outputs(ss.find_batch_root(root))
        log(f"SIERRA stage 1 ({paradigm}): {len(outputs)} runs in {stage1.elapsed:.1f} s")
        return cls(root, outputs, [o.with_name("run.csv") for o in outputs], stage1.elapsed)


def _log_sample(r: int, repeats: int, paradigm: str, variant: str, sample: dict) -> None:
    log(f"SIERRA {r + 1}/{repeats} {EXECENV[variant]} ({paradigm}): stage 2 "
        f"{sample['wall'] or float('nan'):.2f} s, ok {sample['ok']} "
        f"({sample['missing_outputs']} outputs missing, most at once "
        f"{sample.get('runs_max_at_once')})"
        + (f", stopped {len(sample.get('stopped', []))} leftover processes"
           if variant == "builtin" else ""))


def _run_stage1(ss, root: Path, base: Path, paradigm: str, sizes: dict, duration: float,
                common: list[str], timeout: float):
    """Stage 1, once per paradigm: the batch the execution environments run."""
    stage1 = ss.run_sierra(
        root, execenv="hpc.local", paradigm=paradigm, stages=(1,), **sizes,
        extra_args=[*common, "--toysim-duration", str(duration)],
        env=ss.sierra_env(base=clean_env()), log_path=base / "stage1.log",
        timeout=timeout,
    )
    if stage1.returncode != 0:
        raise RuntimeError(f"SIERRA stage 1 failed (see {stage1.log_path}): {ss.log_tail(stage1, 15)}")
    return stage1


def _builtin_mode(builtin: bool) -> tuple[str, str]:
    """How the built-in environment runs (netns, host or skipped), and why."""
    if not builtin:
        return "skipped", "not requested (the default with --smoke; --builtin runs it)"
    if netns_available():
        return "netns", "own network namespace (loopback only)"
    if port_free(BUILTIN_PORT):
        return "host", f"host network, 127.0.0.1:{BUILTIN_PORT} was free"
    return "skipped", (f"127.0.0.1:{BUILTIN_PORT} is taken by another program "
                       "and no network namespace is available")


def _builtin_skip_reason(variant: str, mode: str, why: str) -> str | None:
    """Why this repeat of ``variant`` is not run, or None if it runs."""
    if variant != "builtin":
        return None
    if mode == "skipped":
        return why
    if mode == "host" and not port_free(BUILTIN_PORT):
        return f"127.0.0.1:{BUILTIN_PORT} became taken"
    return None


def _variant_command(ss, variant: str, argv: list[str], stack: Stack, builtin_env: dict | None,
                     mode: str) -> tuple[list[str], dict]:
    """The argv and environment stage 2 runs with in ``variant``."""
    if variant == "ours":
        return argv, ss.sierra_env(base=stack.env)
    if variant == "hpc":
        return argv, ss.sierra_env(base=clean_env())
    if mode == "netns":
        argv = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
    return argv, builtin_env


def _measure_stage2(stack: Stack, argv: list[str], env: dict, cwd: Path, log_path: Path,
                    timeout: float, outputs: list[Path], run_csvs: list[Path], watch: bool) -> dict:
    """One timed stage 2 on a batch with no outputs, then which outputs it wrote and when."""
    for path in (*outputs, *run_csvs):
        path.unlink(missing_ok=True)
    wait_server_quiet(stack)
    sample = _stage2(argv, env, cwd, log_path, timeout, watch=watch)
    missing = [p for p in outputs if not p.is_file()]
    sample["missing_outputs"] = len(missing)
    sample["ok"] = sample["exit_code"] == 0 and not missing
    intervals = _run_intervals(run_csvs)
    if intervals:
        sample["runs_span"] = max(e for _, e in intervals) - min(s for s, _ in intervals)
        sample["runs_max_at_once"] = max_at_once(intervals)
    return sample


def _prepare_builtin(base: Path, ss) -> dict:
    """PREFECT_HOME with a migrated database, a logging ``killall`` first on PATH."""
    fake_bin = base / "bin"
    fake_bin.mkdir(parents=True, exist_ok=True)
    killall = fake_bin / "killall"
    killall.write_text(KILLALL)
    killall.chmod(0o755)
    env = ss.sierra_env(base=clean_env())
    env.update(
        PREFECT_HOME=str(base / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        BENCH_KILLALL_LOG=str(base / "killall.log"),
    )
    env["PATH"] = os.pathsep.join([str(fake_bin), env["PATH"]])
    run_cmd([str(BIN / "prefect"), "server", "database", "upgrade", "-y"], env, timeout=300,
            what="prefect server database upgrade")
    return env


def _stage2(argv: list[str], env: dict, cwd: Path, log_path: Path, timeout: float,
            watch: bool) -> dict:
    """Run one SIERRA stage 2; with ``watch``, stop (by pid) whatever it leaves running.

    Whatever happens (a timeout, Ctrl-C), the SIERRA process and the processes of its
    session are stopped before this returns or raises: nothing it started outlives it.
    """
    sample: dict = {"wall": None, "exit_code": None, "log": str(log_path)}
    with open(log_path, "w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    watcher = TreeWatcher(proc.pid)
    finished = False
    try:
        if watch:
            watcher.__enter__()
        try:
            sample["exit_code"] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            sample["error"] = f"SIERRA stage 2 did not finish within {timeout:.0f} s"
        sample["wall"] = time.perf_counter() - start
        finished = True
    finally:
        if watch:
            watcher.__exit__(None, None, None)
        if proc.poll() is None:  # timed out or interrupted: SIERRA itself goes too
            found = watcher.leftovers()
            proc.kill()
            proc.wait()
            stop_processes(found)
        if watch or not finished:
            leftovers = watcher.leftovers()
            sample["leftovers"] = [f"{f.pid}: {f.cmdline}" for f in leftovers]
            sample["stopped"] = stop_processes(leftovers)
    return sample


def _run_intervals(run_csvs: list[Path]) -> list[tuple[float, float]]:
    intervals = []
    for path in run_csvs:
        try:
            with open(path, newline="") as f:
                row = next(csv.DictReader(f))
            intervals.append((float(row["start"]), float(row["end"])))
        except (OSError, StopIteration, KeyError, ValueError):
            continue
    return intervals

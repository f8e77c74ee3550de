"""Helpers for tests that drive real SIERRA (sierra-research) end to end.

SIERRA runs the test-only ``sptest.toysim`` engine and ``sptest.toyproj``
project from ``tests/sierra_engine``; the ``prefectdeploy.*`` execution
environments come from ``sierra_plugins``. Both folders are put on
``SIERRA_PLUGIN_PATH`` by :func:`sierra_env`.

A batch is ``--batch-criteria toyparam.C<n_experiments>`` with ``--n-runs
<n_runs>``; every run writes ``<run output dir>/output/data.csv`` (and
``run.csv``: start, end, pid, host; ``resources.json``: its CPUs and
``OMP_NUM_THREADS`` as it saw them, read by :func:`run_resources`). The equivalent command line (what
:func:`sierra_argv` builds)::

    SIERRA_PLUGIN_PATH=<repo>/sierra_plugins:<repo>/tests/sierra_engine \\
    python -m sierra.main --skip-pkg-checks \\
        --project sptest.toyproj --engine sptest.toysim --execenv hpc.local \\
        --expdef expdef.xml \\
        --expdef-template <repo>/tests/sierra_engine/sptest/toyproj/exp/toysim.xml \\
        --sierra-root ROOT --controller toy.default --scenario basic \\
        --batch-criteria toyparam.C3 --n-runs 2 --pipeline 1 2 \\
        --toysim-paradigm per-batch

``python -m sierra.main`` works for every sierra-research version (1.5.8 only
ships the ``sierra-cli`` script, 1.5.16 ``sierra`` and ``sierra-cli``).

Everything here has a deadline; nothing sleeps to synchronise and nothing is
killed by name (a timed-out SIERRA is stopped by its own process group id).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFECT_PLUGIN_PATH = REPO / "sierra_plugins"
ENGINE_PLUGIN_PATH = REPO / "tests" / "sierra_engine"
TEMPLATE = ENGINE_PLUGIN_PATH / "sptest" / "toyproj" / "exp" / "toysim.xml"

PROJECT = "sptest.toyproj"
ENGINE = "sptest.toysim"
CONTROLLER = "toy.default"
SCENARIO = "basic"
PARADIGMS = ("per-batch", "per-exp")
OUTPUT_FILE = "data.csv"
FAIL_MARKER = "toysim.fail"  # in a run's output dir: toysim fails that run (exit 3)
FAIL_ONCE_MARKER = "toysim.fail-once"  # the same, once: toysim removes it as it fails
RESOURCES_FILE = "resources.json"  # per run: its CPUs, OMP_NUM_THREADS, start, end

DEFAULT_TIMEOUT = 300.0  # seconds for one SIERRA invocation
_KILL_GRACE = 10.0


def sierra_env(
    base: Mapping[str, str] | None = None,
    python: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for SIERRA: plugin path set, the interpreter's bin dir first on PATH.

    The bin dir comes first so that ``sierra-prefect`` and ``python3`` resolve
    to the venv running the tests even when it is not activated.
    """
    env = dict(os.environ if base is None else base)
    env["SIERRA_PLUGIN_PATH"] = os.pathsep.join(
        [str(PREFECT_PLUGIN_PATH), str(ENGINE_PLUGIN_PATH)]
    )
    bindir = str(Path(python or sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def sierra_argv(
    sierra_root: Path,
    *,
    execenv: str = "hpc.local",
    paradigm: str = "per-batch",
    n_runs: int = 2,
    n_experiments: int = 3,
    stages: Sequence[int] = (1, 2),
    extra_args: Sequence[str] = (),
    python: str | None = None,
    log_level: str = "INFO",
    skip_pkg_checks: bool = True,
) -> list[str]:
    """The SIERRA command line for one toysim batch."""
    if paradigm not in PARADIGMS:
        raise ValueError(f"paradigm must be one of {PARADIGMS}, not {paradigm!r}")
    argv = [python or sys.executable, "-m", "sierra.main", "--log-level", log_level]
    if skip_pkg_checks:
        argv.append("--skip-pkg-checks")
    argv += [
        "--project", PROJECT,
        "--engine", ENGINE,
        "--execenv", execenv,
        "--expdef", "expdef.xml",
        "--expdef-template", str(TEMPLATE),
        "--sierra-root", str(sierra_root),
        "--controller", CONTROLLER,
        "--scenario", SCENARIO,
        "--batch-criteria", f"toyparam.C{int(n_experiments)}",
        "--n-runs", str(int(n_runs)),
        "--pipeline", *[str(s) for s in stages],
        "--toysim-paradigm", paradigm,
    ]  # fmt: skip
    argv += list(extra_args)
    return argv


def run_sierra(
    sierra_root: Path,
    *,
    execenv: str = "hpc.local",
    paradigm: str = "per-batch",
    n_runs: int = 2,
    n_experiments: int = 3,
    stages: Sequence[int] = (1, 2),
    extra_args: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    python: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run SIERRA once with a deadline; return its CompletedProcess.

    stdout and stderr go (interleaved) to ``log_path`` (default
    ``<sierra_root>/../sierra-<stages>.log``); ``result.stdout`` holds the same
    text and ``result.log_path`` / ``result.elapsed`` (seconds, wall) are set
    too. ``env`` defaults to :func:`sierra_env`. On timeout SIERRA's whole
    process group (it is started in a new session) gets SIGTERM, then SIGKILL
    after a grace period, and ``subprocess.TimeoutExpired`` is raised with the
    log text as ``output``.
    """
    sierra_root = Path(sierra_root)
    sierra_root.parent.mkdir(parents=True, exist_ok=True)
    argv = sierra_argv(
        sierra_root,
        execenv=execenv,
        paradigm=paradigm,
        n_runs=n_runs,
        n_experiments=n_experiments,
        stages=stages,
        extra_args=extra_args,
        python=python,
    )
    if log_path is None:
        tag = "".join(str(s) for s in stages)
        log_path = sierra_root.parent / f"sierra-stage{tag}.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    run_env = dict(env) if env is not None else sierra_env(python=python)
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=run_env,
            cwd=str(cwd or sierra_root.parent),
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            text = log_path.read_text(encoding="utf-8", errors="replace")
            raise subprocess.TimeoutExpired(argv, timeout, output=text) from None
    elapsed = time.monotonic() - start

    text = log_path.read_text(encoding="utf-8", errors="replace")
    result = subprocess.CompletedProcess(argv, returncode, stdout=text, stderr=None)
    result.log_path = log_path  # type: ignore[attr-defined]
    result.elapsed = elapsed  # type: ignore[attr-defined]
    return result


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the process group we started (by its id), TERM then KILL."""
    for sig, grace in ((signal.SIGTERM, _KILL_GRACE), (signal.SIGKILL, _KILL_GRACE)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(result: subprocess.CompletedProcess, lines: int = 40) -> str:
    """The last lines of a run's output, for assertion messages."""
    text = result.stdout or ""
    return "\n".join(text.splitlines()[-lines:])


def expected_batch_root(sierra_root: Path, n_experiments: int = 3) -> Path:
    """Where SIERRA puts the batch (it resolves --sierra-root)."""
    return (
        Path(sierra_root).resolve()
        / PROJECT
        / CONTROLLER
        / SCENARIO
        / f"{TEMPLATE.stem}-toyparam.C{int(n_experiments)}"
    )


def find_batch_root(sierra_root: Path) -> Path:
    """The one batch root under ``sierra_root`` (asserts there is exactly one)."""
    found = sorted(Path(sierra_root).resolve().glob(f"{PROJECT}/*/*/{TEMPLATE.stem}-*"))
    assert len(found) == 1, f"expected one batch root under {sierra_root}, found {found}"
    return found[0]


def exp_input_roots(batch_root: Path) -> list[Path]:
    """Experiment input directories (``exp-inputs/c1-exp<i>``), in experiment order."""
    roots = [p for p in (Path(batch_root) / "exp-inputs").iterdir() if p.is_dir()]
    return sorted(roots, key=lambda p: _natural_key(p.name))


def run_files(batch_root: Path) -> list[Path]:
    """Every run's input file (``exp-inputs/*/toysim_run<k>.xml``), in order."""
    files: list[Path] = []
    for exp in exp_input_roots(batch_root):
        files += sorted(
            exp.glob(f"{TEMPLATE.stem}_run*.xml"), key=lambda p: _natural_key(p.name)
        )
    return files


def run_output_dir(run_file: Path) -> Path:
    """The output directory a run file tells toysim to use."""
    out = ET.parse(run_file).getroot().find("output")
    assert out is not None and out.get("dir"), f"{run_file} has no <output dir=...>"
    return Path(out.get("dir"))


def expected_outputs(batch_root: Path, name: str = OUTPUT_FILE) -> list[Path]:
    """The CSV file every run of the batch writes on success, in run order."""
    files = []
    for run_file in run_files(batch_root):
        out = ET.parse(run_file).getroot().find("output")
        assert out is not None and out.get("dir"), f"{run_file} has no <output dir=...>"
        files.append(Path(out.get("dir")) / out.get("leaf", "output") / name)
    return files


def missing_outputs(batch_root: Path) -> list[Path]:
    return [p for p in expected_outputs(batch_root) if not p.is_file()]


def commands_files(batch_root: Path) -> list[Path]:
    """The commands.txt files stage 1 wrote (one per batch or one per experiment)."""
    top = Path(batch_root) / "commands.txt"
    if top.is_file():
        return [top]
    return [e / "commands.txt" for e in exp_input_roots(batch_root) if (e / "commands.txt").is_file()]


def command_lines(batch_root: Path) -> list[str]:
    lines: list[str] = []
    for f in commands_files(batch_root):
        lines += [ln for ln in f.read_text().splitlines() if ln.strip()]
    return lines


def make_run_fail(run_file: Path) -> Path:
    """Make toysim fail this run (until the marker is removed); return the marker."""
    marker = run_output_dir(run_file) / FAIL_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("fail on purpose\n")
    return marker


def make_run_fail_once(run_file: Path) -> Path:
    """Make toysim fail this run's next attempt only; return the marker (gone once used)."""
    marker = run_output_dir(run_file) / FAIL_ONCE_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("fail once on purpose\n")
    return marker


def run_resources(batch_root: Path) -> list[dict]:
    """Each run's ``resources.json`` (what toysim saw: CPUs, OMP_NUM_THREADS, start, end),
    in run order, with ``run`` (the run file's path) added."""
    paths = expected_outputs(batch_root, RESOURCES_FILE)
    return [
        {**json.loads(path.read_text()), "run": str(run_file)}
        for run_file, path in zip(run_files(batch_root), paths, strict=True)
    ]


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def iter_stage_elapsed(result: subprocess.CompletedProcess) -> Iterable[str]:
    """SIERRA's own stage 2 timing lines ("Execution complete in H:MM:SS")."""
    for line in (result.stdout or "").splitlines():
        if "Execution complete in" in line or "elapsed time" in line:
            yield line.strip()


__all__ = [
    "CONTROLLER",
    "ENGINE",
    "ENGINE_PLUGIN_PATH",
    "FAIL_MARKER",
    "FAIL_ONCE_MARKER",
    "PARADIGMS",
    "PREFECT_PLUGIN_PATH",
    "PROJECT",
    "REPO",
    "RESOURCES_FILE",
    "SCENARIO",
    "TEMPLATE",
    "command_lines",
    "commands_files",
    "exp_input_roots",
    "expected_batch_root",
    "expected_outputs",
    "find_batch_root",
    "iter_stage_elapsed",
    "log_tail",
    "make_run_fail",
    "make_run_fail_once",
    "missing_outputs",
    "run_files",
    "run_output_dir",
    "run_resources",
    "run_sierra",
    "sierra_argv",
    "sierra_env",
]


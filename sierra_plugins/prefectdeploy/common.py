"""Behaviour shared by the ``prefectdeploy.*`` plugins.

Each plugin turns SIERRA's stage 2 into one shell command per batch
(per-batch paradigm) or per experiment (per-exp paradigm)::

    sierra-prefect run DEPLOYMENT --input-root DIR --scratch-root DIR \\
        [--max-parallel N] [--run-timeout S] [--cores-per-run N] \\
        [--memory-per-run SIZE] [--retries N] [--retry-delay S] \\
        [--no-resume] [--workdir DIR] \\
        [--work-pool POOL] [--work-queue QUEUE] \\
        [--image IMG] [--host-user] [--mount SRC:DST[:MODE]]...

and nothing else: no pre/post commands, no server, no workers. The shim exits
0 iff every run succeeded, which is what SIERRA (and ``--exec-strict``) looks
at.

Mapping from SIERRA:

- input root: ``batch_root`` (per-batch) / ``exp_input_root`` (per-exp); the
  flow reads ``<input root>/commands.txt``, which is where SIERRA writes it.
- scratch root: ``batch_scratch_root`` / ``exp_scratch_root``.
- ``--exec-jobs-per-node N`` -> ``--max-parallel N``, only when the user gave
  it (omitted otherwise: the worker decides). Where it is not given,
  :func:`configure_resources` (the plugins' ``cmdline_postparse_configure``)
  fills SIERRA's ``exec_jobs_per_node`` for SIERRA only, since SIERRA's
  per-experiment runner asserts it is set; that value is never forwarded, in
  either paradigm (SIERRA's ``exec_opts["n_jobs"]`` is that same value, so it
  is not read).
- cores per run -> ``--cores-per-run N``: ``--exec-cores-per-run N`` if given,
  else the engine's threads per run (``--physics-n-engines`` of ARGoS,
  ``--physics-n-threads`` of ROS1+Gazebo) when set, else omitted (the flow's
  default, 1). The worker runs ``min(max parallel, usable CPUs // N)`` runs at
  once, each pinned to its own N CPUs.
- ``--exec-memory-per-run SIZE`` -> ``--memory-per-run SIZE``, verbatim: the
  shim validates sizes, and ``execenv_check`` asks it to before stage 2
  (``sierra-prefect check ... --memory-per-run SIZE``).
- ``--exec-spread N`` -> ``--spread N`` (the batch over N workers/hosts);
- ``--exec-retries N`` -> ``--retries N``, ``--exec-retry-delay S`` ->
  ``--retry-delay S`` (omitted when unset: the deployment's defaults).
- ``--exec-resume`` -> the shim's default (skip runs that already succeeded);
  without it -> ``--no-resume`` (run everything again), which is what
  ``hpc.local`` does too. Every run records its success either way, so a batch
  interrupted without ``--exec-resume`` can still be resumed later with it.
- ``--deployment``, ``--work-pool`` (the pool the deployment must be on),
  ``--work-queue``, ``--run-timeout``: passed through when given;
  ``--work-pool`` also goes to ``sierra-prefect check``.
- mounts (``prefectdeploy.dockerremote``): passed verbatim as ``--mount``; the
  shim validates them, and ``execenv_check`` asks it to before stage 2
  (``sierra-prefect check ... --mount ...``), so a bad mount fails with one line
  before anything runs.
- ``--workdir``: only ``prefectdeploy.local`` passes one (the directory SIERRA
  runs in, where ``hpc.local`` runs commands too); in containers the commands
  run in the input root.

The executable is ``$SIERRA_PREFECT_BIN`` if set, else ``sierra-prefect`` from
``PATH``, else the one next to the Python running SIERRA (a venv that is not
activated), else the bare name.

SIERRA's binding interfaces are matched by method names only (no subclassing,
no ``implements``), so this works with sierra-research 1.5.8 through 1.5.16.
"""

import argparse
import logging
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import typing as tp

from sierra.core import types

_logger = logging.getLogger(__name__)


class PluginError(SystemExit):
    """What a user did wrong or must fix, as one line (SIERRA's handler for any other
    exception prints a traceback and asks for a bug report; a SystemExit passes it)."""

SHIM_NAME = "sierra-prefect"
SHIM_ENV = "SIERRA_PREFECT_BIN"
COMMANDS_FILE = "commands.txt"
# How every error line of the shim starts (sierra_prefect/cli.py).
SHIM_ERROR_PREFIX = "sierra-prefect: error: "
CHECK_TIMEOUT = 120  # seconds; `sierra-prefect check` imports Prefect and asks the server


def shim_executable() -> str:
    """The ``sierra-prefect`` executable the generated commands call."""
    if override := os.environ.get(SHIM_ENV):
        return override
    if found := shutil.which(SHIM_NAME):
        return found
    sibling = pathlib.Path(sys.executable).parent / SHIM_NAME
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return SHIM_NAME


def build_run_argv(
    deployment: str,
    input_root: str | os.PathLike,
    scratch_root: str | os.PathLike,
    *,
    max_parallel: int | None = None,
    run_timeout: int | None = None,
    cores_per_run: int | None = None,
    memory_per_run: str | None = None,
    retries: int | None = None,
    retry_delay: float | None = None,
    spread: int | None = None,
    resume: bool = True,
    workdir: str | os.PathLike | None = None,
    work_pool: str | None = None,
    work_queue: str | None = None,
    image: str | None = None,
    host_user: bool = False,
    mounts: tp.Sequence[str] = (),
    shim: str | None = None,
) -> list[str]:
    """The ``sierra-prefect run`` argument vector (unquoted).

    Mounts and the memory size go through verbatim: the shim is the one place that
    validates them (and ``execenv_check`` asks it to before stage 2).
    """
    if not deployment:
        raise ValueError("No Prefect deployment given (--deployment)")
    _at_least("--exec-jobs-per-node", max_parallel, 1)
    _at_least("--exec-cores-per-run", cores_per_run, 1)
    _at_least("--exec-retries", retries, 0)
    _at_least("--exec-retry-delay", retry_delay, 0)
    _at_least("--exec-spread", spread, 1)

    argv = [shim or shim_executable(), "run", deployment,
            "--input-root", str(input_root), "--scratch-root", str(scratch_root)]
    argv += _options({
        "--max-parallel": None if max_parallel is None else int(max_parallel),
        "--run-timeout": run_timeout,
        "--cores-per-run": None if cores_per_run is None else int(cores_per_run),
        "--memory-per-run": memory_per_run,
        "--retries": None if retries is None else int(retries),
        "--retry-delay": retry_delay,
        "--spread": None if spread is None else int(spread),
    })
    if not resume:
        argv.append("--no-resume")
    argv += _options({
        "--workdir": workdir,
        "--work-pool": work_pool,
        "--work-queue": work_queue,
        "--image": image,
    })
    if host_user:
        argv.append("--host-user")
    for m in mounts:
        argv += ["--mount", str(m)]
    return argv


def _at_least(option: str, value: tp.Any, low: float) -> None:
    if value is not None and not float(value) >= low:
        raise ValueError(f"{option} must be >= {low}, got {value}")


def _options(values: dict[str, tp.Any]) -> list[str]:
    """``--option value`` for every value given (None and "" are not given)."""
    argv: list[str] = []
    for option, value in values.items():
        if value is not None and value != "":
            argv += [option, str(value)]
    return argv


# The engines' own "threads per run" options, by their argparse dest, in the order they
# are looked at: ARGoS's physics engines (one thread each), ROS1+Gazebo's physics threads.
ENGINE_THREADS = (
    ("physics_n_engines", "--physics-n-engines"),
    ("physics_n_threads", "--physics-n-threads"),
)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a SLURM/Docker/taskset share)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def decide_cores_per_run(args: argparse.Namespace) -> tuple[int | None, str]:
    """Cores per run and where that came from.

    ``--exec-cores-per-run`` wins; else the engine's threads per run when set (>= 1;
    ROS1+Gazebo's 0 means "no extra threads"); else None (the flow's default, 1).
    """
    explicit = getattr(args, "exec_cores_per_run", None)
    if explicit is not None:
        return int(explicit), "--exec-cores-per-run"
    for dest, option in ENGINE_THREADS:
        value = getattr(args, dest, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value, f"the engine's {option}"
    return None, "none declared: the flow's default"


def jobs_for_sierra(n_runs: int | None, cores_per_run: int | None) -> int:
    """The ``--exec-jobs-per-node`` SIERRA gets when the user gave none (as ARGoS's
    ``hpc.local`` computes it): runs that fit on this machine's CPUs, at least 1."""
    jobs = usable_cpus() // (cores_per_run or 1)
    if n_runs:
        jobs = min(int(n_runs), jobs)
    return max(1, jobs)


def configure_resources(
    args: argparse.Namespace, decided: tuple[int | None, str] | None = None
) -> argparse.Namespace:
    """The plugins' ``cmdline_postparse_configure`` (SIERRA calls it before the engine's).

    - Remembers the ``--exec-jobs-per-node`` the user gave as ``exec_max_parallel``:
      the only value forwarded as ``--max-parallel``.
    - Decides cores per run (:func:`decide_cores_per_run`, or ``decided``: the value and
      where it came from, e.g. ``prefectdeploy.slurm``'s ``SLURM_CPUS_PER_TASK``) into
      ``exec_cores_per_run``.
    - If no ``--exec-jobs-per-node`` was given, fills SIERRA's ``exec_jobs_per_node``
      (its per-experiment runner asserts it is set) with :func:`jobs_for_sierra`.
      That value is for SIERRA only: the worker decides how many runs go at once.
    """
    given = getattr(args, "exec_jobs_per_node", None)
    args.exec_max_parallel = given
    if 2 not in pipeline_stages(args):
        return args

    cores, source = decided if decided is not None else decide_cores_per_run(args)
    args.exec_cores_per_run = cores
    _logger.info("Cores per experimental run: %s (%s)", cores or 1, source)
    if given is None:
        args.exec_jobs_per_node = jobs_for_sierra(getattr(args, "n_runs", None), cores)
        _logger.info(
            "--exec-jobs-per-node not given: SIERRA gets %s (runs that fit on %s CPUs "
            "here); not forwarded, the worker decides how many runs go at once",
            args.exec_jobs_per_node,
            usable_cpus(),
        )
    else:
        _logger.info("--exec-jobs-per-node %s: forwarded as --max-parallel", given)
    return args


def pipeline_stages(args: argparse.Namespace) -> list[int]:
    """The stages SIERRA runs (``--pipeline``; all when not parsed yet)."""
    stages = getattr(args, "pipeline", None)
    if stages is None:
        return [1, 2, 3, 4, 5]
    return list(stages) if isinstance(stages, tp.Iterable) else [stages]


def quote_argv(argv: tp.Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


class _RunCmdGenerator:
    """Turns cmdopts + one exec_opts dict into the single ``run`` command."""

    def __init__(self, cmdopts: types.Cmdopts) -> None:
        self.cmdopts = cmdopts

    def extra_argv_kwargs(self) -> dict[str, tp.Any]:
        """Deployment-kind specific keyword arguments for :func:`build_run_argv`."""
        return {}

    def run_spec(
        self,
        input_root: str,
        scratch_root: str,
        exec_opts: types.StrDict,
    ) -> types.ShellCmdSpec:
        _check_cmdfile(input_root, exec_opts)

        # Only what the user gave: SIERRA's exec_jobs_per_node (and exec_opts["n_jobs"],
        # the same value) may have been filled in for SIERRA alone (configure_resources).
        max_parallel = self.cmdopts.get("exec_max_parallel")
        resume = exec_opts.get("exec_resume", self.cmdopts.get("exec_resume", False))
        argv = build_run_argv(
            self.cmdopts["deployment"],
            input_root,
            scratch_root,
            max_parallel=max_parallel,
            run_timeout=self.cmdopts.get("run_timeout"),
            cores_per_run=self.cmdopts.get("exec_cores_per_run"),
            memory_per_run=self.cmdopts.get("exec_memory_per_run"),
            retries=self.cmdopts.get("exec_retries"),
            retry_delay=self.cmdopts.get("exec_retry_delay"),
            spread=self.cmdopts.get("exec_spread"),
            resume=bool(resume),
            work_pool=self.cmdopts.get("work_pool"),
            work_queue=self.cmdopts.get("work_queue"),
            **self.extra_argv_kwargs(),
        )
        return types.ShellCmdSpec(cmd=quote_argv(argv), shell=True, wait=True)


def _check_cmdfile(input_root: str, exec_opts: types.StrDict) -> None:
    """The flow reads <input root>/commands.txt: make sure SIERRA wrote it there."""
    if "cmdfile_stem_path" not in exec_opts:
        return
    actual = pathlib.Path(
        str(exec_opts["cmdfile_stem_path"]) + str(exec_opts.get("cmdfile_ext", ""))
    )
    expected = pathlib.Path(input_root) / COMMANDS_FILE
    if actual != expected:
        raise PluginError(
            f"SIERRA's commands file is {actual}, but the Prefect flow reads "
            f"{expected}: this SIERRA version lays out batches differently "
            "than sierra-prefect expects"
        )


class BatchShellCmdsGenerator(_RunCmdGenerator):
    """Per-batch paradigm: one ``sierra-prefect run`` for the whole batch."""

    def pre_batch_cmds(self) -> list[types.ShellCmdSpec]:
        return []

    def exec_batch_cmds(self, exec_opts: types.StrDict) -> list[types.ShellCmdSpec]:
        return [
            self.run_spec(
                str(exec_opts["batch_root"]),
                str(exec_opts["batch_scratch_root"]),
                exec_opts,
            )
        ]

    def post_batch_cmds(self) -> list[types.ShellCmdSpec]:
        return []


class ExpShellCmdsGenerator(_RunCmdGenerator):
    """Per-exp paradigm: one ``sierra-prefect run`` per experiment."""

    def __init__(self, cmdopts: types.Cmdopts, exp_num: int) -> None:
        super().__init__(cmdopts)
        self.exp_num = exp_num

    def pre_exp_cmds(self) -> list[types.ShellCmdSpec]:
        return []

    def exec_exp_cmds(self, exec_opts: types.StrDict) -> list[types.ShellCmdSpec]:
        return [
            self.run_spec(
                str(exec_opts["exp_input_root"]),
                str(exec_opts["exp_scratch_root"]),
                exec_opts,
            )
        ]

    def post_exp_cmds(self) -> list[types.ShellCmdSpec]:
        return []


class HereMixin:
    """Runs execute in the directory SIERRA was started in (``--workdir``), as under
    ``hpc.local``: for workers that see SIERRA's file system at the same paths
    (``prefectdeploy.local``, ``prefectdeploy.slurm``), relative paths keep working."""

    def extra_argv_kwargs(self) -> dict[str, tp.Any]:
        return {"workdir": os.getcwd()}


class HereBatchShellCmdsGenerator(HereMixin, BatchShellCmdsGenerator):
    """Per-batch, in SIERRA's directory."""


class HereExpShellCmdsGenerator(HereMixin, ExpShellCmdsGenerator):
    """Per-experiment, in SIERRA's directory."""


def execenv_check(
    cmdopts: types.Cmdopts,
    extra_argv: tp.Sequence[str] = (),
    command: tp.Sequence[str] = ("check",),
) -> None:
    """Stage 2 pre-flight: ``sierra-prefect check DEPLOYMENT [extra_argv]`` must succeed
    (``command`` replaces ``check``, e.g. ``slurm check``).

    The shim checks the server, the deployment, the Prefect versions, the memory
    per run and whatever ``extra_argv`` names (e.g. ``--mount``): it is the one
    place that validates them. Raises PluginError (SIERRA stops stage 2 before running anything)
    with the shim's one-line reason and the fix.
    """
    deployment = cmdopts["deployment"]
    execenv = cmdopts.get("execenv", "prefectdeploy")
    argv = [shim_executable(), *command, deployment, *extra_argv]
    if cmdopts.get("work_pool"):
        argv += ["--work-pool", cmdopts["work_pool"]]
    if cmdopts.get("exec_memory_per_run"):
        argv += ["--memory-per-run", str(cmdopts["exec_memory_per_run"])]
    fix = "Start the Prefect stack with `sierra-prefect up`, then re-run stage 2."

    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as e:
        raise PluginError(
            f"--execenv={execenv}: cannot run '{argv[0]}': {e.strerror}. Install "
            f"sierra-prefect where SIERRA runs (or set {SHIM_ENV}). {fix}"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise PluginError(
            f"--execenv={execenv}: '{quote_argv(argv)}' gave no answer within "
            f"{CHECK_TIMEOUT}s. {fix}"
        ) from e

    if proc.returncode != 0:
        # The shim's error is its last line (Prefect may log warnings before it).
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        lines = lines or [ln.strip() for ln in (proc.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        message = f"--execenv={execenv}: Prefect deployment '{deployment}' cannot run stage 2: {reason}"
        # The shim's own one-line errors carry their fix; anything else gets the usual one.
        if not reason.startswith(SHIM_ERROR_PREFIX):
            message += f". {fix}"
        raise PluginError(message)

    _logger.info("Prefect deployment '%s' is ready", deployment)


__all__ = [
    "BatchShellCmdsGenerator",
    "ExpShellCmdsGenerator",
    "PluginError",
    "build_run_argv",
    "configure_resources",
    "decide_cores_per_run",
    "execenv_check",
    "jobs_for_sierra",
    "pipeline_stages",
    "quote_argv",
    "shim_executable",
    "usable_cpus",
]

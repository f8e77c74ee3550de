"""``prefectdeploy.slurm``: stage 2 inside a SLURM allocation, on the allocation's workers.

Run SIERRA in an ``sbatch`` script (or a ``salloc`` shell) after starting the allocation's
workers with ``sierra-prefect slurm workers &``. On top of :mod:`prefectdeploy.common`:

- deployment ``sierra/slurm`` (pool ``sierra-slurm-pool``), flow runs sent to the queue
  ``slurm-<SLURM_JOB_ID>`` (``--work-queue``), which only this allocation's workers poll;
- cores per run: ``--exec-cores-per-run`` if given, else ``SLURM_CPUS_PER_TASK``, as
  SIERRA's ``hpc.slurm`` takes it (for ARGoS it also sets ``--physics-n-engines`` to it when
  not given, as ``hpc.slurm`` does); each worker runs as many runs at once as its node's
  CPUs in the job hold, each pinned to its own cores;
- ``execenv_check`` runs ``sierra-prefect slurm check``: the server answers with the
  stack's credential, the deployment exists, and one worker per allocated node is online;
- runs execute in the directory SIERRA runs in (``--workdir``), as with
  ``prefectdeploy.local``: the nodes share the file system, as SIERRA needs anyway.

Outside an allocation, or without CPUs per task, SIERRA stops before stage 2 with one line
saying what to do (``SystemExit``: no traceback).
"""

import argparse
import logging
import os
import typing as tp

from sierra.core import types

from prefectdeploy import common

_logger = logging.getLogger(__name__)

EXECENV = "prefectdeploy.slurm"
HINT = "see the sierra-prefect README, 'On a SLURM cluster'"


def _fail(message: str) -> tp.NoReturn:
    raise SystemExit(f"--execenv={EXECENV}: {message}")


def allocation_queue(environ: tp.Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        _fail("not inside a SLURM allocation (SLURM_JOB_ID is not set): run SIERRA in an "
              f"sbatch script or a salloc shell, after `sierra-prefect slurm workers &` ({HINT})")
    return f"slurm-{job_id}"


def slurm_cores(args: argparse.Namespace,
                environ: tp.Mapping[str, str] | None = None) -> tuple[int, str]:
    """Cores per run and where they came from: ``--exec-cores-per-run``, else
    ``SLURM_CPUS_PER_TASK`` (one-line error without either)."""
    explicit = getattr(args, "exec_cores_per_run", None)
    if explicit is not None:
        return int(explicit), "--exec-cores-per-run"
    env = os.environ if environ is None else environ
    text = env.get("SLURM_CPUS_PER_TASK", "")
    if not text.isdigit() or int(text) < 1:
        _fail(f"SLURM_CPUS_PER_TASK is {'not set' if not text else repr(text)}: request the CPUs "
              "of one run with `#SBATCH --cpus-per-task=N` (or `salloc --cpus-per-task=N`), or "
              "pass --exec-cores-per-run N")
    return int(text), "SLURM_CPUS_PER_TASK"


def cmdline_postparse_configure(args: argparse.Namespace) -> argparse.Namespace:
    if not {1, 2} & set(common.pipeline_stages(args)):
        return args
    queue = allocation_queue()
    if getattr(args, "work_queue", None) is None:
        args.work_queue = queue
    cores, source = slurm_cores(args)
    # ARGoS under hpc.slurm: one physics engine per CPU of the run.
    if hasattr(args, "physics_n_engines") and args.physics_n_engines is None:
        args.physics_n_engines = cores
    return common.configure_resources(args, decided=(cores, source))


BatchShellCmdsGenerator = common.HereBatchShellCmdsGenerator
ExpShellCmdsGenerator = common.HereExpShellCmdsGenerator


def execenv_check(cmdopts: types.Cmdopts) -> None:
    """``sierra-prefect slurm check``: server, credential, deployment, and this
    allocation's workers online (it waits for them a while)."""
    common.execenv_check(cmdopts, command=("slurm", "check"))


__all__ = [
    "BatchShellCmdsGenerator",
    "ExpShellCmdsGenerator",
    "cmdline_postparse_configure",
    "execenv_check",
]

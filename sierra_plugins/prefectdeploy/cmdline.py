"""Command line options shared by the ``prefectdeploy.*`` plugins.

Built on SIERRA's ``HPCCmdline`` like SIERRA's own ``prefectserver.*`` plugins,
so ``--exec-jobs-per-node``, ``--exec-resume``, ``--exec-strict`` (and the
devnull flag, whose spelling differs between SIERRA versions) behave as
everywhere else in SIERRA.

cmdopts keys added (read by :mod:`prefectdeploy.common`):

- ``deployment``: ``--deployment`` (``FLOW/DEPLOYMENT``).
- ``work_pool``: ``--work-pool``; the pool the deployment must be on (checked by
  ``sierra-prefect check``/``run``), ``None`` means no check.
- ``work_queue``: ``--work-queue``; the queue of the deployment's pool to use,
  ``None`` means the deployment's own queue.
- ``run_timeout``: ``--run-timeout`` in seconds, ``None`` means the
  deployment's default.
- ``exec_cores_per_run``: CPUs each experimental run gets (``--exec-cores-per-run``,
  else the engine's threads per run, as decided by
  :func:`prefectdeploy.common.configure_resources`); ``None`` means the flow's
  default (1).
- ``exec_memory_per_run``: ``--exec-memory-per-run`` (e.g. ``2G``), verbatim:
  ``sierra-prefect`` validates it; ``None`` means no bound.
- ``exec_retries``, ``exec_retry_delay``: ``--exec-retries``,
  ``--exec-retry-delay``; ``None`` means the deployment's default.
- ``exec_max_parallel``: the ``--exec-jobs-per-node`` the user gave (``None``
  if not given), the only value forwarded as ``--max-parallel``. SIERRA's own
  ``exec_jobs_per_node`` may hold a value filled in for SIERRA only.
"""

import argparse
import math
import typing as tp

from sierra.core import types
from sierra.plugins.execenv import hpc


class PrefectDeployCmdline(hpc.cmdline.HPCCmdline):
    """HPC options plus the Prefect deployment to trigger."""

    def __init__(
        self,
        parents: list[argparse.ArgumentParser],
        stages: list[int],
        default_deployment: str,
    ) -> None:
        # Must be set before the base class builds the parser (it calls
        # init_stage2() from its constructor).
        self.default_deployment = default_deployment
        super().__init__(parents, stages)

    def init_stage2(self) -> None:
        super().init_stage2()

        self.stage2.add_argument(
            "--deployment",
            default=self.default_deployment,
            metavar="FLOW/NAME",
            help=f"""
                 The Prefect deployment that runs the experimental runs
                 (created by ``sierra-prefect up``). Default:
                 ``{self.default_deployment}``.
                 """
            + self.stage_usage_doc([2]),
        )
        self.stage2.add_argument(
            "--work-pool",
            default=None,
            help="""
                 The Prefect work pool the deployment must run on; stage 2
                 stops with an error if it runs on another one (a deployment's
                 pool is fixed when it is deployed).
                 """
            + self.stage_usage_doc([2], "If omitted: not checked."),
        )
        self.stage2.add_argument(
            "--work-queue",
            default=None,
            help="""
                 Send the flow runs to this work queue of the deployment's pool
                 instead of the deployment's own queue.
                 """
            + self.stage_usage_doc([2], "If omitted: the deployment's queue."),
        )
        self.stage2.add_argument(
            "--run-timeout",
            type=_positive_int,
            default=None,
            metavar="SECONDS",
            help="""
                 Kill an experimental run that takes longer than this and count
                 it as failed.
                 """
            + self.stage_usage_doc([2], "If omitted: the deployment's default."),
        )
        self._init_stage2_resources()

    def _init_stage2_resources(self) -> None:
        self.stage2.add_argument(
            "--exec-cores-per-run",
            type=_positive_int,
            default=None,
            metavar="N",
            help="""
                 The # of CPUs each experimental run needs (e.g., the # of
                 threads of a multi-threaded simulator). The worker runs at
                 most ``floor(usable CPUs / N)`` runs at once (and at most
                 ``--exec-jobs-per-node``), pins each run to its own N CPUs,
                 and sets ``OMP_NUM_THREADS`` (and its siblings) to N in the
                 run's environment.
                 """
            + self.stage_usage_doc(
                [2],
                "If omitted: the engine's threads per run when it declares "
                "them (``--physics-n-engines`` for ARGoS, "
                "``--physics-n-threads`` for ROS1+Gazebo), else 1.",
            ),
        )
        self.stage2.add_argument(
            "--exec-memory-per-run",
            default=None,
            metavar="SIZE",
            help="""
                 Memory each experimental run may use, with a binary unit
                 (``K``, ``M``, ``G``, ``T``), e.g. ``2G`` or ``512M``. A run
                 does not start while the worker host has less memory
                 available, and a run whose processes grow past it is ended
                 and counted as failed. Checked by ``sierra-prefect check``
                 before any run starts.
                 """
            + self.stage_usage_doc([2], "If omitted: no bound."),
        )
        self.stage2.add_argument(
            "--exec-retries",
            type=_non_negative_int,
            default=None,
            metavar="N",
            help="""
                 Run a failed (or timed out) experimental run again, up to N
                 times. Every attempt keeps its own logs; a run that succeeds
                 on a retry counts as succeeded.
                 """
            + self.stage_usage_doc([2], "If omitted: the deployment's default."),
        )
        self.stage2.add_argument(
            "--exec-spread",
            type=_positive_int,
            default=None,
            metavar="N",
            help="""
                 Spread each batch (or experiment) over N child flow runs, which
                 the workers of the pool take, one per worker (host), sharing the
                 runs: ``sierra-prefect run --spread N``. A lost worker host's
                 runs are run again by the others.
                 """
            + self.stage_usage_doc([2], "If omitted: one flow run, on one worker."),
        )
        self.stage2.add_argument(
            "--exec-retry-delay",
            type=_non_negative_float,
            default=None,
            metavar="SECONDS",
            help="""
                 Seconds to wait before each retry of a failed experimental
                 run (see ``--exec-retries``). A run waiting to be retried
                 holds no CPU.
                 """
            + self.stage_usage_doc([2], "If omitted: the deployment's default."),
        )


def _positive_int(text: str) -> int:
    return _bounded(text, int, 1, "an integer >= 1")


def _non_negative_int(text: str) -> int:
    return _bounded(text, int, 0, "an integer >= 0")


def _non_negative_float(text: str) -> float:
    return _bounded(text, float, 0.0, "a number >= 0")


def _bounded(text: str, kind: type, low: float, what: str) -> tp.Any:
    """``kind(text)`` if it is at least ``low``; argparse turns the error into one line."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not (value >= low and math.isfinite(value)):  # also rejects NaN and inf
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def to_cmdopts(args: argparse.Namespace) -> types.Cmdopts:
    opts = hpc.cmdline.to_cmdopts(args)
    opts |= {
        "deployment": args.deployment,
        "work_pool": args.work_pool,
        "work_queue": args.work_queue,
        "run_timeout": args.run_timeout,
        "exec_cores_per_run": args.exec_cores_per_run,
        "exec_memory_per_run": args.exec_memory_per_run,
        "exec_retries": args.exec_retries,
        "exec_retry_delay": args.exec_retry_delay,
        "exec_spread": args.exec_spread,
        # Set by cmdline_postparse_configure (common.configure_resources) to what the
        # user gave; without it, nothing was filled in and exec_jobs_per_node is theirs.
        "exec_max_parallel": getattr(args, "exec_max_parallel", args.exec_jobs_per_node),
    }
    return opts


__all__ = ["PrefectDeployCmdline", "to_cmdopts"]

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
"""

import argparse

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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def to_cmdopts(args: argparse.Namespace) -> types.Cmdopts:
    opts = hpc.cmdline.to_cmdopts(args)
    opts |= {
        "deployment": args.deployment,
        "work_pool": args.work_pool,
        "work_queue": args.work_queue,
        "run_timeout": args.run_timeout,
    }
    return opts


__all__ = ["PrefectDeployCmdline", "to_cmdopts"]

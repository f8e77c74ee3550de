"""Options of ``prefectdeploy.slurm``: the shared ones (see :mod:`prefectdeploy.cmdline`),
with ``--deployment`` defaulting to ``sierra/slurm``. ``--work-queue`` defaults to the
allocation's queue, ``slurm-<SLURM_JOB_ID>``; ``--exec-cores-per-run`` to
``SLURM_CPUS_PER_TASK`` (see :mod:`prefectdeploy.slurm.plugin`)."""

import argparse

from sierra.core import types
from sierra.plugins import PluginCmdline

from prefectdeploy import cmdline as shared

DEFAULT_DEPLOYMENT = "sierra/slurm"


def build(parents: list[argparse.ArgumentParser], stages: list[int]) -> PluginCmdline:
    return shared.PrefectDeployCmdline(parents, stages, DEFAULT_DEPLOYMENT)


def to_cmdopts(args: argparse.Namespace) -> types.Cmdopts:
    return shared.to_cmdopts(args)

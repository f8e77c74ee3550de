"""``prefectdeploy.local``: one ``sierra-prefect run`` per batch or experiment.

On top of :mod:`prefectdeploy.common`, the runs execute in the directory SIERRA
was started in (``--workdir``), as they do under ``hpc.local``: the process
worker runs on the same machine, so relative paths in the engine's commands
keep working.

Cores per run and SIERRA's jobs per node are decided by
:func:`prefectdeploy.common.configure_resources`, run by SIERRA as this
plugin's ``cmdline_postparse_configure`` (before the engine's).
"""

import argparse

from prefectdeploy import common
from prefectdeploy.common import execenv_check


def cmdline_postparse_configure(args: argparse.Namespace) -> argparse.Namespace:
    return common.configure_resources(args)


BatchShellCmdsGenerator = common.HereBatchShellCmdsGenerator
ExpShellCmdsGenerator = common.HereExpShellCmdsGenerator


__all__ = [
    "BatchShellCmdsGenerator",
    "ExpShellCmdsGenerator",
    "cmdline_postparse_configure",
    "execenv_check",
]

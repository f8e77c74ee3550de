"""``prefectdeploy.local``: one ``sierra-prefect run`` per batch or experiment.

On top of :mod:`prefectdeploy.common`, the runs execute in the directory SIERRA
was started in (``--workdir``), as they do under ``hpc.local``: the process
worker runs on the same machine, so relative paths in the engine's commands
keep working.
"""

import os
import typing as tp

from prefectdeploy import common
from prefectdeploy.common import execenv_check


class BatchShellCmdsGenerator(common.BatchShellCmdsGenerator):
    def extra_argv_kwargs(self) -> dict[str, tp.Any]:
        return {"workdir": os.getcwd()}


class ExpShellCmdsGenerator(common.ExpShellCmdsGenerator):
    def extra_argv_kwargs(self) -> dict[str, tp.Any]:
        return {"workdir": os.getcwd()}


__all__ = ["BatchShellCmdsGenerator", "ExpShellCmdsGenerator", "execenv_check"]

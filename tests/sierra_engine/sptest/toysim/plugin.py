"""The ``sptest.toysim`` SIERRA engine (tests only).

Every experimental run is one command line::

    <toysim_python> <exp_input_root>/toysim.py <exp_input_root>/toysim_run<k>.xml

Stage 1 copies ``toysim.py`` into each experiment's input directory
(:meth:`ExpConfigurer.for_exp`), so everything a run needs lives under
``--sierra-root``: a worker container only needs that one mount and a
``python3``.

The parallelism paradigm comes from ``--toysim-paradigm`` (``per-batch`` by
default); SIERRA's ``--exec-parallelism-paradigm`` overrides it.

Duck-typed against SIERRA's binding interfaces (no subclassing), so it loads on
sierra-research 1.5.8 through 1.5.16.
"""

import argparse
import logging
import os
import pathlib
import shlex
import shutil
import typing as tp

from sierra.core import types

_logger = logging.getLogger(__name__)

SIMULATOR = pathlib.Path(__file__).resolve().parent / "toysim.py"
SIMULATOR_NAME = SIMULATOR.name
RUN_FILE_EXT = ".xml"


class ExpRunShellCmdsGenerator:
    """The command line of one experimental run (written into commands.txt)."""

    def __init__(
        self,
        cmdopts: types.Cmdopts,
        criteria: tp.Any,
        exp_num: int,
        n_agents: int | None,
    ) -> None:
        self.cmdopts = cmdopts

    def pre_run_cmds(
        self, host: str, input_fpath: pathlib.Path, run_num: int
    ) -> list:
        return []

    def exec_run_cmds(
        self, host: str, input_fpath: pathlib.Path, run_num: int
    ) -> list:
        input_fpath = pathlib.Path(input_fpath)
        sim = input_fpath.parent / SIMULATOR_NAME
        run_file = input_fpath.parent / (input_fpath.name + RUN_FILE_EXT)
        cmd = " ".join(
            [
                shlex.quote(self.cmdopts["toysim_python"]),
                shlex.quote(str(sim)),
                shlex.quote(str(run_file)),
            ]
        )
        return [types.ShellCmdSpec(cmd=cmd, shell=True, wait=True)]

    def post_run_cmds(self, host: str, run_output_root: pathlib.Path) -> list:
        return []


class ExpConfigurer:
    def __init__(self, cmdopts: types.Cmdopts) -> None:
        self.cmdopts = cmdopts

    def for_exp_run(
        self, exp_input_root: pathlib.Path, run_output_root: pathlib.Path
    ) -> None:
        pathlib.Path(run_output_root).mkdir(parents=True, exist_ok=True)

    def for_exp(self, exp_input_root: pathlib.Path) -> None:
        shutil.copy2(SIMULATOR, pathlib.Path(exp_input_root) / SIMULATOR_NAME)

    def parallelism_paradigm(self) -> str:
        return self.cmdopts["toysim_paradigm"]


def cmdline_postparse_configure(
    execenv: str, args: argparse.Namespace
) -> argparse.Namespace:
    """Give ``--exec-jobs-per-node`` a value where SIERRA needs one.

    ``hpc.*`` execution environments hand it to GNU parallel as ``--jobs``, and
    SIERRA's per-experiment runner asserts it is set whatever the execution
    environment. For a per-batch run on any other execution environment
    (e.g. ``prefectdeploy.*``) it is left unset, so the plugin omits
    ``--max-parallel`` and the deployment's own cap applies.
    """
    if not hasattr(args, "exec_jobs_per_node") or args.exec_jobs_per_node is not None:
        return args

    paradigm = getattr(args, "exec_parallelism_paradigm", None) or args.toysim_paradigm
    if execenv.startswith("hpc.") or paradigm == "per-exp":
        args.exec_jobs_per_node = max(1, min(int(args.n_runs), os.cpu_count() or 1))
        _logger.debug(
            "toysim: --exec-jobs-per-node unset; using %s", args.exec_jobs_per_node
        )

    return args


__all__ = [
    "ExpConfigurer",
    "ExpRunShellCmdsGenerator",
    "cmdline_postparse_configure",
]

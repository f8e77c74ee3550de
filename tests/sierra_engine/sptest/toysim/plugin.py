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
    """Size ``--exec-jobs-per-node`` as ARGoS does (``_configure_hpc_local``).

    For ``hpc.*`` execution environments, when not given: the runs that fit on
    this machine's CPUs with ``--physics-n-threads`` CPUs each,
    ``min(n_runs, CPUs // threads)``, at least 1. For any other execution
    environment nothing is set (ARGoS logs "untested" and sets nothing), so
    an execution environment that needs a value (SIERRA's per-experiment
    runner asserts one) must set it itself: the ``prefectdeploy.*`` plugins do,
    and the tests rely on this engine not doing it for them.
    """
    if not execenv.startswith("hpc."):
        _logger.debug("toysim: leaving --exec-jobs-per-node to --execenv=%s", execenv)
        return args
    if getattr(args, "exec_jobs_per_node", None) is not None:
        return args

    threads = max(1, getattr(args, "physics_n_threads", None) or 1)
    cpus = len(os.sched_getaffinity(0)) or 1
    args.exec_jobs_per_node = max(1, min(int(args.n_runs), cpus // threads))
    _logger.debug(
        "toysim: %s threads/run, %s parallel runs/node", threads, args.exec_jobs_per_node
    )
    return args


__all__ = [
    "ExpConfigurer",
    "ExpRunShellCmdsGenerator",
    "cmdline_postparse_configure",
]

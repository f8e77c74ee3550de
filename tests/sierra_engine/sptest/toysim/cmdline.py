"""Command line of the ``sptest.toysim`` engine."""

import argparse

from sierra.core import types
from sierra.plugins import PluginCmdline


class ToysimCmdline(PluginCmdline):
    def init_multistage(self) -> None:
        self.multistage.add_argument(
            "--toysim-paradigm",
            choices=["per-batch", "per-exp"],
            default="per-batch",
            help="""
                 Parallelism paradigm the toysim engine reports to SIERRA:
                 ``per-batch`` (one commands.txt for the whole batch, one stage 2
                 execution) or ``per-exp`` (one commands.txt per experiment,
                 experiments executed one after the other). Must be the same in
                 stages 1 and 2. SIERRA's own ``--exec-parallelism-paradigm``
                 overrides it when given.
                 """
            + self.stage_usage_doc([1, 2]),
        )

        self.multistage.add_argument(
            "--physics-n-threads",
            type=int,
            default=None,
            metavar="N",
            help="""
                 Threads each experimental run spins (busy loops for
                 ``--toysim-duration`` seconds), standing in for a
                 multi-threaded simulator. Same option and attribute as
                 ROS1+Gazebo's, so execution environments read it as they
                 read a real engine's threads per run: ``hpc.*`` sizes
                 ``--exec-jobs-per-node`` from it as ARGoS does.
                 """
            + self.stage_usage_doc([1, 2], "If omitted: no threads (the run sleeps)."),
        )

    def init_stage1(self) -> None:
        self.stage1.add_argument(
            "--toysim-python",
            default="python3",
            help="""
                 Interpreter the generated run commands use to start the
                 simulator (needs only the standard library). Must exist where
                 the runs execute (host or worker container).
                 """
            + self.stage_usage_doc([1]),
        )
        self.stage1.add_argument(
            "--toysim-steps",
            type=int,
            default=5,
            help="Rows per run in data.csv." + self.stage_usage_doc([1]),
        )
        self.stage1.add_argument(
            "--toysim-duration",
            type=float,
            default=0.0,
            help="Seconds each run takes (simulated work)." + self.stage_usage_doc([1]),
        )


def build(parents: list[argparse.ArgumentParser], stages: list[int]) -> PluginCmdline:
    return ToysimCmdline(parents, stages)


def to_cmdopts(args: argparse.Namespace) -> types.Cmdopts:
    return {
        "toysim_paradigm": args.toysim_paradigm,
        "toysim_python": args.toysim_python,
        "toysim_steps": args.toysim_steps,
        "toysim_duration": args.toysim_duration,
        "physics_n_threads": args.physics_n_threads,
    }

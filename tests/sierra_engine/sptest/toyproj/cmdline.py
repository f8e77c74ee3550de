"""Command line of the ``sptest.toyproj`` project: just --controller and --scenario."""

import argparse

from sierra.core import types
from sierra.plugins import PluginCmdline


def build(parents: list[argparse.ArgumentParser], stages: list[int]) -> PluginCmdline:
    cmdline = PluginCmdline(parents, stages)
    cmdline.multistage.add_argument(
        "--controller",
        help="""
             Controller name (free-form: this project has no controllers.yaml),
             e.g. ``toy.default``. Becomes a directory level under
             ``--sierra-root``.
             """
        + cmdline.stage_usage_doc([1, 2, 3, 4]),
    )
    cmdline.multistage.add_argument(
        "--scenario",
        help="""
             Scenario name (free-form), e.g. ``basic``. Becomes a directory
             level under ``--sierra-root``.
             """
        + cmdline.stage_usage_doc([1, 2, 3, 4]),
    )
    return cmdline


def to_cmdopts(args: argparse.Namespace) -> types.Cmdopts:
    return {"controller": args.controller, "scenario": args.scenario}

"""Options of ``prefectdeploy.local``: the shared ones (see
:mod:`prefectdeploy.cmdline`), with ``--deployment`` defaulting to
``sierra/local``."""

import argparse

from sierra.core import types
from sierra.plugins import PluginCmdline

from prefectdeploy import cmdline as shared

DEFAULT_DEPLOYMENT = "sierra/local"


def build(parents: list[argparse.ArgumentParser], stages: list[int]) -> PluginCmdline:
    return shared.PrefectDeployCmdline(parents, stages, DEFAULT_DEPLOYMENT)


def to_cmdopts(args: argparse.Namespace) -> types.Cmdopts:
    return shared.to_cmdopts(args)

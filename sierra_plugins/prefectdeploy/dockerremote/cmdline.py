"""Options of ``prefectdeploy.dockerremote``: the shared ones (see
:mod:`prefectdeploy.cmdline`, ``--deployment`` defaulting to
``sierra/dockerremote``) plus the Docker ones.

cmdopts keys added: ``docker_image``, ``docker_extra_mounts``,
``docker_is_host_user`` (same names as SIERRA's ``prefectserver.dockerremote``).
"""

import argparse

from sierra.core import types
from sierra.plugins import PluginCmdline

from prefectdeploy import cmdline as shared

DEFAULT_DEPLOYMENT = "sierra/dockerremote"


def build(parents: list[argparse.ArgumentParser], stages: list[int]) -> PluginCmdline:
    cmdline = shared.PrefectDeployCmdline(parents, stages, DEFAULT_DEPLOYMENT)

    cmdline.stage2.add_argument(
        "--docker-image",
        default=None,
        help="""
             Run the experimental runs in containers of this image instead of
             the deployment's.
             """
        + cmdline.stage_usage_doc([2], "If omitted: the deployment's image."),
    )
    cmdline.stage2.add_argument(
        "--docker-extra-mounts",
        nargs="+",
        default=[],
        metavar="SRC:DST[:MODE]",
        help="""
             Extra bind mounts for the run containers, in docker's format,
             space separated. ``--sierra-root`` is always mounted read-write at
             the same path, so only add what else your runs read or write.
             """
        + cmdline.stage_usage_doc([2]),
    )
    cmdline.stage2.add_argument(
        "--docker-is-host-user",
        action="store_true",
        default=False,
        help="""
             Run the containers as the user running SIERRA (uid:gid), so files
             written into mounted directories are not owned by root.
             """
        + cmdline.stage_usage_doc([2]),
    )
    return cmdline


def to_cmdopts(args: argparse.Namespace) -> types.Cmdopts:
    opts = shared.to_cmdopts(args)
    opts |= {
        "docker_image": args.docker_image,
        "docker_extra_mounts": list(args.docker_extra_mounts or []),
        "docker_is_host_user": args.docker_is_host_user,
    }
    return opts

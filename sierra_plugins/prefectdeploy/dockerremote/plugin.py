"""``prefectdeploy.dockerremote``: one ``sierra-prefect run`` per batch or
experiment, with the container options.

On top of :mod:`prefectdeploy.common`:

- ``--docker-image IMG`` -> ``--image IMG``
- ``--docker-is-host-user`` -> ``--host-user``
- ``--sierra-root`` -> ``--mount ROOT:ROOT:rw`` (always, like SIERRA's
  ``prefectserver.dockerremote``: run inputs, outputs and scratch all live
  under it, and per-experiment outputs are outside the experiment's input
  root), then each ``--docker-extra-mounts`` entry -> ``--mount`` as given. An
  extra mount whose destination is the SIERRA root replaces the default one.
"""

import argparse
import pathlib
import typing as tp

from sierra.core import types

from prefectdeploy import common
from prefectdeploy.common import execenv_check


def docker_argv_kwargs(cmdopts: types.Cmdopts) -> dict[str, tp.Any]:
    extra = [str(m) for m in (cmdopts.get("docker_extra_mounts") or [])]
    extra_dsts = {common.parse_mount(m)[1].rstrip("/") or "/" for m in extra}

    mounts = []
    if cmdopts.get("sierra_root") is not None:
        # Batch paths are computed from the resolved --sierra-root.
        root = str(pathlib.Path(cmdopts["sierra_root"]).expanduser().resolve())
        if root not in extra_dsts:
            mounts.append(f"{root}:{root}:rw")
    mounts += extra

    return {
        "image": cmdopts.get("docker_image"),
        "host_user": bool(cmdopts.get("docker_is_host_user")),
        "mounts": mounts,
    }


class BatchShellCmdsGenerator(common.BatchShellCmdsGenerator):
    def extra_argv_kwargs(self) -> dict[str, tp.Any]:
        return docker_argv_kwargs(self.cmdopts)


class ExpShellCmdsGenerator(common.ExpShellCmdsGenerator):
    def extra_argv_kwargs(self) -> dict[str, tp.Any]:
        return docker_argv_kwargs(self.cmdopts)


def cmdline_postparse_configure(args: argparse.Namespace) -> argparse.Namespace:
    """Reject malformed ``--docker-extra-mounts`` before any stage runs."""
    for m in getattr(args, "docker_extra_mounts", None) or []:
        try:
            common.parse_mount(m)
        except ValueError as exc:
            # One line and a non-zero exit, not SIERRA's "unexpected error" traceback.
            raise SystemExit(f"error: --docker-extra-mounts: {exc}") from None
    return args


__all__ = [
    "BatchShellCmdsGenerator",
    "ExpShellCmdsGenerator",
    "cmdline_postparse_configure",
    "execenv_check",
]

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

Mounts are passed verbatim: ``sierra-prefect`` is the one place that validates
them, and ``execenv_check`` asks it to (``sierra-prefect check ... --mount ...``)
before stage 2 runs anything, so a bad mount fails with one line.

Cores per run and SIERRA's jobs per node are decided by
:func:`prefectdeploy.common.configure_resources`, run by SIERRA as this
plugin's ``cmdline_postparse_configure`` (before the engine's).
"""

import argparse
import pathlib
import typing as tp

from sierra.core import types

from prefectdeploy import common


def docker_argv_kwargs(cmdopts: types.Cmdopts) -> dict[str, tp.Any]:
    extra = [str(m) for m in (cmdopts.get("docker_extra_mounts") or [])]
    extra_dsts = {_destination(m) for m in extra}

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


def _destination(mount: str) -> str | None:
    """DST of ``SRC:DST[:MODE]`` (normalised), only to see whether it is the SIERRA root.

    Not a validation: ``sierra-prefect`` validates mounts (see execenv_check).
    """
    parts = mount.split(":")
    return (parts[1].rstrip("/") or "/") if len(parts) > 1 else None


def cmdline_postparse_configure(args: argparse.Namespace) -> argparse.Namespace:
    return common.configure_resources(args)


class BatchShellCmdsGenerator(common.BatchShellCmdsGenerator):
    def extra_argv_kwargs(self) -> dict[str, tp.Any]:
        return docker_argv_kwargs(self.cmdopts)


class ExpShellCmdsGenerator(common.ExpShellCmdsGenerator):
    def extra_argv_kwargs(self) -> dict[str, tp.Any]:
        return docker_argv_kwargs(self.cmdopts)


def execenv_check(cmdopts: types.Cmdopts) -> None:
    """``sierra-prefect check`` with the image and the extra mounts stage 2 will use.

    The SIERRA root mount is left out: it is made by this plugin, always well formed,
    and the root exists by stage 2.
    """
    extra: list[str] = []
    if cmdopts.get("docker_image"):
        extra += ["--image", str(cmdopts["docker_image"])]
    for m in cmdopts.get("docker_extra_mounts") or []:
        extra += ["--mount", str(m)]
    common.execenv_check(cmdopts, extra)


__all__ = [
    "BatchShellCmdsGenerator",
    "ExpShellCmdsGenerator",
    "cmdline_postparse_configure",
    "execenv_check",
]

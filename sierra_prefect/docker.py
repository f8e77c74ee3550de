"""Docker deployments: job variables for one flow run (image, mounts, user)."""

from __future__ import annotations

import os


def docker_job_variables(request, image: str | None, host_user: bool, mounts: list[str]) -> dict:
    """Job variables for a Docker flow run: the roots mounted at the same paths."""
    volumes = [f"{request.input_root}:{request.input_root}:rw",
               f"{request.scratch_root}:{request.scratch_root}:rw", *mounts]
    variables: dict = {"volumes": volumes}
    if image:
        variables["image"] = image
    if host_user:
        variables["user"] = f"{os.getuid()}:{os.getgid()}"
    return variables

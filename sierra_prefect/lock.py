"""Versions as ``uv.lock`` pins them: the one source the image, worker, client and tests use.

The lock can hold two versions of one package (the ``prefect-previous`` dependency group
pins the previous minor Prefect for the cross-version tests); ``locked_version`` answers
for this project's own dependencies unless asked for a group's.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from sierra_prefect.errors import ShimError

PROJECT_NAME = "sierra-prefect"


def locked_version(project_dir: Path, package: str = "prefect", group: str | None = None) -> str:
    """The version of ``package`` that ``uv.lock`` in ``project_dir`` pins for this project
    (or for its dependency group ``group``)."""
    path = project_dir / "uv.lock"
    try:
        lock = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ShimError(f"cannot read {path} ({exc}): restore it from git, or run `uv lock`") from exc
    entries = lock.get("package", [])
    project = next((p for p in entries if p["name"] == PROJECT_NAME), {})
    deps = project.get("dev-dependencies", {}).get(group, []) if group else project.get("dependencies", [])
    pinned = {d.get("version") for d in deps if d["name"] == package} - {None}
    # A package locked at one version only is not repeated in the project's entry.
    versions = pinned or {p["version"] for p in entries if p["name"] == package}
    if len(versions) != 1:
        where = f"group '{group}'" if group else PROJECT_NAME
        raise ShimError(f"{path} pins {len(versions)} versions of '{package}' for {where}: "
                        f"run `uv lock` in {project_dir}")
    return versions.pop()

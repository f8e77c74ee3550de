"""The deployments of ``prefect.yaml``: deploying them and finding them on a server.

Deploying is Prefect's own ``prefect --no-prompt deploy --all``, run from the project
directory, so what users type and what ``sierra-prefect up`` does are the same thing.
A digest of the deployed files lets ``up`` skip deploying when nothing changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from sierra_prefect import warm_engine
from sierra_prefect.errors import ShimError

FLOW_NAME = "sierra"


def declared(project_dir: Path) -> list[str]:
    """Full names (``flow/deployment``) of the deployments in prefect.yaml."""
    config = yaml.safe_load((project_dir / "prefect.yaml").read_text())
    return [f"{FLOW_NAME}/{d['name']}" for d in config.get("deployments", [])]


def digest(project_dir: Path) -> str:
    """What a deployment is made of: prefect.yaml, the flow code, the pool files."""
    files = [project_dir / "prefect.yaml"]
    files += sorted((project_dir / "flows").glob("*.py"))
    files += sorted((project_dir / "workpools").glob("*.yaml"))
    sha = hashlib.sha256()
    for path in files:
        sha.update(path.name.encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def missing(client, names: list[str]) -> list[str]:
    from prefect.exceptions import ObjectNotFound

    absent = []
    for name in names:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            absent.append(name)
    return absent


def deploy_all(project_dir: Path, env: dict[str, str], log: Path, warm: Path | None = None) -> None:
    """``prefect --no-prompt deploy --all`` in the project; its output goes to ``log``.

    Forked from the warm engine at ``warm`` when it answers (no second import of Prefect),
    else in a new Python."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--no-prompt", "deploy", "--all"]
    with open(log, "ab") as out, open(os.devnull, "rb") as nothing:
        code = warm_engine.run_forked(warm, argv, env, project_dir,
                                      (nothing.fileno(), out.fileno(), out.fileno()))
        if code is None:
            code = subprocess.run(
                [sys.executable, "-m", "prefect", *argv], cwd=project_dir, env=env,
                stdin=nothing, stdout=out, stderr=subprocess.STDOUT, timeout=300,
            ).returncode
    if code != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise ShimError(f"`prefect deploy --all` failed (see {log}): {tail}")

"""The deployments of ``prefect.yaml``: what they are made of, deploying them, finding them.

Deploying is Prefect's own ``prefect --no-prompt deploy --all``, run from the project
directory, so what users type and what ``sierra-prefect up`` does are the same thing. A
digest of the deployed files (``prefect.yaml``, ``flows/``, ``workpools/``) lets ``up``
skip deploying when nothing changed::

    deployments = Deployments(settings, state, say)
    deployments.is_current(connection)       # plain HTTP: digest unchanged, all present
    deployments.ensure(client, api_url, warm_socket)   # deploy if changed or missing
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from sierra_prefect import warm_engine
from sierra_prefect.connection import Connection
from sierra_prefect.digests import files_digest
from sierra_prefect.errors import ShimError
from sierra_prefect.private import open_private, private_dir
from sierra_prefect.settings import Settings, prefect_env
from sierra_prefect.state import StackState

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
    return files_digest(project_dir, files)


def missing(client, names: list[str]) -> list[str]:
    """Which of ``names`` the server behind the Prefect ``client`` does not have."""
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
    private_dir(log.parent)
    argv = ["--no-prompt", "deploy", "--all"]
    with open_private(log, "ab") as out, open(os.devnull, "rb") as nothing:
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


class Deployments:
    """The project's deployments on the stack's server; the digest of the last successful
    deploy is ``state.deployed_digest``."""

    def __init__(self, settings: Settings, state: StackState, say: Callable[[str], None]) -> None:
        self.settings, self.state, self.say = settings, state, say
        self.project = settings.require_project()
        self.names = declared(self.project)
        self.digest = digest(self.project)

    @property
    def code_changed(self) -> bool:
        """prefect.yaml, flows/ or workpools/ changed since the last deploy."""
        return self.state.deployed_digest != self.digest

    def is_current(self, connection: Connection) -> bool:
        """Deployed from these files and all present (plain HTTP: no Prefect import)."""
        return not self.code_changed and all(connection.has_deployment(n) for n in self.names)

    def ensure(self, client, api_url: str, warm: Path | None) -> None:
        """Deploy unless every deployment exists and the files are unchanged."""
        if not self.code_changed and not missing(client, self.names):
            self.say(f"deployments up to date: {', '.join(self.names)}")
            return
        log = self.settings.logs_dir / "deploy.log"
        self.say(f"deploying {', '.join(self.names)} (prefect deploy --all)")
        deploy_all(self.project, prefect_env(api_url, self.settings, **self.settings.client_env()),
                   log, warm)
        still = missing(client, self.names)
        if still:
            raise ShimError(f"deployments {', '.join(still)} missing after deploy: see {log}")
        self.state.deployed_digest = self.digest

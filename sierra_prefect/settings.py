"""Configuration of the shim: one pydantic settings model, from the environment.

Every value can be set as ``SIERRA_PREFECT_<NAME>`` (e.g. ``SIERRA_PREFECT_HOME``,
``SIERRA_PREFECT_PORT``); CLI flags override them. ``PREFECT_API_URL``, when set, points
the shim at an existing server instead of the embedded one. ``sierra-prefect status``
shows the values in force.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sierra_prefect import default_home
from sierra_prefect.errors import ShimError

DEFAULT_PORT = 4200


def _find_project_dir() -> Path:
    """The checkout holding prefect.yaml: the parent of this package (editable install)."""
    return Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIERRA_PREFECT_", extra="ignore", populate_by_name=True)

    home: Path = Field(
        default_factory=default_home,
        description="Where the embedded stack keeps its state, database and logs.",
    )
    project_dir: Path = Field(
        default_factory=_find_project_dir,
        description="The checkout with prefect.yaml, workpools/ and flows/.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Address the embedded server binds to; anything but loopback needs auth_string.",
    )
    database_url: SecretStr | None = Field(
        None,
        description=(
            "Database of the embedded server, e.g. postgresql+asyncpg://user:pw@127.0.0.1/prefect "
            "(default: SQLite under home)."
        ),
    )
    auth_string: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("SIERRA_PREFECT_AUTH_STRING", "PREFECT_API_AUTH_STRING"),
        description="'user:password' the server requires and the shim and workers send.",
    )
    port: int | Literal["auto"] | None = Field(
        None,
        description=(
            "Port of the embedded server: a number (it must be free), 'auto' (any free "
            f"port), or unset ({DEFAULT_PORT}, or a free port when that is taken)."
        ),
    )
    api_url: str | None = Field(
        None,
        validation_alias=AliasChoices("PREFECT_API_URL", "SIERRA_PREFECT_API_URL"),
        description="An existing Prefect server to use instead of the embedded one.",
    )
    worker_query_seconds: float = Field(
        0.5, description="How often the worker polls for flow runs (Prefect default 10): half "
        "of it is the mean wait before a triggered flow run starts."
    )
    base_image: str | None = Field(
        None, description="BASE_IMAGE for building the worker image (default: the Dockerfile's)."
    )
    docker_network_mode: str = Field(
        "host",
        description=(
            "Docker network of image builds and of the containers the shim starts itself "
            "(e.g. to ask an image its Prefect version). 'host' lets them reach a server "
            "bound to 127.0.0.1 and needs no Docker bridge; the Docker pool's own default "
            "is in workpools/sierra-docker-pool.yaml."
        ),
    )
    server_start_timeout: float = Field(120.0, description="Deadline for a healthy server.")
    worker_start_timeout: float = Field(60.0, description="Deadline for a worker online.")
    busy_deadline: float = Field(
        120.0, gt=0, description="How long `run` waits for a busy server (HTTP 503, no answer) "
        "before the flow run exists, showing why, before it fails with one line.",
    )

    @field_validator("home", "project_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def connect_host(self) -> str:
        """Where clients on this machine reach the server (a wildcard bind is local too)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    def require_safe_exposure(self) -> None:
        if not self.is_loopback() and not self.auth_string:
            raise ShimError(
                f"the server would listen on {self.host} without credentials: set "
                "SIERRA_PREFECT_AUTH_STRING='user:password' (or keep --host 127.0.0.1)"
            )

    def auth_secret(self) -> str | None:
        return self.auth_string.get_secret_value() if self.auth_string else None

    def server_env(self) -> dict[str, str]:
        env = {}
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url.get_secret_value()
        if self.auth_string:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth_secret()
        return env

    def client_env(self) -> dict[str, str]:
        return {"PREFECT_API_AUTH_STRING": self.auth_secret()} if self.auth_string else {}

    def public(self) -> dict:
        """The settings with credentials masked (for status output)."""
        values = self.model_dump(mode="json")
        if self.database_url:
            values["database_url"] = re.sub(
                r"//([^:/@]+):[^@]*@", r"//\1:***@", self.database_url.get_secret_value()
            )
        if self.auth_string:
            values["auth_string"] = "***"
        return values

    def require_project(self) -> Path:
        if not (self.project_dir / "prefect.yaml").is_file():
            raise ShimError(
                f"no prefect.yaml in '{self.project_dir}': set SIERRA_PREFECT_PROJECT_DIR "
                "to your sierra-prefect checkout"
            )
        return self.project_dir


def prefect_env(api_url: str | None, settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for Prefect processes we start: telemetry off, our PREFECT_HOME."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(settings.prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
    )
    # Processes get credentials only in the variables Prefect reads (see server_env, client_env).
    for name in ("SIERRA_PREFECT_AUTH_STRING", "SIERRA_PREFECT_DATABASE_URL"):
        env.pop(name, None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def venv_env(api_url: str, settings: Settings, **extra: str) -> dict[str, str]:
    """A Prefect client's environment with this venv first on PATH: workers' flow runs and
    the warm engine run `python -m ...` and must get this venv's Python."""
    env = prefect_env(api_url, settings, **settings.client_env(), **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env

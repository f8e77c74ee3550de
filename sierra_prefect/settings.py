"""Configuration of the shim: one pydantic settings model, from the environment.

Every value can be set as ``SIERRA_PREFECT_<NAME>`` (e.g. ``SIERRA_PREFECT_HOME``,
``SIERRA_PREFECT_PORT``); CLI flags override them. ``PREFECT_API_URL``, when set, points
the shim at an existing server instead of the embedded one. ``sierra-prefect status``
shows the values in force.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sierra_prefect import default_home
from sierra_prefect.connection import is_plain_http
from sierra_prefect.credential import CLIENT_ENV, FILE_NAME, Credential
from sierra_prefect.errors import ShimError
from sierra_prefect.private import private_dir
from sierra_prefect.redact import SECRET_ENV, Secrets, mask_url, scrub_env

# Where an explicit credential may come from, first found first (as the field reads them).
AUTH_STRING_ENV = ("SIERRA_PREFECT_AUTH_STRING", CLIENT_ENV)
# The shim's own secret settings: passed on to no process (each gets what it needs in the
# variables Prefect reads).
SHIM_SECRET_ENV = ("SIERRA_PREFECT_AUTH_STRING", "SIERRA_PREFECT_DATABASE_URL")

DEFAULT_PORT = 4200
SLURM_DEPLOYMENT = "sierra/slurm"  # prefect.yaml; its flow runs go to the allocation's queue


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
        description="Address the embedded server binds to (e.g. the host's address on the lab "
        "network, for workers on other hosts); every API call but health needs the stack's "
        "credential, on any address.",
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
        validation_alias=AliasChoices(*AUTH_STRING_ENV),
        description=(
            "'user:password' the server requires and the shim and workers send (default: "
            "the random one `up` keeps in home/auth-string)."
        ),
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
    slurm_worker_timeout: float = Field(
        90.0, gt=0, description="How long `slurm check` (prefectdeploy.slurm's stage 2 check) "
        "waits for one worker per node of the SLURM allocation.")
    worker_start_timeout: float = Field(60.0, description="Deadline for a worker online.")
    busy_deadline: float = Field(
        120.0, gt=0, description="How long `run` waits for a busy server (HTTP 503, no answer) "
        "before the flow run exists, showing why, before it fails with one line.",
    )
    # The credential in force, once read (see credential()).
    _credential: Credential | None = PrivateAttr(None)

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

    @property
    def auth_file(self) -> Path:
        """Where ``up`` keeps the stack's generated credential (mode 0600)."""
        return self.home / FILE_NAME

    def explicit_credential(self) -> Credential | None:
        """A credential given in the environment: ``SIERRA_PREFECT_AUTH_STRING``, or (for a
        server given by ``PREFECT_API_URL``) ``PREFECT_API_AUTH_STRING``. Without
        ``PREFECT_API_URL`` the latter is a client setting left over for some other server
        (a lab server's, or another stack's after ``eval "$(sierra-prefect env)"``), never
        this stack's."""
        if not self.auth_string:
            return None
        source = next((name for name in AUTH_STRING_ENV if os.environ.get(name)), AUTH_STRING_ENV[0])
        if source == CLIENT_ENV and not self.api_url:
            return None
        return Credential(self.auth_string.get_secret_value(), source)

    def credential(self) -> Credential | None:
        """The auth string the server requires and the shim, workers and the warm engine
        send: an explicit one (``explicit_credential``) wins; else, for the embedded server,
        the one ``up`` keeps in the home. None before the first ``up``, and for someone
        else's server (``PREFECT_API_URL``) unless given: this home's credential is never
        sent to another server."""
        if self._credential is None:
            self._credential = self.explicit_credential()
            if self._credential is None and not self.api_url:
                self._credential = Credential.read(self.auth_file)
        return self._credential

    def ensure_credential(self) -> Credential:
        """The credential, made (once, at random) if the stack has none: ``up`` does this."""
        if self.credential() is None:
            self._credential = Credential.create(self.auth_file)
        return self._credential

    def auth_secret(self) -> str | None:
        credential = self.credential()
        return credential.value if credential else None

    def server_env(self) -> dict[str, str]:
        env = {}
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url.get_secret_value()
        if secret := self.auth_secret():
            env["PREFECT_SERVER_API_AUTH_STRING"] = secret
        return env

    def client_env(self) -> dict[str, str]:
        secret = self.auth_secret()
        return {CLIENT_ENV: secret} if secret else {}

    def secrets(self) -> Secrets:
        """The stack's secrets (credential, database URL) and those in this environment."""
        database = self.database_url.get_secret_value() if self.database_url else None
        return Secrets.in_environment(os.environ, self.auth_secret(), database)

    def masked_database(self) -> str | None:
        return mask_url(self.database_url.get_secret_value()) if self.database_url else None

    def public(self) -> dict:
        """The settings with credentials masked (for status output)."""
        values = self.model_dump(mode="json")
        values["database_url"] = self.masked_database()
        values["auth_string"] = "***" if self.explicit_credential() else None
        return values

    def require_project(self) -> Path:
        if not (self.project_dir / "prefect.yaml").is_file():
            raise ShimError(
                f"no prefect.yaml in '{self.project_dir}': set SIERRA_PREFECT_PROJECT_DIR "
                "to your sierra-prefect checkout"
            )
        return self.project_dir


def prefect_env(api_url: str | None, settings: Settings, server: bool = False,
                **extra: str) -> dict[str, str]:
    """Environment for Prefect processes we start: telemetry off, our PREFECT_HOME.

    Processes get secrets only in the variables Prefect reads (``extra``: see server_env,
    client_env). A client (a worker, the warm engine, a deploy; ``server`` False) gets none
    of the caller's: no variable named for one (``SECRET_ENV``) or holding one (the
    credential, the database URL or its password), so flow runs cannot pass them on."""
    if server:  # it may need the user's own PREFECT_API_DATABASE_* settings
        env = {k: v for k, v in os.environ.items() if k not in SHIM_SECRET_ENV}
    else:
        env, _ = scrub_env(os.environ, settings.secrets(), SECRET_ENV)
    env.update(
        PREFECT_HOME=str(settings.prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


# Prefect reads its clients' CA certificates from it (see plain_http_ca_file).
CA_FILE_ENV = "PREFECT_API_SSL_CERT_FILE"


def venv_env(api_url: str, settings: Settings, *, on_this_host: bool = False,
             **extra: str) -> dict[str, str]:
    """A Prefect client's environment with this venv first on PATH: workers' flow runs and
    the warm engine run `python -m ...` and must get this venv's Python.

    ``on_this_host``: the process and the flow runs it starts run here (a process worker, the
    warm engine, a SLURM worker), so they may be given a file of this host: the CA file of
    ``plain_http_ca_file``, in their Prefect home."""
    env = prefect_env(api_url, settings, **settings.client_env(), **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if on_this_host and is_plain_http(api_url) and not env.get(CA_FILE_ENV):
        env[CA_FILE_ENV] = str(plain_http_ca_file(Path(env["PREFECT_HOME"])))
    return env


def plain_http_ca_file(directory: Path) -> Path:
    """A CA file of one certificate in ``directory`` for Prefect clients of a plain-HTTP API.

    Every Prefect client builds an SSL context from ``PREFECT_API_SSL_CERT_FILE`` (default:
    certifi's bundle of ~140 certificates, ~20 ms to load here), even for an ``http://``
    API that never uses it; a flow run builds five or six (the engine, its log and event
    workers, its observers): py-spy put ~0.2 s of each trigger there. One certificate
    loads in 0.4 ms. It is certifi's first root, so a client that did use TLS with it would
    refuse other servers (fail closed), never trust more."""
    path = private_dir(directory) / "plain-http-ca.pem"
    if not path.is_file():
        import certifi

        bundle = Path(certifi.where()).read_text()
        end = "-----END CERTIFICATE-----"
        start = bundle.index("-----BEGIN CERTIFICATE-----")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(bundle[start:bundle.index(end, start) + len(end)] + "\n")
        tmp.replace(path)  # atomic: concurrent writers leave one whole file
    return path

"""How the shim talks to a Prefect server: its API URL and, when set, its auth string.

Every Prefect client the shim makes and every plain HTTP call it sends goes through a
``Connection``, so the credential (Prefect's ``PREFECT_API_AUTH_STRING``; for the embedded
server, the stack's own: ``sierra_prefect/credential.py``) is sent wherever needed and
printed nowhere.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property

import httpx

from sierra_prefect.errors import ShimError


@dataclass(frozen=True)
class Connection:
    api_url: str
    auth_string: str | None = None

    def __repr__(self) -> str:  # never show the credentials
        return f"Connection({self.api_url!r}, auth={'yes' if self.auth_string else 'no'})"

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def headers(self) -> dict[str, str]:
        if not self.auth_string:
            return {}
        token = base64.b64encode(self.auth_string.encode()).decode()
        return {"Authorization": f"Basic {token}"}

    @contextmanager
    def client(self) -> Iterator[object]:
        """A sync Prefect client for this server (never an ephemeral one)."""
        from prefect.client.orchestration import get_client

        with self.prefect_settings():
            with get_client(sync_client=True, httpx_settings=self._httpx_settings()) as client:
                yield client

    @contextmanager
    def prefect_settings(self, more: dict | None = None) -> Iterator[None]:
        """Prefect's own helpers (e.g. run_deployment) pointed at this server, with ``more``
        Prefect settings (``{setting: value}``) in the same step; none is taken when they
        already hold."""
        import prefect.context
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

        wanted = {PREFECT_API_URL: self.api_url, PREFECT_API_AUTH_STRING: self.auth_string,
                  **(more or {})}
        if all(setting.value() == value for setting, value in wanted.items()):
            yield
            return
        context = prefect.context.get_settings_context()
        with prefect.context.SettingsContext(profile=context.profile,
                                             settings=_updated(context.settings, wanted)):
            yield

    def _httpx_settings(self) -> dict | None:
        """Plain HTTP needs no TLS, yet Prefect's client loads the CA bundle into a new SSL
        context for every client unless given one (~20 ms each here): give it one, unused."""
        if not is_plain_http(self.api_url):
            return None  # https: Prefect's own verification, untouched
        return {"verify": _unused_tls_context()}

    @cached_property
    def _http(self) -> httpx.Client:
        """One plain HTTP client per connection: a new one per call costs ~25 ms here (its
        SSL context), a trigger's largest cost before the flow run exists."""
        verify = _unused_tls_context() if is_plain_http(self.api_url) else True
        return httpx.Client(headers=self.headers(), verify=verify)

    def is_healthy(self, timeout: float = 2.0) -> bool:
        try:
            return self._http.get(f"{self.api_url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def require_healthy(self) -> None:
        if not self.is_healthy(timeout=5.0):
            raise ShimError(
                f"Prefect server at {self.api_url} is unreachable: start it with "
                "`sierra-prefect up` or fix PREFECT_API_URL"
            )

    def server_version(self) -> str | None:
        """The server's Prefect version; ShimError if it refuses our credentials."""
        try:
            response = self._http.get(f"{self.api_url}/admin/version", timeout=5.0)
        except httpx.HTTPError:
            return None
        if response.status_code == 401:
            raise ShimError(
                f"Prefect server at {self.api_url} refused the credentials: set "
                "PREFECT_API_AUTH_STRING (or SIERRA_PREFECT_AUTH_STRING) to its auth string"
            )
        return response.json() if response.status_code == 200 else None

    def is_open(self) -> bool:
        """Whether the server answers an API route to a client without credentials (a
        server with an auth string answers 401 to all but /health and /ready)."""
        try:
            return httpx.get(f"{self.api_url}/admin/version", timeout=5.0).status_code != 401
        except httpx.HTTPError:
            return False

    def has_deployment(self, name: str) -> bool:
        """Whether deployment ``flow/name`` exists: one plain GET, so a warm ``up`` need
        not import Prefect (about 2 s here). False also when the server does not say."""
        try:
            response = self._http.get(f"{self.api_url}/deployments/name/{name}", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


def is_plain_http(api_url: str) -> bool:
    """No TLS: Prefect's clients need no CA certificates for it."""
    return api_url.startswith("http://")


def _updated(settings, updates: dict):
    """Prefect's ``settings`` with ``updates`` ({setting: value}), each value checked against
    its own field. Prefect's ``temporary_settings`` re-reads and re-validates every setting
    for a change of two: ~60 ms per call here (py-spy of `sierra-prefect check`), paid by
    every check and trigger."""
    for setting, value in updates.items():
        settings = _replaced(settings, setting.accessor.split("."), value)
    return settings


def _replaced(model, path: list[str], value):
    from pydantic import TypeAdapter

    head, *rest = path
    if rest:
        new = _replaced(getattr(model, head), rest, value)
    else:
        new = TypeAdapter(type(model).model_fields[head].annotation).validate_python(value)
    return model.model_copy(update={head: new})


@cache
def _unused_tls_context():
    import ssl

    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

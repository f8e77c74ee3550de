"""Which Prefect versions may work together, and the one line that says why not.

A shared server is upgraded on its own schedule, so the client (``sierra-prefect run`` /
``check``), the flow run (a worker's venv or a Docker image) and the server can differ.
Use it like this::

    from sierra_prefect.versions import check_versions
    check_versions(client_version, server_version, api_url=url)          # ShimError if not
    check_versions(client_version, server_version, api_url=url,
                   image=tag, image_version=docker.image_prefect_version(tag))  # Docker

The rule: versions with the same major.minor work together (patch releases of Prefect
keep the client/server API); a different minor is refused before anything runs. Why not
let a newer client proceed: measured here, a client and flow run of uv.lock's minor did
complete a small batch against a server of the previous minor, but Prefect itself warns
on every connection that a client newer than its server "may result in unexpected
behavior", and a minor release may add API fields an older server rejects mid-batch
(after half the runs have run). A refusal up front, naming the versions and the fix, is
cheaper than that.

Only the standard library and ``packaging`` (a dependency of Prefect) are imported: the
flow imports this module too, before any run starts.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from sierra_prefect.errors import ShimError


class VersionMismatch(ShimError):
    """Prefect versions that may not work together; the message names them and the fix."""


def minor(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string, None if it is not a version."""
    try:
        release = Version(version).release
    except InvalidVersion:
        return None
    return (release[0], release[1] if len(release) > 1 else 0)


def compatible(a: str | None, b: str | None) -> bool:
    """Same major.minor: patch differences are fine, anything else is not."""
    return a is not None and b is not None and minor(a) is not None and minor(a) == minor(b)


def _series(version: str) -> str:
    found = minor(version)
    return f"{found[0]}.{found[1]}.x" if found else version


# What to change when ``who`` (the side that is not the server) has another minor.
_FIX = {
    "client": "use a client",
    "flow run": "start the worker from a venv, or build the image,",
}


def mismatch(client_version: str, server_version: str | None, *, api_url: str | None = None,
             image: str | None = None, image_version: str | None = None,
             who: str = "client") -> str | None:
    """The one-line reason these versions must not run a batch, or None if they may.

    ``who`` is the side compared with the server: "client" (the shim) or "flow run".
    """
    server = f"server {server_version}" + (f" at {api_url}" if api_url else "")
    if server_version is None:
        return (f"the Prefect server{' at ' + api_url if api_url else ''} did not report its "
                f"version (GET /api/admin/version): check PREFECT_API_URL points at a Prefect 3 server")
    if not compatible(client_version, server_version):
        return (f"Prefect versions differ: {who} {client_version}, {server}"
                + (f", image {image} has {image_version}" if image and image_version else "")
                + f": {_FIX.get(who, _FIX['client'])} of the server's version (Prefect "
                f"{_series(server_version)}, e.g. from a sierra-prefect checkout whose uv.lock pins "
                f"it) or upgrade the server to {_series(client_version)}")
    if image is not None and not compatible(image_version, server_version):
        return (f"Prefect versions differ: image {image} has {image_version}, {who} "
                f"{client_version}, {server}: build the image for the server's version "
                f"(Prefect {_series(server_version)}: `sierra-prefect image build` from a checkout "
                f"whose uv.lock pins it) or pass --image with one that has it")
    return None


def check_versions(client_version: str, server_version: str | None, *, api_url: str | None = None,
                   image: str | None = None, image_version: str | None = None) -> None:
    """Raise VersionMismatch (one line: versions and the fix) unless they may work together."""
    reason = mismatch(client_version, server_version, api_url=api_url, image=image,
                      image_version=image_version)
    if reason:
        raise VersionMismatch(reason)

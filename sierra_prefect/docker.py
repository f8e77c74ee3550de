"""Docker deployments: the worker image and per-run job variables.

Use::

    build_image(project, DEFAULT_TAG)               # `sierra-prefect image build`
    image_is_current(DEFAULT_TAG, project)          # built from this checkout? (`up --docker`)
    image_prefect_version(DEFAULT_TAG)              # asked from the image itself
    job_variables(input_root, scratch_root, image, host_user, mounts)   # one flow run

The image is built from the top-level ``Dockerfile`` with the Prefect version of
``uv.lock`` (the build fails if what it installed differs) and labelled with a digest of
what it bakes in. Builds and the containers the shim runs itself use the
``docker_network_mode`` setting (``SIERRA_PREFECT_DOCKER_NETWORK_MODE``, default host);
flow-run containers get the pool's ``network_mode`` (workpools/sierra-docker-pool.yaml).
Whether the image's Prefect may work with the client and server is sierra_prefect/versions.py's
question.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from functools import lru_cache
from pathlib import Path

from sierra_prefect.digests import files_digest
from sierra_prefect.errors import ShimError
from sierra_prefect.lock import locked_version

DEFAULT_TAG = "sierra-prefect/worker:latest"


class DockerUnavailable(ShimError):
    """No Docker engine answers where the shim runs."""


def _network_mode(network_mode: str | None) -> str:
    """The Docker network of what the shim builds and runs itself (a setting)."""
    if network_mode:
        return network_mode
    from sierra_prefect.settings import Settings

    return Settings().docker_network_mode


def _docker():
    import docker

    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as exc:
        raise DockerUnavailable(
            "the Docker engine is not reachable (" + str(exc).splitlines()[0][:120] + "): start "
            "the Docker daemon (e.g. `sudo systemctl start docker`) or point DOCKER_HOST at one"
        ) from None


SOURCE_DIGEST_LABEL = "org.sierra-prefect.source-digest"


def source_digest(project_dir: Path) -> str:
    """Digest of what the image bakes in: the lock, the flow code and the shim."""
    files = [project_dir / "pyproject.toml", project_dir / "uv.lock", project_dir / "Dockerfile"]
    for folder in ("flows", "sierra_prefect"):
        files += sorted((project_dir / folder).glob("*.py"))
    return files_digest(project_dir, files)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_is_current(tag: str, project_dir: Path) -> bool:
    """The image exists and was built from this checkout's code."""
    import docker

    try:
        image = _docker().images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return (image.labels or {}).get(SOURCE_DIGEST_LABEL) == source_digest(project_dir)


def build_image(project_dir: Path, tag: str = DEFAULT_TAG, base_image: str | None = None,
                log: Path | None = None, network_mode: str | None = None) -> None:
    """``docker build`` of the project's Dockerfile, versions from the lock, on the network
    ``network_mode`` (default: the ``docker_network_mode`` setting)."""
    import docker

    client = _docker()
    try:
        previous = client.images.get(tag).id
    except docker.errors.ImageNotFound:
        previous = None
    argv = ["docker", "build", "--network", _network_mode(network_mode), "-t", tag,
            "--build-arg", f"PREFECT_VERSION={locked_version(project_dir)}",
            "--build-arg", f"UV_LOCK_SHA256={_sha256(project_dir / 'uv.lock')}",
            "--build-arg", f"SOURCE_DIGEST={source_digest(project_dir)}"]
    if base_image:
        argv += ["--build-arg", f"BASE_IMAGE={base_image}"]
    argv.append(str(project_dir))
    out = open(log, "ab") if log else None
    try:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL)
    finally:
        if out:
            out.close()
    if result.returncode != 0:
        where = f" (see {log})" if log else ""
        raise ShimError(
            f"building image {tag} failed{where}: fix the error above, or pass "
            "--base-image with a reachable Python 3.11 image"
        )
    if previous and client.images.get(tag).id != previous:
        try:  # the image this tag named before: 400 MB that nothing names any more
            client.images.remove(previous)
        except docker.errors.APIError:
            pass  # still used by a container, or by another tag


@lru_cache(maxsize=16)
def image_prefect_version(tag: str) -> str:
    """Ask the image itself which Prefect it has (labels can be inherited and lie)."""
    import docker

    client = _docker()
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        raise ShimError(
            f"image '{tag}' is not on the Docker engine: build it with "
            f"`sierra-prefect image build --tag {tag}`"
        ) from None
    output = client.containers.run(
        tag,
        ["python", "-c", "import importlib.metadata as m; print(m.version('prefect'))"],
        network_mode=_network_mode(None), remove=True, environment={"PREFECT_HOME": "/tmp/.prefect"},
    )
    return output.decode().strip()


# Docker's SRC:DST[:MODE] has no escape for ':' (and prefect-docker validates volumes as that).
_NO_COLON = "a path holding ':' cannot be mounted: Docker's SRC:DST[:MODE] has no escape for it"


def parse_mount(text: str) -> str:
    """``SRC:DST[:ro|rw]`` with an existing absolute SRC, as Docker's -v takes it."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        why = f" ({_NO_COLON})" if len(parts) > 3 or (len(parts) == 3 and "/" in parts[2]) else ""
        raise ShimError(f"--mount '{text}' is not SRC:DST[:ro|rw]{why}: e.g. --mount /data:/data:ro")
    if not Path(parts[0]).is_absolute() or not Path(parts[0]).exists():
        raise ShimError(
            f"--mount source '{parts[0]}' does not exist (or is relative): create it or fix the path"
        )
    if not Path(parts[1]).is_absolute():
        raise ShimError(f"--mount destination '{parts[1]}' is relative: give the path inside the "
                        f"container, e.g. --mount {parts[0]}:/{parts[1]}")
    return text if len(parts) == 3 else f"{text}:rw"


def job_variables(input_root: str, scratch_root: str, image: str | None, host_user: bool,
                  mounts: list[str]) -> dict:
    """Job variables for one Docker flow run: the roots mounted at the same paths."""
    for option, root in (("--input-root", input_root), ("--scratch-root", scratch_root)):
        if ":" in root:
            raise ShimError(f"{option} '{root}' holds ':' and so cannot be mounted into the "
                            f"container ({_NO_COLON}): rename or move the directory")
    volumes = [f"{input_root}:{input_root}:rw", f"{scratch_root}:{scratch_root}:rw", *mounts]
    variables: dict = {"volumes": list(dict.fromkeys(volumes))}
    if image:
        variables["image"] = image
    if host_user:
        # The Docker worker has no `user` job variable; docker-py's create() takes it.
        variables["container_create_kwargs"] = {"user": f"{os.getuid()}:{os.getgid()}"}
    return variables

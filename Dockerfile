# The sierra-prefect worker / flow-run image: Prefect, prefect-docker and this project, at exactly
# the versions of uv.lock (the one source of truth: no version is written here), with the flow
# code baked in at /opt/sierra-prefect.
#
#   docker build --network host \
#       --build-arg PREFECT_VERSION="$(python3 -c 'import tomllib; print(next(p["version"] for p in tomllib.load(open("uv.lock", "rb"))["package"] if p["name"] == "prefect"))')" \
#       -t sierra-prefect/worker:latest .
#
# PREFECT_VERSION is required: it becomes the label org.sierra-prefect.prefect-version, and the
# build fails unless it equals the Prefect version actually installed from uv.lock, so the label
# cannot drift from the lock. Optional UV_LOCK_SHA256 (sha256 of uv.lock) becomes the label
# org.sierra-prefect.uv-lock-sha256, checked the same way.
#
# BASE_IMAGE: any Debian-like image with Python 3.11, python3 -m venv and a CA bundle at
# /etc/ssl/certs/ca-certificates.crt: the official slim image by default; where Docker Hub is out
# of reach, scripts/build-base-image.sh makes sierra-prefect/base:bookworm offline.
#
# pip uses the image's system CA bundle (so a CA added to the base image's trust store, e.g. a
# TLS-intercepting proxy's, is honoured) unless PIP_CERT is passed; PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL and PIP_TRUSTED_HOST may be passed as build args for a private index.
# None of them ends up in the image's environment.
#
# The project's Prefect worker types (`prefect worker start --type sierra-docker`, the compose
# worker of docs/docker.md) come with it: the build fails if Prefect cannot find them.
#
# Runs as uid 1000 (`sierra`) by default; `--user UID:GID` works too: HOME and PREFECT_HOME are
# under /tmp, writable for any uid. Only the legacy builder's syntax is used (no RUN --mount, no
# heredocs), so it builds with and without BuildKit.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Optional pass-through of pip settings for the build only (empty = unset).
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ARG PIP_CERT=""
# Optional pin of the uv used only to read the lock (uv is not kept in the image).
ARG UV_VERSION=""

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# 1. The locked dependencies: this layer is rebuilt only when pyproject.toml or uv.lock change.
#    uv turns the lock into a requirements file with hashes (no resolution: --frozen), pip
#    installs exactly that (--no-deps --require-hashes), and pip check verifies the result.
COPY pyproject.toml uv.lock /tmp/sierra-prefect-lock/
RUN set -eu; \
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_CERT; do \
        eval "[ -n \"\${$v:-}\" ] || unset $v"; \
    done; \
    if [ -z "${PIP_CERT:-}" ] && [ -s /etc/ssl/certs/ca-certificates.crt ]; then \
        export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; \
    fi; \
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1; \
    python3 -m venv /tmp/uv-venv; \
    /tmp/uv-venv/bin/pip install --quiet "uv${UV_VERSION:+==$UV_VERSION}"; \
    /tmp/uv-venv/bin/uv export --project /tmp/sierra-prefect-lock --frozen --no-dev \
        --no-emit-project --format requirements-txt --output-file /tmp/requirements.txt >/dev/null; \
    python3 -m venv "$VIRTUAL_ENV"; \
    pip install --quiet --no-deps --require-hashes -r /tmp/requirements.txt; \
    pip check; \
    /tmp/uv-venv/bin/uv export --project /tmp/sierra-prefect-lock --frozen --no-dev \
        --no-emit-project --no-hashes --no-header --no-annotate --format requirements-txt \
        --output-file "$VIRTUAL_ENV/sierra-prefect-constraints.txt" >/dev/null; \
    rm -rf /tmp/uv-venv /tmp/requirements.txt /tmp/sierra-prefect-lock
# Every later `pip install` (here and in derived images) keeps the locked versions; a package
# that needs other versions fails to resolve instead of silently replacing them. A derived image
# that really wants to leave the lock sets PIP_CONSTRAINT="" (see docs/docker.md).
ENV PIP_CONSTRAINT=/opt/venv/sierra-prefect-constraints.txt

# 2. The label is only as good as the check: the build fails unless PREFECT_VERSION is the
#    version installed from the lock.
ARG PREFECT_VERSION=""
ARG UV_LOCK_SHA256=""
# Digest of the code baked in below (see sierra_prefect/docker.py: source_digest); lets
# `sierra-prefect up --docker` rebuild an image whose flow code is stale.
ARG SOURCE_DIGEST=""
COPY uv.lock /tmp/uv.lock
RUN set -eu; \
    installed="$(python -c 'import importlib.metadata as m; print(m.version("prefect"))')"; \
    if [ "${PREFECT_VERSION:-}" != "$installed" ]; then \
        echo "error: build arg PREFECT_VERSION='${PREFECT_VERSION:-}' but uv.lock installed prefect $installed;" \
             "build with --build-arg PREFECT_VERSION=$installed" >&2; \
        exit 1; \
    fi; \
    if [ -n "${UV_LOCK_SHA256:-}" ]; then \
        echo "$UV_LOCK_SHA256  /tmp/uv.lock" | sha256sum -c --quiet - || { \
            echo "error: build arg UV_LOCK_SHA256 is not the sha256 of uv.lock:" \
                 "$(sha256sum /tmp/uv.lock | cut -d' ' -f1)" >&2; exit 1; }; \
    fi; \
    rm -f /tmp/uv.lock
LABEL org.sierra-prefect.prefect-version="${PREFECT_VERSION}" \
      org.sierra-prefect.uv-lock-sha256="${UV_LOCK_SHA256}" \
      org.sierra-prefect.source-digest="${SOURCE_DIGEST}" \
      org.opencontainers.image.title="sierra-prefect worker" \
      org.opencontainers.image.description="SIERRA experimental runs on Prefect: flow code at /opt/sierra-prefect"

# 3. A non-root user; HOME and PREFECT_HOME under /tmp so that any --user UID:GID can write them.
RUN set -eu; \
    groupadd --gid 1000 sierra; \
    useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /bin/sh sierra; \
    chmod 1777 /tmp
ENV HOME=/tmp \
    PREFECT_HOME=/tmp/.prefect \
    PREFECT_UI_STATIC_DIRECTORY=/tmp/.prefect/ui

# 4. The project itself (.dockerignore keeps out .venv, .git, caches, tests, outputs), with the
#    flow code at a fixed path, the working directory of deployments that run in this image.
WORKDIR /opt/sierra-prefect
COPY . /opt/sierra-prefect
RUN set -eu; \
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_CERT; do \
        eval "[ -n \"\${$v:-}\" ] || unset $v"; \
    done; \
    if [ -z "${PIP_CERT:-}" ] && [ -s /etc/ssl/certs/ca-certificates.crt ]; then \
        export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; \
    fi; \
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1; \
    if [ -f pyproject.toml ] && [ -d sierra_prefect ]; then \
        pip install --quiet --no-deps .; \
        rm -rf build ./*.egg-info; \
    else \
        echo "note: no sierra_prefect/ package in the build context; installing dependencies only" >&2; \
    fi; \
    pip check; \
    PREFECT_HOME=/tmp/prefect-build-check prefect version >/dev/null; \
    if [ -d sierra_prefect ]; then \
        PREFECT_HOME=/tmp/prefect-build-check python -c "from prefect.workers.base import BaseWorker as W; \
import sys; missing = [t for t in ('sierra-process', 'sierra-docker') if W.get_worker_class_from_type(t) is None]; \
sys.exit(f'error: worker types {missing} are not registered (entry point prefect.collections)' if missing else 0)"; \
    fi; \
    rm -rf /tmp/prefect-build-check; \
    chmod -R a+rX /opt/sierra-prefect

USER 1000:1000
CMD ["prefect", "version"]

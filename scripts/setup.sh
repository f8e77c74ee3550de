#!/usr/bin/env bash
# Set up the project environment (.venv) from uv.lock: the one source of versions.
#   scripts/setup.sh          runtime only (enough for the demo and for users)
#   scripts/setup.sh --test   plus the test groups and the system packages the tests use
#
# Environment:
#   SIERRA_PREFECT_PYTHON   the interpreter (default: the first python3.11 ... 3.15 found)
#   UV_PROJECT_ENVIRONMENT  the venv (default .venv), as uv reads it
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

groups=()
if [[ "${1:-}" == "--test" ]]; then
    groups=(--group test --group sierra --group bench)
    # GNU parallel (SIERRA's hpc.local baseline), a Docker engine, debootstrap for an
    # offline base image, docker-compose for pytest-docker, PostgreSQL for scale tests,
    # Chromium to look at the Prefect UI as a user would, SLURM and munge for a real
    # single-node cluster (tests/slurm_support.py), iproute2 (`ip netns`) for test hosts on
    # a network (tests/netns_support.py).
    apt_install parallel docker.io containerd runc debootstrap docker-compose postgresql chromium \
        slurm-wlm munge iproute2
fi

python=${SIERRA_PREFECT_PYTHON:-$(find_python 3.11 3.12 3.13 3.14 3.15)} ||
    { echo "setup: no Python 3.11 to 3.15 found: install one, or set SIERRA_PREFECT_PYTHON" >&2; exit 1; }
uv_sync --python "$python" "${groups[@]}"

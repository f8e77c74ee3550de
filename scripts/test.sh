#!/usr/bin/env bash
# Set up with the test extras (system packages too), then run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k stack -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# Test files in parallel, each file in one process (its fixtures and stacks stay together).
exec .venv/bin/python -m pytest -n "${SIERRA_PREFECT_TEST_PROCESSES:-3}" --dist loadfile "$@"

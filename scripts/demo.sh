#!/usr/bin/env bash
# Set up, then run the demo on the embedded stack (local server, SQLite, process worker).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/sierra-prefect demo "$@"

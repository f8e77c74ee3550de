#!/usr/bin/env bash
# Set up with the test groups (system packages too), check the tree with ruff, then run the
# whole test suite on Python 3.11, and its core again on the other Pythons we support: the
# flow and the stack on 3.12 and 3.13, SIERRA end to end on 3.12 (SIERRA pins numpy<2.0,
# which has no wheel for 3.13). Extra arguments go to every pytest run, e.g.
#   scripts/test.sh -k stack -x
# Under CI=true a missing part (an interpreter, Docker, PostgreSQL, ...) fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
scripts/setup.sh --test

# The previous minor Prefect (uv.lock's prefect-previous group), in a venv of its own, for
# the tests against a server of another version (tests/test_versions.py).
UV_PROJECT_ENVIRONMENT=.venv-prefect-previous uv_sync --only-group prefect-previous \
    --no-install-project --quiet --python "$(find_python 3.11)"

.venv/bin/ruff check .

core=(tests/test_plan.py tests/test_flow.py tests/test_stack.py tests/test_warm_engine_unit.py
      tests/test_versions.py)
sierra=(tests/test_sierra_plugins_unit.py tests/test_sierra_e2e.py)
failed=()

# Test files in parallel, each file in one process (its fixtures and stacks stay together).
.venv/bin/python -m pytest -n "${SIERRA_PREFECT_TEST_PROCESSES:-3}" --dist loadfile "$@" ||
    failed+=("Python 3.11: the whole suite")

# The other Pythons: set up one after the other, then both suites at once (each is small;
# together they take about the time of the longer one). Their output is printed in order.
pending=()
logs=$(mktemp -d)
for spec in "3.12:test sierra" "3.13:test"; do
    version=${spec%%:*}
    read -ra groups <<<"${spec#*:}"
    files=("${core[@]}")
    [[ " ${groups[*]} " == *" sierra "* ]] && files+=("${sierra[@]}")
    if ! python=$(find_python "$version"); then
        if [[ "${CI:-}" == "true" ]]; then
            failed+=("Python $version: no interpreter found (pyenv install $version, or put python$version on PATH)")
        else
            echo "test: Python $version not found: its run is left out (under CI=true this fails)" >&2
        fi
        continue
    fi
    venv=.venv-py$version
    group_args=(); for g in "${groups[@]}"; do group_args+=(--group "$g"); done
    UV_PROJECT_ENVIRONMENT=$venv uv_sync --quiet --python "$python" "${group_args[@]}" ||
        { failed+=("Python $version: uv sync into $venv failed (run it by hand to see why)"); continue; }
    { echo "== Python $version: ${files[*]}"
      "$venv/bin/python" -m pytest -n 2 --dist loadfile "$@" "${files[@]}" ||
          echo "Python $version: ${files[*]}" > "$logs/failed-$version"
    } > "$logs/$version.log" 2>&1 &
    pending+=("$version")
done
wait
for version in "${pending[@]}"; do
    cat "$logs/$version.log"
    [[ -f "$logs/failed-$version" ]] && failed+=("$(cat "$logs/failed-$version")")
done
rm -rf "$logs"

if ((${#failed[@]})); then
    printf 'test: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi

"""Fixtures: real Prefect stacks brought up with the shim, as a user would.

``stack`` is one embedded stack (server + pools + deployments + process worker) for the
whole session, in a temp SIERRA_PREFECT_HOME on a free loopback port; tests that don't
disturb it share it. ``fresh_stack`` gives a test its own stack to break. The Docker,
PostgreSQL, SIERRA and real-user fixtures come from the support plugins below.
Nothing here kills by name: stacks are brought down with ``sierra-prefect down``.
"""

from __future__ import annotations

import pytest

from tests.helpers import StackHandle, bring_up

pytest_plugins = ["tests.docker_support", "tests.postgres_support", "tests.ci_support",
                  "tests.users_support", "tests.slurm_support"]


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> StackHandle:
    handle = bring_up(tmp_path_factory.mktemp("stack-home"))
    yield handle
    handle.cli("down", timeout=120)


@pytest.fixture
def fresh_stack(tmp_path) -> StackHandle:
    handle = bring_up(tmp_path / "home")
    yield handle
    handle.cli("down", timeout=120)


@pytest.fixture
def prefect_api(stack):
    """Point in-process Prefect code (the flow called directly, the client) at ``stack``,
    with its credential and its Prefect home: flows called here share the CPUs of the stack's own flow runs
    (flows/sierra_batch.py:cpu_lock_dir), not those of other pytest workers."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api_url,
                             PREFECT_API_AUTH_STRING: stack.auth_string,
                             PREFECT_HOME: str(stack.home / "prefect")}):
        yield stack.api_url

"""Under ``CI=true`` a skipped test is a failed test.

The suite skips a test only where a part it needs is missing on a developer's machine (no
Docker engine, no PostgreSQL, not root, no Python 3.12). On CI every part must be there, so
a skip there means a broken install step: this plugin turns it into a failure that names
the missing part, instead of a green run that tested less.
"""

from __future__ import annotations

import os

import pytest

STRICT = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every part must be present: {reason}"

"""scripts/setup.sh, as a user runs it: a second run reuses the venv the first one made.

It once removed and rebuilt `.venv` on every run from a login shell, where pyenv's shims
come first on PATH (uv saw the shim, not the venv's interpreter). Here both runs go into a
venv of their own (UV_PROJECT_ENVIRONMENT), with pyenv's shims first on PATH where pyenv is.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.helpers import PROJECT


def _setup(venv: Path) -> subprocess.CompletedProcess:
    shims = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "shims"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv),
           "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(["bash", str(PROJECT / "scripts" / "setup.sh")], env=env,
                          capture_output=True, text=True, timeout=600)


def test_second_setup_reuses_the_venv(tmp_path):
    venv = tmp_path / "venv"
    first = _setup(venv)
    assert first.returncode == 0, first.stderr
    marker = venv / "pyvenv.cfg"
    made = marker.stat()
    second = _setup(venv)
    assert second.returncode == 0, second.stderr
    assert "Removed virtual environment" not in second.stderr + second.stdout
    again = marker.stat()
    assert (again.st_ino, again.st_mtime_ns) == (made.st_ino, made.st_mtime_ns), "venv was rebuilt"
    assert (venv / "bin" / "sierra-prefect").exists()

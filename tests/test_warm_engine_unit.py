"""Pure logic of the warm engine (sierra_prefect/warm_engine.py); the engine itself is
exercised end to end by the stack tests (tests/test_stack.py)."""

from __future__ import annotations

import importlib
import os
import sys
import time

from sierra_prefect import warm_engine


def _package(root, name: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    (root / name / "plan.py").write_text("VALUE = 1\n")


def test_forget_edited_keeps_unchanged_modules_and_drops_all_after_an_edit(tmp_path, monkeypatch):
    name = "sp_fake_flows"
    _package(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    old = time.time() - 100
    for path in (tmp_path / name).iterdir():
        os.utime(path, (old, old))
    try:
        importlib.import_module(f"{name}.plan")
        imported_at = time.time() - 50
        assert warm_engine.forget_edited(name, imported_at) is False
        assert f"{name}.plan" in sys.modules

        (tmp_path / name / "plan.py").write_text("VALUE = 2\n")  # mtime now: after the import
        assert warm_engine.forget_edited(name, imported_at) is True
        assert name not in sys.modules and f"{name}.plan" not in sys.modules
        assert importlib.import_module(f"{name}.plan").VALUE == 2
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def test_socket_path_is_none_when_too_long_for_a_unix_socket(tmp_path):
    assert warm_engine.socket_path(tmp_path) == tmp_path / "warm-engine.sock"
    assert warm_engine.socket_path(tmp_path / ("x" * 120)) is None


def test_serve_with_bad_arguments_is_one_clear_line(tmp_path):
    import subprocess

    for args in (["serve"], ["serve", str(tmp_path / "missing" / "x.sock")]):
        result = subprocess.run([sys.executable, "-m", "sierra_prefect.warm_engine", *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "usage: serve SOCKET" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created

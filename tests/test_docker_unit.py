"""``parse_mount``: the one check of ``--mount SRC:DST[:ro|rw]`` (shim and SIERRA plugin), and
``job_variables`` refusing roots that a Docker mount cannot express."""

from __future__ import annotations

import pytest

from sierra_prefect.docker import job_variables, parse_mount
from sierra_prefect.errors import ShimError


def test_absolute_existing_source_gets_rw_by_default(tmp_path):
    assert parse_mount(f"{tmp_path}:/data") == f"{tmp_path}:/data:rw"
    assert parse_mount(f"{tmp_path}:/data:ro") == f"{tmp_path}:/data:ro"


@pytest.mark.parametrize(("mount", "says"), [
    ("{tmp}:/data:rx", "is not SRC:DST[:ro|rw]"),
    ("{tmp}", "is not SRC:DST[:ro|rw]"),
    ("data:/data", "--mount source 'data' does not exist (or is relative)"),
    ("{tmp}/missing:/data", "does not exist"),
    ("{tmp}:data", "--mount destination 'data' is relative"),
    ("{tmp}/a:b:/data", "a path holding ':' cannot be mounted"),
    ("{tmp}/a:b:/data:ro", "a path holding ':' cannot be mounted"),
])
def test_bad_mounts_are_one_line_errors(tmp_path, mount, says):
    with pytest.raises(ShimError) as error:
        parse_mount(mount.format(tmp=tmp_path))
    assert says in str(error.value) and "\n" not in str(error.value)


def test_roots_holding_a_colon_are_one_line_errors(tmp_path):
    good = job_variables(str(tmp_path / "in"), str(tmp_path / "scratch"), None, True, [])
    assert good["volumes"] == [f"{tmp_path}/in:{tmp_path}/in:rw", f"{tmp_path}/scratch:{tmp_path}/scratch:rw"]
    assert good["container_create_kwargs"]["user"].count(":") == 1
    for option, roots in (("--input-root", ("/a:b", "/s")), ("--scratch-root", ("/a", "/s:t"))):
        with pytest.raises(ShimError) as error:
            job_variables(*roots, None, False, [])
        line = str(error.value)
        assert line.startswith(f"{option} '") and "holds ':'" in line and "\n" not in line

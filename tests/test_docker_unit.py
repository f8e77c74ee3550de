"""``parse_mount``: the one check of ``--mount SRC:DST[:ro|rw]`` (shim and SIERRA plugin)."""

from __future__ import annotations

import pytest

from sierra_prefect.docker import parse_mount
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
])
def test_bad_mounts_are_one_line_errors(tmp_path, mount, says):
    with pytest.raises(ShimError) as error:
        parse_mount(mount.format(tmp=tmp_path))
    assert says in str(error.value) and "\n" not in str(error.value)

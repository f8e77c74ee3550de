"""A migrated, empty SQLite database per Prefect version, so a fresh stack skips migrations.

On a fresh home the embedded server spends about 7 s here running Prefect's Alembic
migrations on an empty SQLite file before it answers. The first fresh ``up`` on a machine
pays that once; right after its server is healthy (nothing in the database yet but what
every server writes when it starts), the file is copied with SQLite's backup API to
``~/.cache/sierra-prefect/prefect-<version>-empty.db``. Later fresh homes start from a
copy of it: the server finds the schema at head and goes straight to serving.

Only for the embedded SQLite default, and only ever into a home that has no database.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from contextlib import closing
from importlib.metadata import version
from pathlib import Path


def template_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sierra-prefect" / f"prefect-{version('prefect')}-empty.db"


def seed(database: Path) -> bool:
    """Copy the template to ``database`` if there is one and ``database`` does not exist."""
    template = template_path()
    if database.exists() or not template.is_file():
        return False
    _copy(template, database)
    return True


def save(database: Path) -> None:
    """Keep ``database`` (fresh, just migrated) as the template, unless one exists."""
    template = template_path()
    if template.exists() or not database.is_file():
        return
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        _copy(database, template)
    except (OSError, sqlite3.Error):
        pass  # only a cache: the next fresh home migrates again


def _copy(source: Path, target: Path) -> None:
    """A consistent copy even while a server writes to ``source``; ``target`` appears
    whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        with closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
                closing(sqlite3.connect(tmp)) as dst:
            src.backup(dst)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise

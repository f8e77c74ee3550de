"""Directories and files of a stack's home that only their owner can read.

A stack's home holds its credential, its database, its state and its logs. On a shared
machine (a lab server, an HPC login node) none of it is for other users, whatever the
owner's umask says, so everything the shim creates there is made private explicitly::

    private_dir(home)                      # 0700, made if missing
    with open_private(log, "ab") as out:   # 0600, also when the file existed before
        ...

The outputs of experimental runs are not the stack's: they keep the user's umask.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

from sierra_prefect.errors import ShimError

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """``path`` as a directory of mode 0700 (made, with its parents, if missing)."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
            path.chmod(DIR_MODE)  # mkdir's mode is cut by the umask; an old home was 0755
    except OSError as exc:
        raise ShimError(
            f"cannot make '{path}' a private directory (mode 0700): {exc.strerror}: "
            "use a SIERRA_PREFECT_HOME of your own"
        ) from exc
    return path


def open_private(path: Path, mode: str = "ab") -> IO:
    """Open ``path`` for writing (``mode`` "a"/"w", text or "b"), as a file of mode 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # a file made before homes were private
    except PermissionError:
        pass  # not ours to change (we may still write it); the home around it is 0700
    return os.fdopen(fd, mode)

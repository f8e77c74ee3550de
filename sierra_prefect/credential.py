"""A stack's credential: the auth string its Prefect server requires of every client.

``sierra-prefect up`` gives every stack its own, even on 127.0.0.1: without one, any
local user could create flow runs on the stack, that is run commands as its owner. It is
made once, at random, and kept in ``$SIERRA_PREFECT_HOME/auth-string`` (mode 0600); later
``up``s reuse it. An explicit ``SIERRA_PREFECT_AUTH_STRING`` (or ``PREFECT_API_AUTH_STRING``)
wins over the file::

    credential = Credential.read(home / "auth-string")     # None until `up` made one
    credential = Credential.create(home / "auth-string")   # `up`: a new one, or the one there
    credential.value                                       # "sierra:..." (repr never shows it)
    credential.shell_export()     # 'export PREFECT_API_AUTH_STRING="$(cat ...)"'

The server gets it as ``PREFECT_SERVER_API_AUTH_STRING``, the shim's clients, workers and
the warm engine as ``PREFECT_API_AUTH_STRING``: always in the environment (readable only
by the owner in ``/proc``), never on a command line. Prefect's UI asks for it (a password
field, "admin:pass"): ``sierra-prefect auth-string`` prints it.
"""

from __future__ import annotations

import os
import secrets
import shlex
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sierra_prefect.errors import ShimError
from sierra_prefect.private import FILE_MODE, private_dir

FILE_NAME = "auth-string"
# Prefect's auth string is compared whole; its UI suggests "user:password".
USER = "sierra"
# The variable the `prefect` CLI and every Prefect client read it from.
CLIENT_ENV = "PREFECT_API_AUTH_STRING"


@dataclass(frozen=True)
class Credential:
    """An auth string and where it came from (a variable's name, or ``file``)."""

    value: str = field(repr=False)
    source: str
    file: Path | None = None

    def __post_init__(self) -> None:
        if not self.value.strip():
            where = f"'{self.file}'" if self.file else self.source
            raise ShimError(f"the auth string in {where} is empty: set one, or delete the file "
                            "and run `sierra-prefect down` and `sierra-prefect up` for a new one")

    @classmethod
    def read(cls, path: Path) -> Credential | None:
        """The credential kept in ``path``, or None if there is none yet."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ShimError(f"cannot read this stack's credential '{path}': {exc.strerror}: "
                            "run sierra-prefect as the user who ran `sierra-prefect up`") from exc
        return cls(text.strip(), str(path), path)

    @classmethod
    def create(cls, path: Path) -> Credential:
        """A new random credential in ``path`` (mode 0600), or the one already there."""
        existing = cls.read(path)
        if existing is not None:
            return existing
        private_dir(path.parent)
        value = f"{USER}:{secrets.token_urlsafe(32)}"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{FILE_NAME}.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(value + "\n")
            os.link(tmp, path)  # appears whole, and never replaces one made meanwhile
        except FileExistsError:
            return cls.read(path)
        finally:
            os.unlink(tmp)
        return cls(value, str(path), path)

    def is_private(self) -> bool:
        """Its file is readable by its owner only (True for a credential from a variable)."""
        if self.file is None:
            return True
        return stat.S_IMODE(self.file.stat().st_mode) & ~FILE_MODE == 0

    def make_private(self) -> None:
        if self.file is not None:
            self.file.chmod(FILE_MODE)

    def shell_export(self) -> str:
        """A line that sets ``PREFECT_API_AUTH_STRING`` in a shell, without the secret in
        it: the shell reads it from the file (or the variable) when it evaluates the line."""
        if self.file is not None:
            return f'export {CLIENT_ENV}="$(cat {shlex.quote(str(self.file))})"'
        if self.source == CLIENT_ENV:
            return f"export {CLIENT_ENV}"
        return f'export {CLIENT_ENV}="${{{self.source}}}"'

    def describe(self) -> str:
        """Where it is kept, for people (never the value)."""
        return str(self.file) if self.file else f"${self.source}"

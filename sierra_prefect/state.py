"""The embedded stack's state file: where the server listens and which pids are ours.

Lives at ``$SIERRA_PREFECT_HOME/stack.json``; two values of ``SIERRA_PREFECT_HOME`` (or
two users) are two independent stacks. Writes are atomic, and a lock file serialises
``up``/``down`` on the same home. The home is 0700, the state and lock files 0600
(``sierra_prefect/private.py``), whatever the umask.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ValidationError

from sierra_prefect.errors import ShimError
from sierra_prefect.private import open_private, private_dir
from sierra_prefect.processes import ProcessRecord


class StackState(BaseModel):
    api_url: str | None = None
    port: int | None = None
    # What the server was started with (database with its password masked), so a
    # restart does not silently change them.
    host: str | None = None
    database: str | None = None
    server: ProcessRecord | None = None
    workers: list[ProcessRecord] = []
    # Forks flow-run engines for the process worker (sierra_prefect/warm_engine.py).
    warm_engine: ProcessRecord | None = None
    # The code it runs (warm_engine.EngineCode.record): `up` restarts it when that changed.
    warm_engine_code: dict[str, str] | None = None
    # Hash of prefect.yaml + flows/ + workpools/ at the last successful deploy.
    deployed_digest: str | None = None

    def pids(self) -> dict[str, object]:
        return {
            "server": self.server.pid if self.server and self.server.is_running() else None,
            "workers": [w.pid for w in self.workers if w.is_running()],
            "warm_engine": (self.warm_engine.pid if self.warm_engine and self.warm_engine.is_running()
                            else None),
        }

    @classmethod
    def load(cls, path: Path) -> StackState:
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            return cls()
        except PermissionError as exc:
            raise ShimError(
                f"'{path}' belongs to another user's stack: use your own home "
                "(SIERRA_PREFECT_HOME, --home) or PREFECT_API_URL with your own server"
            ) from exc
        except (OSError, ValidationError, ValueError) as exc:
            raise ShimError(
                f"state file '{path}' is unreadable ({exc.__class__.__name__}): move it "
                "aside and run `sierra-prefect up` again"
            ) from exc

    def save(self, path: Path) -> None:
        private_dir(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".stack.")  # mode 0600
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self.model_dump(mode="json"), indent=2))
        os.replace(tmp, path)


@contextmanager
def locked(home: Path) -> Iterator[None]:
    """Hold the home's lock: one up/down at a time per stack. The home is made private
    (mode 0700) here, before anything is written in it."""
    private_dir(home)
    with open_private(home / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

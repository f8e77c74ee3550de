"""One content digest for "did these files change?": the deployments (``up`` redeploys
only when it changed) and the worker image (rebuilt only when it changed) both use it.

Use::

    files_digest(project, [project / "prefect.yaml", *sorted((project / "flows").glob("*.py"))])
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def files_digest(root: Path, files: Iterable[Path]) -> str:
    """SHA-256 over each file's path relative to ``root`` and its bytes, in the given order
    (a rename changes it too)."""
    sha = hashlib.sha256()
    for path in files:
        sha.update(str(path.relative_to(root)).encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()

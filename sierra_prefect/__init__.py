"""sierra-prefect: run SIERRA stage 2 on Prefect 3."""

from pathlib import Path

HOME_ENV = "SIERRA_PREFECT_HOME"


def default_home() -> Path:
    """Where a stack keeps its state unless SIERRA_PREFECT_HOME says otherwise."""
    return Path.home() / ".sierra-prefect"

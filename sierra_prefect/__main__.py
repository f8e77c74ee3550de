"""The ``sierra-prefect`` command's entry point (also ``python -m sierra_prefect``).

``run`` and ``check``, what SIERRA calls once or more per batch, are forked from this
home's warm engine when it runs (no import of Prefect: about 1 s less each); everything
else, and everything when no warm engine answers, runs ``sierra_prefect.cli`` here.
Only the standard library and ``warm_engine`` are imported before that choice. Inside a
SLURM job (``SLURM_JOB_ID`` set) nothing is forked from a warm engine: what SIERRA starts
in an allocation must stay in it, where SLURM tracks it and ends it with the job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sierra_prefect import HOME_ENV, default_home, warm_engine

# CLI commands worth a warm start: what SIERRA calls, once or more per batch.
WARM_COMMANDS = ("run", "check")


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] and argv[0] in WARM_COMMANDS and not os.environ.get("SLURM_JOB_ID"):
        home = Path(os.environ.get(HOME_ENV) or default_home())
        code = warm_engine.run_module_warm(home, "sierra_prefect.cli", argv)
        if code is not None:
            return code
    from sierra_prefect.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())

"""4. Bring-up: ``sierra-prefect up`` cold (fresh SIERRA_PREFECT_HOME) and warm (already up).

``up`` returns only once the server is healthy, the pools exist, ``prefect.yaml`` is
deployed and a process worker is online; after each call the harness checks that with
``sierra-prefect status --json`` (not timed). Every repeat uses a fresh home; all but
the last are brought down again, the last one stays up as the warm stack the other
measurements share.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import Stack, log


def measure(work: Path, repeats: int, stacks: list[Stack],
            warm_per_repeat: int = 1) -> tuple[dict, Stack]:
    """Returns the samples and the last stack, still up. Every stack started is appended
    to ``stacks`` first, so the caller can bring it down whatever happens."""
    cold: list[float] = []
    warm: list[float] = []
    stack: Stack | None = None
    for r in range(repeats):
        if stack is not None:
            stack.down()
        stack = Stack(work / f"bringup-{r}" / "home")
        stacks.append(stack)
        seconds = stack.up()
        stack.require_ready()
        cold.append(seconds)
        log(f"bring-up {r + 1}/{repeats}: cold up {seconds:.2f} s")
        for _ in range(warm_per_repeat):
            seconds = stack.up()
            stack.require_ready()
            warm.append(seconds)
            log(f"bring-up {r + 1}/{repeats}: warm up {seconds:.2f} s")
    assert stack is not None
    return {"cold": cold, "warm": warm}, stack

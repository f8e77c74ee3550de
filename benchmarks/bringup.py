"""4. Bring-up: ``sierra-prefect up`` cold (fresh SIERRA_PREFECT_HOME) and warm (already up).

Cold is measured twice per repeat: first on an empty cache (``XDG_CACHE_HOME`` a fresh
directory: the machine's first stack, whose server runs Prefect's migrations), then on a
second fresh home with that cache (every later fresh stack: the server starts from the
cached migrated empty database, sierra_prefect/sqlite_template.py). The target is read on
the second.

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
    first: list[float] = []
    cold: list[float] = []
    warm: list[float] = []
    stack: Stack | None = None
    for r in range(repeats):
        cache = work / f"bringup-{r}" / "cache"  # empty: as on a machine's first `up`
        for samples, what, home in ((first, "cold up, empty cache", "home-first"),
                                    (cold, "cold up", "home")):
            if stack is not None:
                stack.down()
            stack = Stack(work / f"bringup-{r}" / home)
            stack.env["XDG_CACHE_HOME"] = str(cache)
            stacks.append(stack)
            seconds = stack.up()
            stack.require_ready()
            samples.append(seconds)
            log(f"bring-up {r + 1}/{repeats}: {what} {seconds:.2f} s")
        for _ in range(warm_per_repeat):
            seconds = stack.up()
            stack.require_ready()
            warm.append(seconds)
            log(f"bring-up {r + 1}/{repeats}: warm up {seconds:.2f} s")
    assert stack is not None
    return {"cold_first": first, "cold": cold, "warm": warm}, stack

"""Prefect's server as ``prefect server start`` runs it, with one fix for the SQLite default.

Usage (what ``sierra-prefect up`` runs; any ``prefect`` command line works)::

    python -m sierra_prefect.prefect_server server start --host 127.0.0.1 --port 4200

The fix: Prefect 3.9 writes in SQLite transactions begun DEFERRED that read first and write
after. When another connection commits between the read and the write (a batch's flow run
writing progress, the event persister), SQLite answers SQLITE_BUSY_SNAPSHOT at once; its
busy timeout cannot help, since the transaction's snapshot is stale. Three such writes are
in every batch's path:

- the worker channel (the websocket each worker keeps open): opening it (reads the work
  pool, then updates it) and each heartbeat (reads the work pool, then records the worker).
  The server logs "Worker channel heartbeat persistence failed ... database is locked" (or
  "Worker channel setup failed") with a traceback and drops the channel. Measured: one in a
  20,000-run batch; 8-12 in 15-30 s of API writes beside a worker with 1 s heartbeats;
- the worker's labels on each flow run it takes (reads the flow run, then writes): a 503,
  and Prefect's client tries again 2 s later. Measured: 9 of 9 back-to-back triggers.

Those transactions begin IMMEDIATE here, as Prefect's own read-then-write transactions do
(``with_for_update``): they wait for the writer (up to the busy timeout), then read and
write one consistent state. Nothing else changes: making every transaction IMMEDIATE was
measured too and cut write throughput under load (requests waiting over 5 s), so only these,
a few per flow run and per worker-minute, are. PostgreSQL ignores the mode. If a Prefect
version no longer has a function this wraps, that part is left out, and the log's first
line says which.
"""

from __future__ import annotations

import functools
import importlib

# (module, function): called with a session whose transaction is begun but whose connection
# is not yet taken, so SQLite's BEGIN goes out with the function's first statement.
READ_THEN_WRITE = (
    ("prefect.server.utilities.worker_channel", "_persist_worker_channel_heartbeat"),
    ("prefect.server.api.workers", "_build_worker_ready_frame"),
    # A worker labels each flow run it takes; reads the flow run, then writes its labels.
    ("prefect.server.models.flow_runs", "update_flow_run_labels"),
)


def begin_immediately(module_name: str, function_name: str) -> bool:
    """Wrap ``module.function`` so the SQLite transaction it runs in begins IMMEDIATE;
    False (nothing changed) if this Prefect has no such function."""
    try:
        from prefect.server.database.configurations import SQLITE_BEGIN_MODE
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    function = getattr(module, function_name, None)
    if function is None:
        return False
    if getattr(function, "_sierra_prefect_immediate", False):
        return True

    @functools.wraps(function)
    async def immediately(*args, **kwargs):
        token = SQLITE_BEGIN_MODE.set("IMMEDIATE")
        try:
            return await function(*args, **kwargs)
        finally:
            SQLITE_BEGIN_MODE.reset(token)

    immediately._sierra_prefect_immediate = True  # type: ignore[attr-defined]
    setattr(module, function_name, immediately)
    return True


def begin_read_then_write_immediately() -> list[str]:
    """Apply the fix; the functions this Prefect lacks (empty when all were wrapped)."""
    return [f"{m}.{f}" for m, f in READ_THEN_WRITE if not begin_immediately(m, f)]


def main() -> None:
    from prefect.cli import app

    missing = begin_read_then_write_immediately()
    print("sierra-prefect: worker-channel and labelling transactions begin IMMEDIATE on SQLite"
          + (f" (not found, left as is: {', '.join(missing)})" if missing else ""), flush=True)
    app()


if __name__ == "__main__":
    main()

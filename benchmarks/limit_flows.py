"""Baseline flows for the concurrency benchmark: the cap enforced by the Prefect server.

Two flows that run every line of ``<input_root>/commands.txt`` as one task each, like
SIERRA's own ``prefectserver`` flow does (``task.map`` on Prefect's default thread pool,
which has no bound of its own), with the cap enforced by the server instead of
a local thread pool:

- ``bench-tag-limit``: the tasks are tagged; the cap is a tag-based task concurrency
  limit (``prefect concurrency-limit create TAG N``), which is SIERRA's approach.
- ``bench-gcl``: each task holds one slot of a global concurrency limit
  (``prefect.concurrency.sync.concurrency(NAME, occupy=1)``) while its command runs.

They are deployed to the stack's process pool with :func:`deploy` (the same pool and
worker as ``sierra/local``), so all three variants go through the same path: a worker
picks the flow run up and runs it in a subprocess. The limits are created with the
Prefect client (:func:`create_limits`), never by parsing CLI output.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

TAG_FLOW = "bench-tag-limit"
GCL_FLOW = "bench-gcl"
DEPLOYMENT = "bench"
SHELL = shutil.which("bash") or "/bin/sh"


def _commands(input_root: str) -> list[str]:
    text = (Path(input_root) / "commands.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _run(command: str) -> int:
    result = subprocess.run(
        command, shell=True, executable=SHELL, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {command}")
    return result.returncode


@task(name="tagged-run", cache_policy=NO_CACHE, persist_result=False)
def tagged_run(command: str) -> int:
    return _run(command)


@task(name="gcl-run", cache_policy=NO_CACHE, persist_result=False)
def gcl_run(command: str, limit_name: str) -> int:
    with concurrency(limit_name, occupy=1):
        return _run(command)


@flow(name=TAG_FLOW, persist_result=False)
def tag_limited(input_root: str, tag: str) -> int:
    """Every command as a task tagged ``tag`` (SIERRA's prefectserver flow, in essence)."""
    futures = tagged_run.with_options(tags={tag}).map(_commands(input_root))
    return sum(f.result() == 0 for f in futures)


@flow(name=GCL_FLOW, persist_result=False)
def gcl_limited(input_root: str, limit_name: str) -> int:
    """Every command as a task that holds one slot of the global limit ``limit_name``."""
    futures = gcl_run.map(_commands(input_root), limit_name=limit_name)
    return sum(f.result() == 0 for f in futures)


def create_limits(client, tag: str, gcl_name: str, limit: int) -> None:
    """A tag-based task limit and a global concurrency limit, both ``limit`` slots."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=gcl_name, limit=limit))


def delete_limits(client, tag: str, gcl_name: str) -> None:
    from prefect.exceptions import ObjectNotFound

    for delete in (lambda: client.delete_concurrency_limit_by_tag(tag),
                   lambda: client.delete_global_concurrency_limit_by_name(gcl_name)):
        try:
            delete()
        except ObjectNotFound:
            pass


def deploy(project_dir: Path, pool: str) -> dict[str, str]:
    """Deploy both flows from this checkout to ``pool``; return {variant: FLOW/NAME}."""
    import contextlib
    import io

    names = {}
    for variant, entry, flow_name in (
        ("tag", "tag_limited", TAG_FLOW),
        ("gcl", "gcl_limited", GCL_FLOW),
    ):
        loaded = flow.from_source(
            source=str(project_dir), entrypoint=f"benchmarks/limit_flows.py:{entry}"
        )
        with contextlib.redirect_stdout(io.StringIO()):  # its tables are not our output
            loaded.deploy(
                name=DEPLOYMENT, work_pool_name=pool, print_next_steps=False, ignore_warnings=True
            )
        names[variant] = f"{flow_name}/{DEPLOYMENT}"
    return names


POLL_SECONDS = 0.5  # as `sierra-prefect run` follows its flow run


def trigger_and_wait(deployment: str, parameters: dict, deadline: float) -> dict:
    """Start a flow run of ``deployment`` and poll it (like ``sierra-prefect run``) to the end."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow_run = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False)
    end = time.monotonic() + deadline
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run.id).state
            if state is not None and state.is_final():
                return {"flow_run_id": str(flow_run.id), "state": state.type.value}
            if time.monotonic() > end:
                from prefect.states import Cancelling

                # Past the deadline: cancel it (the worker stops it), report it.
                client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
                return {"flow_run_id": str(flow_run.id), "state": "DEADLINE"}
            time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.limit_flows DEPLOYMENT INPUT_ROOT KEY=VALUE [--deadline S]``.

    Prints the outcome as one JSON line; exit 0 iff the flow run completed. The
    harness runs this as a subprocess, so it pays for importing Prefect as
    ``sierra-prefect run`` does.
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.limit_flows")
    parser.add_argument("deployment")
    parser.add_argument("input_root")
    parser.add_argument("param", nargs="*", help="extra flow parameter KEY=VALUE")
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args(argv)
    params = {"input_root": args.input_root}
    params.update(p.split("=", 1) for p in args.param)
    outcome = trigger_and_wait(args.deployment, params, args.deadline)
    print(json.dumps(outcome), flush=True)
    return 0 if outcome["state"] == "COMPLETED" else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Server-side automations the stack relies on, applied idempotently with the pools.

``crash-silent-flow-runs``: a flow run whose process died without a word (worker killed,
host lost) would stay Running forever. Flow runs of our pools send heartbeats (the pools
set ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``); this proactive trigger marks a flow run
Crashed when three heartbeats in a row are missing, so ``sierra-prefect run`` and SIERRA
learn of it and a re-trigger resumes the batch. Prefect's recipe for "zombie" flow runs.
"""

from __future__ import annotations

from datetime import timedelta

HEARTBEAT_SECONDS = 30  # also in workpools/*.yaml: PREFECT_FLOWS_HEARTBEAT_FREQUENCY
CRASH_AFTER = timedelta(seconds=3 * HEARTBEAT_SECONDS)
NAME = "sierra-prefect: crash silent flow runs"


def desired():
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=NAME,
        description="Marks flow runs Crashed when their heartbeats stop (see sierra_prefect/automations.py).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=CRASH_AFTER,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {CRASH_AFTER.seconds} s: the flow run's process is gone.",
            )
        ],
    )


def apply(client) -> list[str]:
    """Create the automation, or bring a drifted one back; return what changed."""
    want = desired()
    existing = client.read_automations_by_name(NAME)
    if not existing:
        client.create_automation(want)
        return [f"created automation '{NAME}'"]
    current = existing[0]
    fields = ("trigger", "actions", "enabled", "description")
    if any(getattr(current, f) != getattr(want, f) for f in fields):
        client.update_automation(current.id, want)
        return [f"updated automation '{NAME}'"]
    return []

"""Work pools as files: ``workpools/*.yaml`` applied idempotently to a server.

A pool file names the pool, its worker type, its queues and defaults for the worker
type's base job template variables. ``apply`` creates what is missing and brings back
what drifted (template, description, concurrency, queue priorities); applying twice
changes nothing. A pool's type cannot change in Prefect: a pool of the wrong type is
an error that says how to fix it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from sierra_prefect.errors import ShimError


class QueueSpec(BaseModel):
    name: str
    priority: int = 1
    concurrency_limit: int | None = None


class WorkPoolSpec(BaseModel):
    """One ``workpools/<name>.yaml``."""

    name: str
    type: str
    description: str | None = None
    concurrency_limit: int | None = None
    queues: list[QueueSpec] = []
    job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Defaults for the worker type's base job template variables.",
    )

    @classmethod
    def load_all(cls, directory: Path) -> list[WorkPoolSpec]:
        specs = []
        for path in sorted(directory.glob("*.yaml")):
            try:
                specs.append(cls.model_validate(yaml.safe_load(path.read_text())))
            except (ValidationError, yaml.YAMLError) as exc:
                first = str(exc).splitlines()[0]
                raise ShimError(f"work pool file '{path}' is invalid ({first}): fix it") from exc
        return specs

    def base_job_template(self) -> dict[str, Any]:
        """The worker type's default template with this file's variable defaults."""
        from prefect.workers.base import BaseWorker

        worker_class = BaseWorker.get_worker_class_from_type(self.type)
        if worker_class is None:
            raise ShimError(
                f"work pool '{self.name}' has type '{self.type}', which no installed "
                "worker provides: install its integration (e.g. prefect-docker)"
            )
        template = copy.deepcopy(worker_class.get_default_base_job_template())
        properties = template["variables"]["properties"]
        for key, value in self.job_variables.items():
            if key not in properties:
                raise ShimError(
                    f"work pool '{self.name}': '{key}' is not a job variable of "
                    f"'{self.type}' workers (known: {', '.join(sorted(properties))})"
                )
            properties[key]["default"] = value
        return template


def apply(client, specs: list[WorkPoolSpec]) -> list[str]:
    """Bring the server's pools in line with ``specs``; return what changed."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    changes: list[str] = []
    for spec in specs:
        template = spec.base_job_template()
        try:
            pool = client.read_work_pool(spec.name)
        except ObjectNotFound:
            pool = None
        if pool is None:
            client.create_work_pool(
                WorkPoolCreate(
                    name=spec.name,
                    type=spec.type,
                    description=spec.description,
                    base_job_template=template,
                    concurrency_limit=spec.concurrency_limit,
                )
            )
            changes.append(f"created pool {spec.name} ({spec.type})")
        elif pool.type != spec.type:
            raise ShimError(
                f"work pool '{spec.name}' exists with type '{pool.type}' but "
                f"workpools/ says '{spec.type}': delete it (`prefect work-pool delete "
                f"{spec.name}`) and run `sierra-prefect pools apply` again"
            )
        else:
            drift = {}
            if pool.base_job_template != template:
                drift["base_job_template"] = template
            if pool.description != spec.description:
                drift["description"] = spec.description
            if pool.concurrency_limit != spec.concurrency_limit:
                drift["concurrency_limit"] = spec.concurrency_limit
            if drift:
                client.update_work_pool(spec.name, WorkPoolUpdate(**drift))
                changes.append(f"updated pool {spec.name}: {', '.join(sorted(drift))}")
        changes += _apply_queues(client, spec)
    return changes


def _apply_queues(client, spec: WorkPoolSpec) -> list[str]:
    changes = []
    existing = {q.name: q for q in client.read_work_queues(work_pool_name=spec.name)}
    for queue in spec.queues:
        current = existing.get(queue.name)
        if current is None:
            client.create_work_queue(
                name=queue.name,
                work_pool_name=spec.name,
                priority=queue.priority,
                concurrency_limit=queue.concurrency_limit,
            )
            changes.append(f"created queue {spec.name}/{queue.name}")
        elif (current.priority, current.concurrency_limit) != (
            queue.priority,
            queue.concurrency_limit,
        ):
            client.update_work_queue(
                current.id, priority=queue.priority, concurrency_limit=queue.concurrency_limit
            )
            changes.append(f"updated queue {spec.name}/{queue.name}")
    return changes

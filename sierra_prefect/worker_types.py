"""Prefect worker types of sierra-prefect: ``sierra-process`` and ``sierra-docker``.

Prefect's own process and Docker workers, with the two things a stock worker cannot do:

- **an allow-list of job variables** (``sierra_prefect/job_policy.py``), checked before any
  process or container starts: a flow run (or a deployment) that sets a job variable its
  pool does not let it set (a ``command``, an ``env``, a ``/`` mount, a privileged
  container, an image nobody allowed) ends Failed, named "Refused", with one line in its
  state message saying what and how to fix it; nothing runs;
- **SIGUSR1 looks for flow runs at once** instead of at the next poll
  (``PREFECT_WORKER_QUERY_SECONDS``): ``sierra-prefect run`` sends it to its own stack's
  worker right after it creates a flow run. Prefect drops a second submission of a flow
  run it already submits, so a poll and a wake-up can overlap;
- **one child of a spread batch at a time** (``--spread N``, flows/spread.py): a worker
  that runs a child of a batch leaves the batch's other children Scheduled, for the
  other workers of the pool, instead of taking them only to see them decline.

They are registered with Prefect through the ``prefect.collections`` entry point of this
package (pyproject.toml), so wherever this project is installed (its venv, the worker
image)::

    prefect worker start --pool sierra-pool --type sierra-process
    prefect worker start --pool sierra-docker-pool --type sierra-docker
    prefect worker start --pool sierra-pool     # the pool's type names the worker type

``sierra-prefect pools apply`` makes the pools (``workpools/``) with these types; their base
job templates are exactly those of Prefect's process and Docker workers. A stock worker
started on such a pool with ``--type process`` would run flow runs unchecked (Prefect only
warns about the type mismatch): start ours.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from prefect.settings import get_current_settings
from prefect.states import Failed
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration, DockerWorkerResult
from pydantic import PrivateAttr

from sierra_prefect.job_policy import JobPolicy, Kind, job_overrides, pool_defaults
from sierra_prefect.wake import WAKE_SIGNAL, WORKER_ENV

REFUSED_STATE = "Refused"


async def _resolve_checked(resolve, kind: Kind, flow_run, client, work_pool, deployment, **kwargs):
    """``resolve_for_flow_run`` of Prefect's job configuration, after the policy's verdict.

    A refused flow run's configuration is built from the pool's defaults alone, so values
    that were refused never reach Prefect's templating (which would resolve blocks and
    variables named in them, or fail on a malformed value with a traceback)."""
    if deployment is None and flow_run.deployment_id:
        deployment = await client.read_deployment(flow_run.deployment_id)
    overrides = job_overrides(getattr(deployment, "job_variables", None), flow_run.job_variables)
    refusal = JobPolicy.from_environment().check(
        kind, pool_defaults(work_pool.base_job_template), overrides, flow_run.parameters)
    if refusal is not None:
        flow_run = flow_run.model_copy(update={"job_variables": {}})
        if deployment is not None:
            deployment = deployment.model_copy(update={"job_variables": {}})
    configuration = await resolve(flow_run, client=client, work_pool=work_pool,
                                  deployment=deployment, **kwargs)
    configuration._refusal = refusal
    return configuration


class SettingsEnvironmentOnce:
    """Prefect serializes all of its settings into every flow run's environment (~25 ms of
    the worker's time between "picked up" and "started", py-spy); they are the same for
    every flow run as long as the worker runs with the same settings object."""

    _settings_environment: tuple[object, dict[str, str]] | None = None

    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        settings = get_current_settings()
        held = SettingsEnvironmentOnce._settings_environment
        if held is None or held[0] is not settings:
            held = (settings, super()._base_environment())
            SettingsEnvironmentOnce._settings_environment = held
        return dict(held[1])


class SierraProcessJobConfiguration(SettingsEnvironmentOnce, ProcessJobConfiguration):
    """Prefect's process job configuration, carrying the policy's verdict on the flow run."""

    _refusal: str | None = PrivateAttr(default=None)

    @classmethod
    async def resolve_for_flow_run(cls, flow_run, *, client, work_pool, worker_name,
                                   worker_id=None, deployment=None):
        return await _resolve_checked(super().resolve_for_flow_run, "process", flow_run, client,
                                      work_pool, deployment, worker_name=worker_name,
                                      worker_id=worker_id)


class SierraDockerJobConfiguration(DockerWorkerJobConfiguration):
    """Prefect's Docker job configuration, carrying the policy's verdict on the flow run."""

    _refusal: str | None = PrivateAttr(default=None)

    @classmethod
    async def resolve_for_flow_run(cls, flow_run, *, client, work_pool, worker_name,
                                   worker_id=None, deployment=None):
        return await _resolve_checked(super().resolve_for_flow_run, "docker", flow_run, client,
                                      work_pool, deployment, worker_name=worker_name,
                                      worker_id=worker_id)


class JobGuard:
    """A worker that starts nothing for a refused flow run: it sets the flow run Failed
    ("Refused", the policy's line as the message) and logs the line in the flow run's log."""

    result_class: type = ProcessWorkerResult

    async def run(self, flow_run, configuration, task_status=None):
        refusal = getattr(configuration, "_refusal", None)
        if refusal is None:
            return await super().run(flow_run, configuration, task_status)
        message = f"refused by the worker: {refusal}"
        self.get_flow_run_logger(flow_run).error(message)
        await self.client.set_flow_run_state(flow_run.id, Failed(name=REFUSED_STATE, message=message))
        if task_status is not None:
            # Prefect waits for "started"; an exception there means no infrastructure exists.
            task_status.started(RuntimeError(message))
        return self.result_class(status_code=0, identifier="refused")


class WakeOnSignal:
    """A worker that looks for flow runs when it gets SIGUSR1, besides its regular polls.

    The handler is installed before the worker first syncs with the server, so a worker
    the server lists online already answers it; ``sierra-prefect run`` also checks that the
    process catches the signal before sending it (a process that did not would die of it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake_task: asyncio.Task | None = None
        self._wake_again = False

    async def setup(self) -> None:
        try:
            asyncio.get_running_loop().add_signal_handler(WAKE_SIGNAL, self._wake)
            import psutil

            os.environ[WORKER_ENV] = f"{os.getpid()}:{psutil.Process().create_time()}"
        except (NotImplementedError, RuntimeError, ValueError) as exc:  # not the main thread
            self._logger.debug("not waking on SIGUSR1 (%s): polling only", exc)
        await super().setup()

    async def teardown(self, *exc_info: Any) -> None:
        try:
            asyncio.get_running_loop().remove_signal_handler(WAKE_SIGNAL)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        await super().teardown(*exc_info)

    def _wake(self) -> None:
        # Several signals while a poll runs make one more poll, not one each.
        if self._wake_task is not None and not self._wake_task.done():
            self._wake_again = True
            return
        self._wake_task = asyncio.ensure_future(self._poll_now())

    async def _poll_now(self) -> None:
        again = True
        while again:
            self._wake_again = False
            try:
                await self.get_and_submit_flow_runs()
            except Exception as exc:  # the regular poll goes on; say why this one failed
                self._logger.warning("looking for flow runs on SIGUSR1 failed: %s", exc)
            again = self._wake_again


class LabelsInBackground:
    """A worker that labels a flow run with itself (Prefect's worker and pool labels)
    without holding up the flow run's start.

    Prefect awaits that PATCH before it starts the flow run. On the embedded SQLite server
    it can meet the writes of a flow run that just ended (503, "database is locked"), and
    the client's first retry comes 2 s later: measured, one in five triggers made right
    after the previous batch ended started 2.2 s late. The labels are for the UI and for
    filters; nothing needs them before the flow run starts."""

    LABEL_DEADLINE_SECONDS = 30.0  # what a stopping worker waits for labels in flight

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._labelling: set[asyncio.Task] = set()

    async def _give_worker_labels_to_flow_run(self, flow_run_id) -> None:
        task = asyncio.ensure_future(self._label(flow_run_id))
        self._labelling.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._labelling.discard)

    async def _label(self, flow_run_id) -> None:
        try:
            await super()._give_worker_labels_to_flow_run(flow_run_id)
        except Exception as exc:  # the flow run goes on without them
            self._logger.warning("could not label flow run %s with this worker: %s",
                                 flow_run_id, exc)

    async def teardown(self, *exc_info: Any) -> None:
        if self._labelling:
            await asyncio.wait(set(self._labelling), timeout=self.LABEL_DEADLINE_SECONDS)
        await super().teardown(*exc_info)


class OneChildPerBatch:
    """A worker that runs at most one child flow run of each spread batch at a time.

    A child carries its batch in the ``spread_group`` parameter. Children of a batch this
    worker already runs are not submitted (they stay Scheduled, and another worker of the
    pool takes them at its next poll); one child per batch and poll is taken."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._groups: dict[str, Any] = {}  # spread group -> the flow run id holding it
        self._started: set[Any] = set()

    async def _submit_scheduled_flow_runs(self, flow_run_response):
        kept = []
        for entry in flow_run_response:
            flow_run = entry.flow_run
            group = (flow_run.parameters or {}).get("spread_group")
            if group:
                holder = self._groups.get(group)
                if holder is not None and holder != flow_run.id:
                    self._logger.debug("leaving flow run %s to another worker: this one runs "
                                       "%s of the same spread batch", flow_run.id, holder)
                    continue
                self._groups[group] = flow_run.id
            kept.append(entry)
        return await super()._submit_scheduled_flow_runs(kept)

    def _free(self, flow_run_id) -> None:
        for group, holder in list(self._groups.items()):
            if holder == flow_run_id:
                del self._groups[group]

    async def _submit_run(self, flow_run) -> None:
        try:
            await super()._submit_run(flow_run)
        finally:
            if flow_run.id not in self._started:  # never started here: not holding its batch
                self._free(flow_run.id)

    async def _submit_run_and_capture_errors(self, flow_run, task_status=None):
        self._started.add(flow_run.id)
        try:
            return await super()._submit_run_and_capture_errors(flow_run, task_status)
        finally:
            self._started.discard(flow_run.id)
            self._free(flow_run.id)


class SierraProcessWorker(OneChildPerBatch, LabelsInBackground, WakeOnSignal, JobGuard,
                          ProcessWorker):
    """``sierra-process``: Prefect's process worker, guarded, woken by SIGUSR1."""

    type = "sierra-process"
    job_configuration = SierraProcessJobConfiguration
    result_class = ProcessWorkerResult
    _display_name = "SIERRA process"
    _description = ("Prefect's process worker for sierra-prefect: flow runs may not change the "
                    "command, environment or working directory of their pool.")

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        return ProcessWorker.get_default_base_job_template()


class SierraDockerWorker(OneChildPerBatch, LabelsInBackground, WakeOnSignal, JobGuard,
                         DockerWorker):
    """``sierra-docker``: Prefect's Docker worker, guarded, woken by SIGUSR1."""

    type = "sierra-docker"
    job_configuration = SierraDockerJobConfiguration
    result_class = DockerWorkerResult
    _display_name = "SIERRA Docker"
    _description = ("Prefect's Docker worker for sierra-prefect: flow runs may choose only an "
                    "allowed image, mounts inside the allowed roots and the container's user.")

    @classmethod
    def get_default_base_job_template(cls) -> dict[str, Any]:
        return DockerWorker.get_default_base_job_template()

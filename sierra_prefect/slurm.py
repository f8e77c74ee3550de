"""Batches inside a SLURM allocation: the allocation's own workers, on its own queue.

The user's stack (server, credential) runs where it always does, e.g. on the login host.
Inside an allocation (an ``sbatch`` script, or a shell from ``salloc``)::

    sierra-prefect slurm workers &      # srun: one worker per allocated node, all its CPUs
    sierra ... --execenv prefectdeploy.slurm ...

- ``slurm workers`` runs ``srun --nodes=N --ntasks=N --ntasks-per-node=1
  --cpus-per-task=<CPUs on node> sierra-prefect slurm worker`` (``SlurmWorkers.argv``): a
  job step with one task per node, each bound by SLURM to that node's share of the job.
- ``slurm worker`` (one per node, under srun) connects to the stack as every
  ``sierra-prefect`` command does (``SIERRA_PREFECT_HOME``'s state, or ``PREFECT_API_URL``;
  the credential from the home's 0600 file or ``SIERRA_PREFECT_AUTH_STRING``, never from a
  command line), makes the allocation's queue ``slurm-<SLURM_JOB_ID>`` on the pool
  ``sierra-slurm-pool`` and runs Prefect's worker (type ``sierra-process``) on that queue
  alone, as its child: SLURM tracks it, binds it to the node's CPUs, and ends it (and the
  flow runs it started) with the step or the job. The first node's worker deletes the queue
  on the way out.
- ``slurm check`` (the ``prefectdeploy.slurm`` plugin's stage 2 check) waits until every
  node's worker is online, then checks the deployment as ``check`` does.
- ``sierra-prefect run sierra/slurm ...`` inside an allocation sends the flow run to the
  allocation's queue (:func:`queue_for`).

Why a pool of its own with a queue per job: the stack's own worker polls ``sierra-pool``
(all its queues), as does any worker started on another host the way the README says, so a
queue in ``sierra-pool`` could be taken by them; nothing but an allocation's workers polls
``sierra-slurm-pool``, and each of those only its own job's queue. Pool and deployment are
files like the others (workpools/, prefect.yaml): nothing is deployed per job.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
from pydantic import BaseModel

from sierra_prefect import warm_engine
from sierra_prefect.connection import Connection
from sierra_prefect.errors import ShimError
from sierra_prefect.private import private_dir
from sierra_prefect.settings import SLURM_DEPLOYMENT, Settings, venv_env
from sierra_prefect.worker import workers_online

POOL = "sierra-slurm-pool"
DEPLOYMENT = SLURM_DEPLOYMENT
WORKER_TYPE = "sierra-process"
QUEUE_PREFIX = "slurm-"
README_HINT = "see the README, 'On a SLURM cluster'"
# Signals that end a step: scancel, the end of the job or step, srun's Ctrl-C.
_ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Allocation(BaseModel):
    """The SLURM job this process runs in, from the variables SLURM sets."""

    job_id: str
    num_nodes: int
    node_name: str
    node_id: int = 0
    cpus_per_task: int | None = None
    cpus_on_node: int | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Allocation:
        env = os.environ if environ is None else environ
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            raise ShimError("not inside a SLURM allocation (SLURM_JOB_ID is not set): run this "
                            f"in an sbatch script or a shell from salloc ({README_HINT})")
        try:
            return cls(
                job_id=job_id,
                num_nodes=int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1),
                node_name=env.get("SLURMD_NODENAME") or os.uname().nodename,
                node_id=int(env.get("SLURM_NODEID") or 0),
                cpus_per_task=_int_or_none(env.get("SLURM_CPUS_PER_TASK")),
                # In a batch script SLURM_CPUS_ON_NODE; in a salloc shell only the job's
                # CPUs per node ("8(x2)", or "8,4" for uneven nodes: the first node's).
                cpus_on_node=_int_or_none(env.get("SLURM_CPUS_ON_NODE")
                                          or env.get("SLURM_JOB_CPUS_PER_NODE")),
            )
        except ValueError as exc:
            raise ShimError(f"SLURM job {job_id}: unexpected SLURM variables ({exc}): is this "
                            "a SLURM allocation?") from None

    @property
    def queue(self) -> str:
        return f"{QUEUE_PREFIX}{self.job_id}"

    @property
    def worker_prefix(self) -> str:
        return f"{QUEUE_PREFIX}{self.job_id}-"

    @property
    def worker_name(self) -> str:
        return f"{self.worker_prefix}{self.node_name}"


def _int_or_none(text: str | None) -> int | None:
    """The leading number of a SLURM value ("2", "8(x2)", "8,4"); None if unset."""
    if not text:
        return None
    match = re.match(r"\s*(\d+)", text)
    if match is None:
        raise ValueError(f"not a number: {text!r}")
    return int(match.group(1))


def queue_for(deployment: str, work_queue: str | None) -> str | None:
    """The queue ``run`` sends ``deployment`` to: the one given, else for ``sierra/slurm``
    the allocation's (one-line error outside one: no worker would ever take it)."""
    if work_queue or deployment != DEPLOYMENT:
        return work_queue
    return Allocation.from_environment().queue


def connect(settings: Settings, connection: Connection, where: str) -> Connection:
    """``connection`` after checking that the server answers and takes our credential,
    with one line naming what is wrong and the fix."""
    if not connection.is_healthy(timeout=5.0):
        raise ShimError(f"Prefect server at {connection.api_url} is unreachable from {where}: "
                        "start it with `sierra-prefect up` (with --host 0.0.0.0 if the "
                        f"allocation's nodes are other hosts) or fix PREFECT_API_URL ({README_HINT})")
    try:
        connection.server_version()
    except ShimError:
        if connection.auth_string:
            raise
        raise ShimError(f"no credential for the Prefect server at {connection.api_url}: "
                        f"{settings.auth_file} does not exist (it is made by `sierra-prefect up`; "
                        "SIERRA_PREFECT_HOME must be the stack's home, on a file system the nodes "
                        "share) and SIERRA_PREFECT_AUTH_STRING is not set") from None
    return connection


def node_prefect_home(allocation: Allocation) -> Path:
    """The worker's Prefect home: on the node, per job (the CPU locks of the flow runs live
    there and must be the node's, not a file system shared with other nodes)."""
    base = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    return base / f"sierra-prefect-{os.getuid()}-{allocation.queue}-{allocation.node_name}"


class QueueApi:
    """The allocation's queue on ``sierra-slurm-pool``, in plain HTTP (no Prefect import)."""

    def __init__(self, connection: Connection, allocation: Allocation) -> None:
        self.connection, self.allocation = connection, allocation
        self.url = f"{connection.api_url}/work_pools/{POOL}/queues"

    def ensure(self) -> None:
        response = httpx.post(self.url, json={"name": self.allocation.queue},
                              headers=self.connection.headers(), timeout=30)
        if response.status_code == 404:
            raise ShimError(f"work pool '{POOL}' does not exist on {self.connection.api_url}: "
                            "run `sierra-prefect up` (or `sierra-prefect pools apply`) with this "
                            "version of sierra-prefect")
        if response.status_code not in (200, 201, 409):  # 409: another node made it
            raise ShimError(f"cannot create queue {self.allocation.queue} on {POOL}: HTTP "
                            f"{response.status_code} {response.text[:200]}")

    def delete(self, within: float = 8.0) -> bool:
        """Delete the queue, trying again while the server is busy (503, e.g. SQLite's
        'database is locked') or unreachable, for ``within`` seconds: SLURM's KillWait
        (often 30 s, can be 10) bounds how long an ending step may take."""
        end = time.monotonic() + within
        while True:
            try:
                response = httpx.delete(f"{self.url}/{self.allocation.queue}",
                                        headers=self.connection.headers(),
                                        timeout=max(1.0, end - time.monotonic()))
                if response.status_code in (200, 204, 404):
                    return True
                if response.status_code < 500:
                    return False
            except httpx.HTTPError:
                pass
            if time.monotonic() >= end:
                return False
            time.sleep(0.5)  # a retry interval: the deadline is what counts


class SlurmWorker:
    """The allocation's worker on this node: Prefect's worker as a child, on the job's queue.

    ``run()`` returns the worker's exit code. Ending the job or step ends the worker and the
    flow runs it started: SLURM signals every process of the step itself (all its process
    tracking plugins do; the worker stays in our process group for proctrack/pgid). So
    this process does not pass the signal on: Prefect's worker takes a second SIGTERM as
    "kill now" (SIGKILL), and would lose its shutdown (labels in flight, its cleanup)."""

    def __init__(self, settings: Settings, connection: Connection, allocation: Allocation,
                 say: Callable[[str], None]) -> None:
        self.settings, self.connection, self.allocation, self.say = (
            settings, connection, allocation, say)
        self.queue = QueueApi(connection, allocation)
        self.proc: subprocess.Popen | None = None
        self._signalled: int | None = None
        self._deleting: threading.Thread | None = None
        self._queue_deleted = False

    def env(self, prefect_home: Path) -> dict[str, str]:
        env = venv_env(self.connection.api_url, self.settings, on_this_host=True,
                       PREFECT_WORKER_QUERY_SECONDS=str(self.settings.worker_query_seconds),
                       PREFECT_HOME=str(prefect_home))
        # Never fork flow runs from a warm engine of the login host: they would run outside
        # the allocation (its CPUs, its end).
        env.pop(warm_engine.SOCKET_ENV, None)
        return env

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                "--type", WORKER_TYPE, "--work-queue", self.allocation.queue,
                "--name", self.allocation.worker_name]

    def run(self) -> int:
        alloc = self.allocation
        self.queue.ensure()
        home = private_dir(node_prefect_home(alloc))
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = []
        try:
            for signum in _ENDING:
                signal.signal(signum, self._ending)
            # Same session and process group as us: SLURM's process tracking sees it (and
            # its flow runs) as part of this step.
            self.proc = subprocess.Popen(self.argv(), env=self.env(home), stdin=subprocess.DEVNULL)
            if self._signalled is not None:  # SLURM ended the step before the worker existed
                self.proc.send_signal(self._signalled)
                self._start_queue_delete()
            self.say(f"slurm worker {alloc.worker_name} (pid {os.getpid()}, worker pid "
                     f"{self.proc.pid}) on node "
                     f"{alloc.node_name}: pool {POOL}, queue {alloc.queue}, "
                     f"{len(cpus)} CPUs {_ranges(cpus)}, server {self.connection.api_url}")
            code = self.proc.wait()
            self.say(f"slurm worker {alloc.worker_name} ended (exit {code})")
            return code
        finally:
            if self.proc is not None and self.proc.poll() is None:  # we are failing: stop it
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            if self._deleting is not None:
                self._deleting.join(timeout=10)
            if alloc.node_id == 0 and not self._queue_deleted:
                self._queue_deleted = self.queue.delete()
            shutil.rmtree(home, ignore_errors=True)

    def _start_queue_delete(self) -> None:
        """The step is ending: delete the job's queue now, beside the worker's shutdown, not
        after it. SLURM kills what is left KillWait seconds after its SIGTERM, and a worker
        that is slow to stop (a busy machine) would take the delete with it."""
        if self.allocation.node_id != 0 or self._deleting is not None:
            return

        def delete() -> None:
            self._queue_deleted = self.queue.delete()

        self._deleting = threading.Thread(target=delete, name="delete-queue", daemon=True)
        self._deleting.start()

    def _ending(self, signum: int, _frame) -> None:
        self._signalled = signum
        if self.proc is not None:  # it had the signal from SLURM too
            self._start_queue_delete()


def _ranges(cpus: list[int]) -> str:
    """``0-3,6`` for [0, 1, 2, 3, 6]."""
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(f"{start}-{cpu}" if cpu != start else f"{cpu}")
            start = None
    return ",".join(parts)


def workers_argv(allocation: Allocation, shim: str) -> list[str]:
    """The srun command line of ``slurm workers``: one task per node, each with all the CPUs
    the job has on its node, not one run's share (srun before SLURM 22.05 inherits
    SLURM_CPUS_PER_TASK, and from 22.05 on reads SRUN_CPUS_PER_TASK, which sites often tell
    users to export), so the worker runs as many runs at once as fit. Explicit, so it holds
    whatever the version and the environment."""
    srun = shutil.which("srun")
    if srun is None:
        raise ShimError("srun not found on PATH: run this inside a SLURM allocation on a host "
                        "with SLURM's client commands")
    if not allocation.cpus_on_node:
        raise ShimError(f"SLURM job {allocation.job_id}: neither SLURM_CPUS_ON_NODE nor "
                        "SLURM_JOB_CPUS_PER_NODE is set: run this in the job's batch script or "
                        "salloc shell")
    n = str(allocation.num_nodes)
    return [srun, "--nodes", n, "--ntasks", n, "--ntasks-per-node", "1",
            "--cpus-per-task", str(allocation.cpus_on_node), "--kill-on-bad-exit=0",
            shim, "slurm", "worker"]


def wait_for_workers(connection: Connection, allocation: Allocation, deadline: float,
                     say: Callable[[str], None]) -> list[str]:
    """The allocation's online workers, once there is one per node; one-line error at the
    deadline."""
    end = time.monotonic() + deadline
    announced = False
    while True:
        mine = [n for n in workers_online(connection, POOL) if n.startswith(allocation.worker_prefix)]
        if len(mine) >= allocation.num_nodes:
            return mine
        if time.monotonic() >= end:
            raise ShimError(
                f"{len(mine)} of {allocation.num_nodes} workers of SLURM job {allocation.job_id} "
                f"online on pool {POOL} after {deadline:.0f} s: start them before SIERRA with "
                f"`sierra-prefect slurm workers &` and look at the job's output for their error "
                f"({README_HINT})")
        if not announced:
            say(f"waiting up to {deadline:.0f} s for the workers of SLURM job {allocation.job_id} "
                f"({len(mine)} of {allocation.num_nodes} online)")
            announced = True
        time.sleep(0.5)  # a poll interval: the deadline is what counts


__all__ = [
    "DEPLOYMENT",
    "POOL",
    "Allocation",
    "QueueApi",
    "SlurmWorker",
    "connect",
    "node_prefect_home",
    "queue_for",
    "wait_for_workers",
    "workers_argv",
]

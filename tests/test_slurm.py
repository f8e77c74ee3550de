"""SIERRA's stage 2 inside a real SLURM allocation, on the allocation's own workers.

A single-node SLURM cluster (tests/slurm_support.py: munged, slurmctld, slurmd on loopback)
and the session's stack (server + credential, its own local worker on ``sierra-pool``). The
job script is the README's ("On a SLURM cluster"): ``sierra-prefect slurm workers &``, then
SIERRA with ``--execenv prefectdeploy.slurm``. The test submits it with ``sbatch`` and
checks, after the job ended:

- SIERRA exited 0 inside the job, and every run's output is there;
- every run ran under the allocation's worker step (SLURM_JOB_ID and SLURM_STEP_ID as the
  run saw them), its flow run went to the allocation's queue on ``sierra-slurm-pool``, and
  the stack's own worker took nothing;
- cores per run = SLURM_CPUS_PER_TASK: each run's CPU affinity and OMP_NUM_THREADS;
- no process of the allocation is left once the job ended (the worker's pids, and any
  process carrying the job's SLURM_JOB_ID), and its queue is gone; also after ``scancel``
  in the middle of a run.

And the failing cases: a job whose stack has no credential, or whose server does not
answer, gets one line from the worker and from SIERRA, SIERRA exits non-zero, no run ran.
"""

from __future__ import annotations

import itertools
import re
import shlex
import socket
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest

from benchmarks.common import max_at_once
from flows.plan import batch_tag
from sierra_prefect.slurm import POOL
from tests import sierra_support as ss
from tests.helpers import wait_until
from tests.slurm_support import SlurmCluster

pytestmark = [pytest.mark.sierra, pytest.mark.slow]

N_EXPERIMENTS, N_RUNS = 2, 2
# Job shapes: (tasks per node, CPUs per task). SIERRA's hpc.slurm reads a task as one run
# at a time and CPUs per task as one run's cores. On this 2-CPU machine: one run at a time
# on both CPUs, or two at once on one CPU each (the worker gets the node's whole share).
SHAPES = {"per-batch": (1, 2), "per-exp": (2, 1)}
# sbatch for one, salloc (a shell on this, the "login" host, steps on the node) for the other.
HOW = {"per-batch": "sbatch", "per-exp": "salloc"}
RUN_SECONDS = "1.5"  # long enough that runs started together overlap on a loaded machine
WORKER_LINE = re.compile(r"slurm worker (\S+) \(pid (\d+), worker pid (\d+)\)")


def job_script(path: Path, sierra_argv: list[str], tasks: int, cpus: int,
               workers: bool = True) -> Path:
    """The README's job script, with the venv on PATH from the submitting environment
    (the README activates it) and SIERRA as ``python -m sierra.main``."""
    path.write_text(f"""#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node={tasks}
#SBATCH --cpus-per-task={cpus}
{"sierra-prefect slurm workers &" if workers else "# (no workers started)"}
{shlex.join(sierra_argv)}
status=$?
echo "sierra exited $status"
exit $status
""")
    return path


def _flow_runs(stack, root: Path) -> list[dict]:
    tags = {batch_tag(str(c.parent)) for c in root.rglob("commands.txt")}
    reply = httpx.post(f"{stack.api_url}/flow_runs/filter", timeout=30, headers=stack.headers,
                       json={"flow_runs": {"tags": {"any_": sorted(tags)}}})
    reply.raise_for_status()
    return reply.json()


def _queues(stack) -> list[str]:
    reply = httpx.post(f"{stack.api_url}/work_pools/{POOL}/queues/filter", timeout=30,
                       headers=stack.headers, json={})
    reply.raise_for_status()
    return [q["name"] for q in reply.json()]


def _job_processes(job: str) -> list[psutil.Process]:
    """Processes whose environment says they belong to SLURM job ``job``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _gone(pid: int, started: float | None) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) > 0.01 if started else False
    except psutil.NoSuchProcess:
        return True


def _submit(cluster: SlurmCluster, tmp_path: Path, env: dict[str, str], root: Path,
            paradigm: str, how: str = "sbatch", seconds: str = RUN_SECONDS,
            workers: bool = True) -> tuple[str, Path]:
    """The job script through ``sbatch``, or through ``salloc`` (``salloc OPTIONS bash
    job.sh``: the script's commands in the salloc shell, as typed at a prompt)."""
    tasks, cpus = SHAPES[paradigm]
    argv = ss.sierra_argv(root, execenv="prefectdeploy.slurm", paradigm=paradigm,
                          n_runs=N_RUNS, n_experiments=N_EXPERIMENTS,
                          extra_args=["--exec-strict", "--toysim-duration", seconds])
    script = job_script(tmp_path / "job.sh", argv, tasks, cpus, workers)
    output = tmp_path / "job.out"
    # What many sites tell users to export for srun since SLURM 22.05: the workers' srun must
    # still get all the job's CPUs on the node, not one run's.
    env = {**env, "SRUN_CPUS_PER_TASK": str(cpus)}
    if how == "salloc":
        _, job = cluster.salloc(script, ss.sierra_env(base=env), output, "--nodes=1",
                                f"--ntasks-per-node={tasks}", f"--cpus-per-task={cpus}")
    else:
        job = cluster.sbatch(script, ss.sierra_env(base=env), "--output", str(output))
    return job, output


def _check_flow_run(flow_run: dict, job: str, worker_name: str, cores: int, stack) -> None:
    """The flow run went to the allocation's queue of sierra-slurm-pool and its worker took
    it (the stack's own worker polls sierra-pool only), with the allocation's cores per run."""
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    # Prefect labels the flow run with the worker that took it; the queue keeps its name
    # after the allocation's queue is deleted.
    assert flow_run["labels"].get("prefect.worker.name") == worker_name, flow_run["labels"]
    assert flow_run["labels"].get("prefect.work-pool.name") == POOL, flow_run["labels"]
    assert flow_run["work_queue_name"] == f"slurm-{job}", flow_run
    assert flow_run["parameters"].get("cores_per_run") == cores, flow_run["parameters"]
    infra = str(flow_run.get("infrastructure_pid") or "")
    assert infra, flow_run
    # Its process was started by the allocation's worker: a pid that no longer runs (it
    # ended with the job), not the stack's worker, which still runs.
    stack_workers = set(stack.status().get("pids", {}).get("workers") or [])
    assert int(infra.rsplit(":", 1)[-1]) not in stack_workers, (infra, stack_workers)


@pytest.mark.parametrize("paradigm", SHAPES)
def test_sierra_batch_runs_on_the_allocations_worker(slurm_cluster, stack, tmp_path, paradigm):
    tasks, cpus_per_task = SHAPES[paradigm]
    if tasks * cpus_per_task > slurm_cluster.cpus:
        pytest.skip(f"the job needs {tasks * cpus_per_task} CPUs, this machine has {slurm_cluster.cpus}")
    root = tmp_path / "sierra-root"
    job, output = _submit(slurm_cluster, tmp_path, stack.env, root, paradigm, HOW[paradigm])

    # While the job runs: note the allocation's worker processes (pid and start time).
    pids: dict[int, float | None] = {}

    step_cpus: list[int | None] = []

    def worker_started():
        text = output.read_text(errors="replace") if output.exists() else ""
        match = WORKER_LINE.search(text)
        if match:
            step_cpus.append(slurm_cluster.step_cpus(job))  # the workers' step, while it runs
            for pid in map(int, match.group(2, 3)):
                try:
                    pids[pid] = psutil.Process(pid).create_time()
                except psutil.NoSuchProcess:
                    pids[pid] = None
        return match or slurm_cluster.job_state(job)[0] in {"COMPLETED", "FAILED", "CANCELLED"}

    wait_until(worker_started, 120, f"the worker of job {job} to start (output {output})")
    # The workers' step has all the job's CPUs on the node, not one task's.
    assert step_cpus == [tasks * cpus_per_task], step_cpus
    state, code = slurm_cluster.wait_job_done(job)
    text = output.read_text(errors="replace")
    assert (state, code) == ("COMPLETED", "0:0"), f"job {job}: {state} {code}\n{text[-4000:]}"
    assert "sierra exited 0" in text, text[-4000:]
    match = WORKER_LINE.search(text)
    assert match, text[-4000:]
    worker_name = match.group(1)
    assert worker_name.startswith(f"slurm-{job}-"), worker_name
    assert f"Cores per experimental run: {cpus_per_task} (SLURM_CPUS_PER_TASK)" in text, text[-4000:]

    # Every run done, each by the allocation's worker step, on CPUs of its own.
    batch = ss.expected_batch_root(root, N_EXPERIMENTS)
    assert ss.missing_outputs(batch) == []
    runs = ss.run_resources(batch)
    assert len(runs) == N_EXPERIMENTS * N_RUNS
    for run in runs:
        assert run["slurm_job_id"] == job, run
        assert run["slurm_step_id"] is not None and run["slurm_step_id"] != "batch", run
        assert len(run["cpus_allowed"]) == cpus_per_task, run
        assert run["sched_getaffinity"] == run["cpus_allowed"], run
        assert run["omp_num_threads"] == str(cpus_per_task), run
    # One step ran them all: the worker's (srun's step, not the batch script).
    assert len({run["slurm_step_id"] for run in runs}) == 1, runs
    # As many at once as the job's tasks per node (its CPUs // cores per run), never sharing
    # a CPU: the worker got all the job's CPUs on the node, not one task's.
    assert max_at_once((r["start"], r["end"]) for r in runs) == tasks, runs
    for a, b in itertools.combinations(runs, 2):
        if a["start"] < b["end"] and b["start"] < a["end"]:
            assert not set(a["cpus_allowed"]) & set(b["cpus_allowed"]), (a, b)

    # The flow run went to the allocation's queue of sierra-slurm-pool (the stack's own
    # worker polls sierra-pool only), with the allocation's cores per run.
    flow_runs = _flow_runs(stack, root)
    assert len(flow_runs) == (N_EXPERIMENTS if paradigm == "per-exp" else 1), flow_runs
    for flow_run in flow_runs:
        _check_flow_run(flow_run, job, worker_name, cpus_per_task, stack)

    # After the job: nothing of the allocation runs, and its queue was removed.
    assert pids, "the worker's pids were not seen while the job ran"
    wait_until(lambda: all(_gone(pid, t) for pid, t in pids.items()), 60,
               f"the worker processes {sorted(pids)} of job {job} to exit")
    wait_until(lambda: not _job_processes(job), 60, f"no process of job {job} left")
    assert f"slurm-{job}" not in _queues(stack)
    # The worker stopped gracefully at the end of the step (one signal, SLURM's), not
    # killed by Prefect's "second signal: SIGKILL", which would lose its shutdown.
    assert f"slurm worker {worker_name} ended (exit 0)" in text, text[-4000:]


def test_scancel_mid_batch_leaves_nothing_running(slurm_cluster, stack, tmp_path):
    """``scancel`` while a run runs: SLURM ends the job, and with it the worker, the flow
    run and the experimental run (every process of the job, by pid); the run's logs stay."""
    root = tmp_path / "sierra-root"
    job, output = _submit(slurm_cluster, tmp_path, stack.env, root, "per-batch", seconds="120")

    def running_run():
        return [p for p in _job_processes(job)
                if any(arg.endswith("/toysim.py") for arg in _cmdline(p))]

    wait_until(running_run, 120, f"a run of job {job} to run (output {output})")
    procs = _job_processes(job)  # the script, SIERRA, the worker, its flow run, the run, ...
    started = {p.pid: p.create_time() for p in procs}
    result = subprocess.run(["scancel", job], env=slurm_cluster.client_env(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    state, _ = slurm_cluster.wait_job_done(job)
    assert state == "CANCELLED", state
    wait_until(lambda: all(_gone(pid, t) for pid, t in started.items()), 60,
               f"the processes {sorted(started)} of job {job} to end")
    wait_until(lambda: not _job_processes(job), 60, f"no process of job {job} left")
    # The run was killed, not finished, and its attempt's logs are kept.
    logs = list(root.rglob("sierra-prefect/runs/*/attempt-001.stdout"))
    assert logs, "no run started"
    assert ss.missing_outputs(ss.expected_batch_root(root, N_EXPERIMENTS))


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _no_credential(stack, tmp_path: Path) -> tuple[dict[str, str], str]:
    """A SIERRA_PREFECT_HOME that knows the stack's server but holds no credential."""
    home = tmp_path / "home-without-credential"
    home.mkdir(mode=0o700)
    (home / "stack.json").write_text((stack.home / "stack.json").read_text())
    env = {**stack.env, "SIERRA_PREFECT_HOME": str(home)}
    env.pop("SIERRA_PREFECT_AUTH_STRING", None)
    return env, (f"no credential for the Prefect server at {stack.api_url}: "
                 f"{home / 'auth-string'} does not exist")


def _no_server(stack, tmp_path: Path) -> tuple[dict[str, str], str]:
    """The stack's credential, but a server address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    env = {**stack.env, "PREFECT_API_URL": url, "SIERRA_PREFECT_AUTH_STRING": stack.auth_string}
    return env, f"Prefect server at {url} is unreachable from node "


@pytest.mark.parametrize("broken", [_no_credential, _no_server], ids=["no-credential", "no-server"])
def test_a_job_without_its_stack_fails_in_one_line(slurm_cluster, stack, tmp_path, broken):
    """The worker says what is wrong in one line and exits, SIERRA stops before stage 2
    with one line, the job fails, and no run ran."""
    env, reason = broken(stack, tmp_path)
    root = tmp_path / "sierra-root"
    job, output = _submit(slurm_cluster, tmp_path, env, root, "per-batch")
    state, code = slurm_cluster.wait_job_done(job)
    text = output.read_text(errors="replace")
    assert state == "FAILED" and code != "0:0", f"job {job}: {state} {code}\n{text[-4000:]}"
    worker_errors = [ln for ln in text.splitlines()
                     if ln.startswith(f"sierra-prefect: error: {reason}")]
    assert len(worker_errors) == 1, text[-4000:]
    # SIERRA's stage 2 stops with the check's line (the same reason), no traceback.
    sierra_errors = [ln for ln in text.splitlines()
                     if ln.startswith("--execenv=prefectdeploy.slurm: ") and reason.split(":")[0] in ln]
    assert len(sierra_errors) == 1, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert "sierra exited 0" not in text
    assert stack.auth_string not in text  # the credential is never shown
    batch = ss.expected_batch_root(root, N_EXPERIMENTS)
    assert ss.missing_outputs(batch) == ss.expected_outputs(batch)
    wait_until(lambda: not _job_processes(job), 60, f"no process of job {job} left")


def test_forgotten_workers_fail_in_one_line(slurm_cluster, stack, tmp_path):
    """A job script without `sierra-prefect slurm workers &`: SIERRA waits for the
    allocation's workers (here 3 s), then stops in one line saying how to start them."""
    env = {**stack.env, "SIERRA_PREFECT_SLURM_WORKER_TIMEOUT": "3"}
    root = tmp_path / "sierra-root"
    job, output = _submit(slurm_cluster, tmp_path, env, root, "per-batch", workers=False)
    state, _ = slurm_cluster.wait_job_done(job)
    text = output.read_text(errors="replace")
    assert state == "FAILED", f"job {job}: {state}\n{text[-4000:]}"
    errors = [ln for ln in text.splitlines() if ln.startswith("--execenv=prefectdeploy.slurm: ")]
    assert len(errors) == 1, text[-4000:]
    assert (f"0 of 1 workers of SLURM job {job} online on pool {POOL} after 3 s: start them "
            "before SIERRA with `sierra-prefect slurm workers &`") in errors[0]
    assert "Traceback" not in text
    batch = ss.expected_batch_root(root, N_EXPERIMENTS)
    assert ss.missing_outputs(batch) == ss.expected_outputs(batch)

"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd on loopback.

Debian's ``slurm-wlm`` and ``munge`` (scripts/setup.sh --test installs them). Everything
lives in a temp directory: a fresh munge key and socket, a generated ``slurm.conf`` with
free ports, state and spool directories, logs. Clients (``sbatch``, ``squeue``, ...) find
it through ``SLURM_CONF`` (:attr:`SlurmCluster.env`). The daemons run in the foreground as
this test's children, each in its own session, and are stopped by pid. Job ids start at a
random number, so two clusters of one test session never give the same id to two jobs
(queue names on a shared stack are per job id).

Settings chosen for a container: ``proctrack/linuxproc`` (tracks a step's processes by
parentage, no cgroups needed; SLURM still signals everything a step started when the step
or job ends) and ``task/affinity`` (binds each task to its CPUs with sched_setaffinity, so
a job sees only its own CPUs). ``SlurmUser`` is root: the tests run as root.

Use (the ``slurm_cluster`` fixture does this)::

    cluster = SlurmCluster(tmp_dir)
    cluster.start()                    # returns when the node is idle, within a deadline
    job = cluster.sbatch(script, env)  # the job id
    proc, job = cluster.salloc(script, env, output, "--cpus-per-task=2")  # salloc bash SCRIPT
    cluster.wait_job_done(job)         # its final state and exit code
    cluster.stop()
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from sierra_prefect.processes import terminate
from tests.helpers import wait_until

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "spnode0"
PARTITION = "sptest"
START_DEADLINE = 60.0
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def missing_parts() -> str | None:
    """What this machine lacks to run the cluster (None: nothing)."""
    for daemon in DAEMONS:
        if not _find(daemon):
            return f"{daemon} not found: install Debian's slurm-wlm and munge (scripts/setup.sh --test)"
    for client in ("sbatch", "srun", "squeue", "scontrol", "sinfo"):
        if not shutil.which(client):
            return f"{client} not found: install Debian's slurm-wlm (scripts/setup.sh --test)"
    if os.geteuid() != 0:
        return "the SLURM cluster of the tests runs its daemons as root: run the tests as root"
    return None


def _find(daemon: str) -> str | None:
    return shutil.which(daemon) or next(
        (str(p) for p in (Path("/usr/sbin") / daemon, Path("/sbin") / daemon) if p.exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd (one node, all this machine's usable CPUs) in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.cpus = len(os.sched_getaffinity(0))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs: list[str] = []
        self.sallocs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """What a SLURM client needs to talk to this cluster (add to a job's environment)."""
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), **self.env}

    # -- start / ready / stop -----------------------------------------------------------

    def start(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._write_conf()
        munge = self.root / "munge"
        self._spawn("munged", [_find("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={munge / 'munged.pid'}",
                               f"--seed-file={munge / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        wait_until(lambda: self.munge_socket.exists(), START_DEADLINE, "munged's socket")
        self._spawn("slurmctld", [_find("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_find("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        wait_until(self._node_idle, START_DEADLINE, f"SLURM node {NODE} idle (logs: {self.root / 'log'})")

    def _write_conf(self) -> None:
        host = socket.gethostname()
        root = self.root
        self.conf.write_text("\n".join([
            "ClusterName=sptest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            # No cgroups in a container: track by parentage, bind CPUs with affinity.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/affinity",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "MpiDefault=none",
            # Seconds between SIGTERM and SIGKILL for what a job leaves when it ends.
            "KillWait=10",
            "InactiveLimit=0",
            "MinJobAge=600",  # finished jobs stay visible to scontrol for the assertions
            f"FirstJobId={random.randint(1000, 900000)}",
            f"NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        with log:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **self.env},
            )

    def _node_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode} while starting: "
                                     f"{self.log_tail(name)}")
        result = subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%t"], env=self.client_env(),
                                capture_output=True, text=True, timeout=30)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def log_tail(self, name: str, lines: int = 15) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(texts)

    def stop(self) -> None:
        """Cancel the jobs this cluster ran that still run, then stop the daemons we started,
        by pid (slurmd last but one: it ends its job steps; munged last)."""
        for proc in self.sallocs:  # ours, by pid: its shell ends with it
            if proc.poll() is None:
                terminate([psutil.Process(proc.pid)], grace=20)
        for job in self.jobs:
            if self.job_state(job)[0] not in FINAL_STATES:
                subprocess.run(["scancel", job], env=self.client_env(), capture_output=True, timeout=30)
        for job in self.jobs:
            try:
                self.wait_job_done(job, deadline=60)
            except AssertionError:
                pass  # stopped below with the daemons
        for name in ("slurmctld", "slurmd", "munged"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                terminate([psutil.Process(proc.pid)], grace=20)
                proc.wait(timeout=10)

    # -- jobs ---------------------------------------------------------------------------

    def sbatch(self, script: Path, env: dict[str, str], *options: str) -> str:
        """Submit ``script`` with ``env`` (plus SLURM_CONF); its job id."""
        result = subprocess.run(["sbatch", "--parsable", *options, str(script)],
                                env={**env, **self.env}, capture_output=True, text=True,
                                timeout=60, cwd=script.parent)
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        job = result.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def salloc(self, script: Path, env: dict[str, str], output: Path,
               *options: str) -> tuple[subprocess.Popen, str]:
        """``salloc OPTIONS bash SCRIPT`` in the background (as a user types it, the shell
        then runs on this host, the job steps on the node), all output to ``output``; the
        process and the job id (from salloc's "Granted job allocation N")."""
        with open(output, "wb") as out:
            proc = subprocess.Popen(["salloc", *options, "bash", str(script)], env={**env, **self.env},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=script.parent, start_new_session=True)
        self.sallocs.append(proc)

        def granted():
            if proc.poll() is not None and proc.returncode != 0:
                raise AssertionError(f"salloc exited {proc.returncode}: {output.read_text()}")
            return re.search(r"Granted job allocation (\d+)", output.read_text(errors="replace"))

        job = wait_until(granted, START_DEADLINE, f"salloc's allocation (output {output})").group(1)
        self.jobs.append(job)
        return proc, job

    def job_state(self, job: str) -> tuple[str, str]:
        """(JobState, ExitCode) as scontrol shows them, e.g. ("COMPLETED", "0:0")."""
        result = subprocess.run(["scontrol", "-o", "show", "job", job], env=self.client_env(),
                                capture_output=True, text=True, timeout=30)
        state = re.search(r"\bJobState=(\S+)", result.stdout)
        code = re.search(r"\bExitCode=(\S+)", result.stdout)
        return (state.group(1) if state else "UNKNOWN", code.group(1) if code else "")

    def step_cpus(self, job: str, step: str = "0") -> int | None:
        """CPUs SLURM allocated to job step ``job.step`` while it runs (None once it ended)."""
        result = subprocess.run(["scontrol", "-o", "show", "step", f"{job}.{step}"],
                                env=self.client_env(), capture_output=True, text=True, timeout=30)
        match = re.search(r"\bTRES=\S*?cpu=(\d+)", result.stdout)
        return int(match.group(1)) if match else None

    def wait_job_done(self, job: str, deadline: float = 240.0) -> tuple[str, str]:
        return wait_until(lambda: (s := self.job_state(job))[0] in FINAL_STATES and s,
                          deadline, f"SLURM job {job} to end", interval=0.5)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """A SLURM cluster for the test module (skipped if parts are missing: under CI=true,
    tests/ci_support.py turns that skip into a failure naming the part)."""
    missing = missing_parts()
    if missing:
        pytest.skip(missing)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

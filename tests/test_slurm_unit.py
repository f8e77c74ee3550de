"""Unit tests of the SLURM pieces that need no cluster: the allocation read from SLURM's
variables, the srun line of ``slurm workers``, the queue ``run`` picks, and the
``prefectdeploy.slurm`` plugin's options (cores per run from SLURM_CPUS_PER_TASK, the
allocation's queue, one-line errors outside an allocation)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from sierra_prefect.errors import ShimError
from sierra_prefect.slurm import Allocation, queue_for, workers_argv
from tests import sierra_support as ss

if str(ss.PREFECT_PLUGIN_PATH) not in sys.path:
    sys.path.insert(0, str(ss.PREFECT_PLUGIN_PATH))

from prefectdeploy import common
from prefectdeploy.slurm import cmdline as slurm_cmdline
from prefectdeploy.slurm import plugin as slurm_plugin

ALL_STAGES = [-1, 1, 2, 3, 4, 5]
# What SLURM sets in a batch script of `sbatch -N 2 --ntasks-per-node=4 --cpus-per-task=2`.
BATCH_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURMD_NODENAME": "n01",
             "SLURM_NODEID": "0", "SLURM_CPUS_PER_TASK": "2", "SLURM_CPUS_ON_NODE": "8",
             "SLURM_TASKS_PER_NODE": "4(x2)"}


@pytest.fixture
def in_allocation(monkeypatch, tmp_path):
    for key, value in BATCH_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(common.SHIM_ENV, "/opt/shim/sierra-prefect")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def outside(monkeypatch):
    for key in (*BATCH_ENV, "SLURM_JOBID", "SLURM_NNODES"):
        monkeypatch.delenv(key, raising=False)


def test_allocation_from_slurms_variables():
    alloc = Allocation.from_environment(BATCH_ENV)
    assert (alloc.job_id, alloc.num_nodes, alloc.node_name, alloc.cpus_per_task,
            alloc.cpus_on_node) == ("4242", 2, "n01", 2, 8)
    assert alloc.queue == "slurm-4242"
    assert alloc.worker_name == "slurm-4242-n01"


def test_outside_an_allocation_is_one_line(outside):
    with pytest.raises(ShimError) as err:
        Allocation.from_environment()
    message = str(err.value)
    assert "\n" not in message and "SLURM_JOB_ID is not set" in message and "sbatch" in message


def test_workers_get_the_whole_node_share_not_one_task(tmp_path, monkeypatch):
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = workers_argv(Allocation.from_environment(BATCH_ENV), "/venv/bin/sierra-prefect")
    assert argv == [str(srun), "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1",
                    "--cpus-per-task", "8", "--kill-on-bad-exit=0",
                    "/venv/bin/sierra-prefect", "slurm", "worker"]
    # A salloc shell has no SLURM_CPUS_ON_NODE, only the job's CPUs per node.
    salloc = {k: v for k, v in BATCH_ENV.items() if k != "SLURM_CPUS_ON_NODE"}
    salloc["SLURM_JOB_CPUS_PER_NODE"] = "6(x2)"
    argv = workers_argv(Allocation.from_environment(salloc), "/venv/bin/sierra-prefect")
    assert argv[argv.index("--cpus-per-task") + 1] == "6"
    del salloc["SLURM_JOB_CPUS_PER_NODE"]
    with pytest.raises(ShimError, match="neither SLURM_CPUS_ON_NODE nor SLURM_JOB_CPUS_PER_NODE"):
        workers_argv(Allocation.from_environment(salloc), "/venv/bin/sierra-prefect")


def test_run_sends_sierra_slurm_to_the_allocations_queue(in_allocation):
    assert queue_for("sierra/slurm", None) == "slurm-4242"
    assert queue_for("sierra/slurm", "mine") == "mine"
    assert queue_for("sierra/local", None) is None


def test_run_of_sierra_slurm_outside_an_allocation_fails_in_one_line(outside):
    with pytest.raises(ShimError, match="not inside a SLURM allocation"):
        queue_for("sierra/slurm", None)
    assert queue_for("sierra/local", None) is None


# --- the prefectdeploy.slurm plugin ----------------------------------------------------


def configured(*argv: str, engine: str = "none"):
    """args after the plugin's cmdline_postparse_configure, and the cmdopts from them."""
    from sierra.core.cmdline import CoreCmdline
    from sierra.plugins.engine.argos import cmdline as argos_cmdline

    core = CoreCmdline([], ALL_STAGES).parser
    parents = [argos_cmdline.build([core], ALL_STAGES).parser] if engine == "argos" else [core]
    args = slurm_cmdline.build(parents, ALL_STAGES).parser.parse_args(list(argv))
    args = slurm_plugin.cmdline_postparse_configure(args)
    opts = slurm_cmdline.to_cmdopts(args)
    opts.update(execenv="prefectdeploy.slurm", sierra_root=Path("/srv/root"))
    return args, opts


def generated(opts: dict) -> list[str]:
    root = Path("/srv/root/p/c/s/batch")
    exec_opts = {"batch_root": str(root), "batch_scratch_root": str(root / "scratch"),
                 "cmdfile_stem_path": str(root / "commands"), "cmdfile_ext": ".txt",
                 "exec_resume": False, "n_jobs": opts["exec_jobs_per_node"], "nodefile": None}
    (spec,) = slurm_plugin.BatchShellCmdsGenerator(opts).exec_batch_cmds(exec_opts)
    return shlex.split(spec.cmd)


def _value(argv: list[str], option: str) -> str | None:
    return argv[argv.index(option) + 1] if option in argv else None


def test_cores_per_run_and_queue_from_the_allocation(in_allocation):
    args, opts = configured()
    assert args.exec_cores_per_run == 2
    argv = generated(opts)
    assert argv[:3] == ["/opt/shim/sierra-prefect", "run", "sierra/slurm"]
    assert _value(argv, "--cores-per-run") == "2"
    assert _value(argv, "--work-queue") == "slurm-4242"
    assert _value(argv, "--workdir") == str(in_allocation)
    assert "--max-parallel" not in argv  # the worker decides, from its node's CPUs


def test_exec_cores_per_run_wins_over_slurm(in_allocation):
    args, opts = configured("--exec-cores-per-run", "3")
    assert _value(generated(opts), "--cores-per-run") == "3"


def test_argos_gets_one_physics_engine_per_cpu_as_under_hpc_slurm(in_allocation):
    args, _ = configured(engine="argos")
    assert args.physics_n_engines == 2


def test_no_cpus_per_task_is_one_line(in_allocation, monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    with pytest.raises(SystemExit) as err:
        configured()
    message = str(err.value.code)
    assert message.startswith("--execenv=prefectdeploy.slurm: SLURM_CPUS_PER_TASK is not set")
    assert "--cpus-per-task" in message and "\n" not in message


def test_outside_an_allocation_sierra_stops_in_one_line(outside):
    with pytest.raises(SystemExit) as err:
        configured()
    message = str(err.value.code)
    assert message.startswith("--execenv=prefectdeploy.slurm: not inside a SLURM allocation")
    assert "\n" not in message


def test_stages_without_runs_need_no_allocation(outside):
    """Stages 3-5 (e.g. on the login host after the job) do not look for SLURM."""
    args, _ = configured("--pipeline", "3", "4")
    assert args.work_queue is None

"""SIERRA execution environment ``prefectdeploy.slurm``.

Runs stage 2 inside a SLURM allocation on the ``sierra/slurm`` Prefect deployment, whose
flow runs go to the allocation's own queue (``slurm-<SLURM_JOB_ID>``) and are taken only
by the allocation's workers (``sierra-prefect slurm workers``). See :mod:`prefectdeploy`
and the README ("On a SLURM cluster").
"""


def sierra_plugin_type() -> str:
    return "pipeline"

"""SIERRA execution environment plugins that run stage 2 on Prefect deployments.

Put ``<repo>/sierra_plugins`` on ``SIERRA_PLUGIN_PATH`` and select one with
``--execenv``:

- ``prefectdeploy.local``: runs go to the ``sierra/local`` deployment (process
  work pool).
- ``prefectdeploy.dockerremote``: runs go to the ``sierra/dockerremote``
  deployment (Docker work pool); adds ``--docker-image``,
  ``--docker-extra-mounts`` and ``--docker-is-host-user``.
- ``prefectdeploy.slurm``: inside a SLURM allocation, runs go to the
  ``sierra/slurm`` deployment on the allocation's own queue
  (``slurm-<SLURM_JOB_ID>``), taken by the workers ``sierra-prefect slurm
  workers`` started on its nodes; cores per run from ``SLURM_CPUS_PER_TASK``.

All are thin: for each batch (per-batch paradigm) or each experiment (per-exp
paradigm) they emit exactly one shell command, ``sierra-prefect run ...``, and
SIERRA runs it. Server, workers, pools and deployments are managed outside
SIERRA with ``sierra-prefect up``; stage 2 starts by checking them with
``sierra-prefect check`` and stops with an error telling you to run
``sierra-prefect up`` if they are not there.

This package (the parent folder of the plugins) holds what they share:
:mod:`prefectdeploy.cmdline` (options) and :mod:`prefectdeploy.common` (command
building and the stage 2 check). It carries no ``.sierraplugin`` marker, so
SIERRA does not treat it as a plugin itself.
"""

"""SIERRA execution environment ``prefectdeploy.local``.

Runs stage 2 on the ``sierra/local`` Prefect deployment (process work pool)
through ``sierra-prefect run``. See :mod:`prefectdeploy`.
"""


def sierra_plugin_type() -> str:
    return "pipeline"

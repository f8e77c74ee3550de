"""SIERRA execution environment ``prefectdeploy.dockerremote``.

Runs stage 2 on the ``sierra/dockerremote`` Prefect deployment (Docker work
pool) through ``sierra-prefect run``. See :mod:`prefectdeploy`.
"""


def sierra_plugin_type() -> str:
    return "pipeline"

"""The ``sptest.toysim`` engine: a stdlib-only CSV-writing toy simulator.

Found by SIERRA through the ``.sierraplugin`` marker next to this file when
``<repo>/tests/sierra_engine`` is on ``SIERRA_PLUGIN_PATH``.
"""


def sierra_plugin_type() -> str:
    return "pipeline"

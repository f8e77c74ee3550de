"""The ``sptest.toyproj`` project: drives the ``sptest.toysim`` engine.

One batch criterion, ``toyparam.C<N>`` (N experiments whose ``value`` is
0..N-1), no controllers.yaml (any ``--controller`` name is accepted), one
scenario family (any ``--scenario`` name).
"""


def sierra_plugin_type() -> str:
    return "project"

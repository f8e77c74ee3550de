"""Test-only SIERRA plugins for sierra-prefect.

``sptest.toysim`` is a tiny engine whose "simulator" is a stdlib-only Python
script writing CSV files; ``sptest.toyproj`` is the matching project (one batch
criterion, ``toyparam.C<N>``, N experiments). Point SIERRA at them with
``SIERRA_PLUGIN_PATH=<repo>/tests/sierra_engine``.
"""

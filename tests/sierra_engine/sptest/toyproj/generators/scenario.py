"""Scenario generation for ``sptest.toyproj``: every scenario is the template as is."""

import pathlib
import typing as tp

import sierra.core.plugin as pm
from sierra.core import types
from sierra.core.experiment import definition


def to_dict(scenario: str) -> dict[str, tp.Any]:
    # No arena: toysim has no spatial extent.
    return {}


def to_generator_name(scenario: str) -> str:
    return "generate"


def generate(
    spec: tp.Any,
    controller: str,
    cmdopts: types.Cmdopts,
    expdef_template_fpath: pathlib.Path,
    **kwargs: tp.Any,
) -> definition.BaseExpDef:
    """Load the per-experiment template; runs are written as ``<stem>_run<k>.xml``."""
    module = pm.pipeline.get_plugin_module(cmdopts["expdef"])
    config = definition.WriterConfig(
        [
            {
                "src_parent": None,
                "src_tag": module.root_querypath(),
                "opath_leaf": ".xml",
                "new_children": None,
                "new_children_parent": None,
            }
        ]
    )
    return module.ExpDef(input_fpath=expdef_template_fpath, write_config=config)

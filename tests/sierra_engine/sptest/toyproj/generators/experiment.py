"""Per-run changes for ``sptest.toyproj``: output directory, seed, run length, threads."""

import pathlib

from sierra.core import types
from sierra.core.experiment import definition


def for_single_exp_run(
    exp_def: definition.BaseExpDef,
    run_num: int,
    run_output_path: pathlib.Path,
    launch_stem_path: pathlib.Path,
    random_seed: int,
    cmdopts: types.Cmdopts,
) -> definition.BaseExpDef:
    exp_def.attr_change(".//output", "dir", str(run_output_path))
    exp_def.attr_change(".//params", "seed", str(random_seed))
    exp_def.attr_change(".//params", "steps", str(cmdopts["toysim_steps"]))
    exp_def.attr_change(".//params", "duration", str(cmdopts["toysim_duration"]))
    exp_def.attr_change(".//params", "threads", str(cmdopts.get("physics_n_threads") or 0))
    return exp_def

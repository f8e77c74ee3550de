"""Batch criterion ``toyparam.C<N>``: N experiments, params/@value = 0..N-1."""

import pathlib
import re
import typing as tp

import sierra.core.variables.batch_criteria as bc
from sierra.core import types
from sierra.core.experiment import definition


class ToyParam(bc.UnivarBatchCriteria):
    def __init__(
        self,
        cli_arg: str,
        main_config: types.YAMLDict,
        batch_input_root: pathlib.Path,
        values: list[int],
    ) -> None:
        bc.UnivarBatchCriteria.__init__(self, cli_arg, main_config, batch_input_root)
        self.values = values
        self.attr_changes: list = []

    def gen_attr_changelist(self) -> list:
        if not self.attr_changes:
            self.attr_changes = [
                definition.AttrChangeSet(
                    definition.AttrChange(".//params", "value", str(v))
                )
                for v in self.values
            ]
        return self.attr_changes


def factory(
    cli_arg: str,
    main_config: types.YAMLDict,
    cmdopts: types.Cmdopts,
    batch_input_root: pathlib.Path,
    **kwargs: tp.Any,
) -> ToyParam:
    res = re.fullmatch(r"toyparam\.C(\d+)", cli_arg)
    assert res is not None and int(res.group(1)) > 0, (
        f"Bad batch criterion '{cli_arg}': expected toyparam.C<N>, N >= 1"
    )
    return ToyParam(cli_arg, main_config, batch_input_root, list(range(int(res.group(1)))))

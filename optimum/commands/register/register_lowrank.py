"""``optimum-cli lowrank optimize|passes|plugins|validate``: optimum-lowrank under Optimum's command line.

Optimum's ``optimum-cli`` imports every ``optimum/commands/register/*.py`` module it finds in
the ``optimum.commands.register`` namespace package (no ``__init__.py``, PEP 420) and registers
the commands listed in its ``REGISTER_COMMANDS``; optimum-onnx adds ``optimum-cli export onnx``
the same way. The options, output and exit statuses are those of ``optimum-lowrank``: both
parsers are built by :func:`optimum_lowrank.cli.add_commands` and run by
:func:`optimum_lowrank.cli.run`. This module stays light (optimum-cli imports it at every start):
the package is imported only when the command runs or its options are built.
"""

from __future__ import annotations

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class LowRankCommand(BaseOptimumCLICommand):
    """``optimum-cli lowrank ...``; exits with the status ``optimum-lowrank`` would."""

    COMMAND = CommandInfo(name="lowrank", help="low-rank / tensor compression of transformers (optimum-lowrank)")

    @staticmethod
    def parse_args(parser) -> None:
        from optimum_lowrank.cli import DESCRIPTION, add_commands

        parser.description = DESCRIPTION
        add_commands(parser)

    def run(self) -> None:
        from optimum_lowrank.cli import run

        sys.exit(run(self.args))


REGISTER_COMMANDS = [LowRankCommand]

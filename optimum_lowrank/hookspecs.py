"""The hook specifications of optimum-lowrank: the only contract a plugin implements.

A plugin is a module or object with functions decorated by
``optimum_lowrank.hookimpl`` and named like the specs below. Third-party
plugins are found through the ``optimum_lowrank`` entry-point group::

    # pyproject.toml of optimum-lowrank-mypass
    [project.entry-points.optimum_lowrank]
    mypass = "optimum_lowrank_mypass"

The built-in passes are registered through these same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.plugins import PassRegistry

PROJECT_NAME = "optimum_lowrank"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def lowrank_register_passes(register: PassRegistry) -> None:
    """Register compression passes.

    Call ``register(MyPass)`` once per pass, where ``MyPass`` subclasses
    :class:`optimum_lowrank.api.CompressionPass` and sets ``name`` (the
    recipe's ``pass:`` id), ``config_class`` (a pydantic model deriving from
    :class:`~optimum_lowrank.api.PassConfig`) and ``target_types``.

    Parameters
    ----------
    register : PassRegistry
        Callable; ``register(pass_class)``.

    Raises
    ------
    DuplicatePassError
        If another plugin already registered a pass with the same ``name``.
    """

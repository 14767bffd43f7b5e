"""The plugin manager and the pass registry.

Environment variables
---------------------
``OPTIMUM_LOWRANK_DISABLE_AUTOLOAD``
    If set to a non-empty value other than ``0``, third-party plugins are not
    loaded from the ``optimum_lowrank`` entry-point group (built-ins still are).
``OPTIMUM_LOWRANK_BLOCK_PLUGINS``
    Comma-separated plugin names (entry-point names) that are never loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import pluggy

from optimum_lowrank import hookspecs
from optimum_lowrank.errors import DuplicatePassError, LowRankError

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.api import CompressionPass

__all__ = ["PassRegistry", "RegisteredPass", "get_plugin_manager", "get_registry"]

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
DISABLE_AUTOLOAD_ENV = "OPTIMUM_LOWRANK_DISABLE_AUTOLOAD"
BLOCK_PLUGINS_ENV = "OPTIMUM_LOWRANK_BLOCK_PLUGINS"
BUILTIN_PLUGINS = (
    "optimum_lowrank.passes.svd",
    "optimum_lowrank.passes.linear.activation_svd",
    "optimum_lowrank.passes.linear.softlm",
    "optimum_lowrank.passes.embedding.autoencoder",
    "optimum_lowrank.passes.embedding.tt",
    "optimum_lowrank.passes.embedding.fourier",
)


@dataclass(frozen=True)
class RegisteredPass:
    """A pass class and the plugin that registered it."""

    pass_class: type[CompressionPass]
    plugin: str


class PassRegistry:
    """Pass id -> pass class, filled by the ``lowrank_register_passes`` hook.

    Calling the registry registers a pass: ``register(MyPass)``.
    """

    def __init__(self) -> None:
        self._passes: dict[str, RegisteredPass] = {}
        self._current_plugin = "<direct>"

    def __call__(self, pass_class: type[CompressionPass]) -> type[CompressionPass]:
        from optimum_lowrank.api import CompressionPass

        if not (isinstance(pass_class, type) and issubclass(pass_class, CompressionPass)):
            raise LowRankError(f"plugin {self._current_plugin!r} registered {pass_class!r}, which is not a CompressionPass subclass")
        name = getattr(pass_class, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise LowRankError(f"plugin {self._current_plugin!r}: pass {pass_class.__name__} needs a `name` that is an identifier, got {name!r}")
        if name in self._passes:
            other = self._passes[name]
            raise DuplicatePassError(
                f"pass {name!r} registered twice: by plugin {other.plugin!r} ({other.pass_class.__qualname__}) "
                f"and by plugin {self._current_plugin!r} ({pass_class.__qualname__})"
            )
        self._passes[name] = RegisteredPass(pass_class, self._current_plugin)
        return pass_class

    def get(self, name: str) -> type[CompressionPass] | None:
        entry = self._passes.get(name)
        return None if entry is None else entry.pass_class

    def names(self) -> list[str]:
        return sorted(self._passes)

    def entries(self) -> list[tuple[str, RegisteredPass]]:
        return sorted(self._passes.items())

    def collect(self, pm: pluggy.PluginManager) -> PassRegistry:
        """Call every plugin's ``lowrank_register_passes``, recording which plugin registered what."""
        for impl in pm.hook.lowrank_register_passes.get_hookimpls():
            self._current_plugin = impl.plugin_name
            try:
                impl.function(register=self)
            finally:
                self._current_plugin = "<direct>"
        return self


def _blocked() -> set[str]:
    return {name.strip() for name in os.environ.get(BLOCK_PLUGINS_ENV, "").split(",") if name.strip()}


def get_plugin_manager(load_entrypoints: bool | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-in passes and the installed plugins.

    Parameters
    ----------
    load_entrypoints : bool, optional
        Load third-party plugins from the ``optimum_lowrank`` entry-point group.
        Defaults to True unless ``OPTIMUM_LOWRANK_DISABLE_AUTOLOAD`` is set.

    Raises
    ------
    pluggy.PluginValidationError
        If a plugin implements a hook that does not exist (e.g. a misspelled name).
    """
    import importlib

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    blocked = _blocked()
    for name in blocked:
        pm.set_blocked(name)
    for module_name in BUILTIN_PLUGINS:
        if module_name not in blocked:
            pm.register(importlib.import_module(module_name), name=module_name)
    if load_entrypoints is None:
        load_entrypoints = os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0")
    if load_entrypoints:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


@lru_cache(maxsize=1)
def _default_registry(autoload: bool, blocked: frozenset[str]) -> PassRegistry:
    return PassRegistry().collect(get_plugin_manager(autoload))


def get_registry() -> PassRegistry:
    """The registry of every pass from the default plugin manager (cached per environment settings)."""
    autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0")
    return _default_registry(autoload, frozenset(_blocked()))

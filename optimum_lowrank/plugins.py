"""The plugin manager and the registries it fills: passes and accuracy metrics.

Environment variables
---------------------
``OPTIMUM_LOWRANK_DISABLE_AUTOLOAD``
    If set to a non-empty value other than ``0``, third-party plugins are not
    loaded from the ``optimum_lowrank`` entry-point group (built-ins still are).
``OPTIMUM_LOWRANK_BLOCK_PLUGINS``
    Comma-separated plugin names (entry-point names) that are never loaded.

A third-party plugin that fails to import, implements a hook that does not exist
(a misspelled name) or raises in its registration hook is left out: one warning
line names it, the error and the environment variable that blocks it, and every
command that does not need it keeps working (:func:`broken_plugins` lists them;
an unknown pass id mentions them).
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import pluggy

from optimum_lowrank import hookspecs
from optimum_lowrank.errors import DuplicateLayerError, DuplicateMetricError, DuplicatePassError, DuplicateQuantizerError, LowRankError

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self

    from optimum_lowrank.api import CompressionPass
    from optimum_lowrank.evaluation.base import Evaluator

__all__ = [
    "LayerRegistry",
    "MetricRegistry",
    "PassRegistry",
    "QuantizerRegistry",
    "RegisteredMetric",
    "RegisteredPass",
    "RegisteredQuantizer",
    "Registry",
    "get_layer_registry",
    "get_metric_registry",
    "get_plugin_manager",
    "get_quantizer_registry",
    "get_registry",
]

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
    "optimum_lowrank.passes.pruning.structured",
    "optimum_lowrank.passes.tokens.downsampling",
    "optimum_lowrank.evaluation",
    "optimum_lowrank.exporters.quantizers",
    "optimum_lowrank.layers.serial",
)


@dataclass(frozen=True)
class RegisteredPass:
    """A pass class and the plugin that registered it."""

    pass_class: type[CompressionPass]
    plugin: str


@dataclass(frozen=True)
class RegisteredMetric:
    """An evaluator class (one accuracy metric) and the plugin that registered it."""

    evaluator_class: type[Evaluator]
    plugin: str


class Registry:
    """Name -> class, filled by one ``lowrank_register_*`` hook; records which plugin registered what.

    Calling the registry registers a class: ``register(MyClass)``. Subclasses say
    what they hold (:attr:`kind`, :attr:`hook`, :attr:`duplicate_error`) and check
    each class in :meth:`check`.

    Raises
    ------
    LowRankError
        On registration, if the class fails :meth:`check` or its ``name`` is not an identifier.
    DuplicatePassError, DuplicateMetricError (``duplicate_error``)
        On registration, if another plugin already registered the same name; the
        message names both plugins and both classes.
    """

    #: What the registry holds, for messages ("pass", "metric").
    kind: ClassVar[str]
    #: The hook :meth:`collect` calls.
    hook: ClassVar[str]
    duplicate_error: ClassVar[type[LowRankError]]
    entry_class: ClassVar[type]

    def __init__(self) -> None:
        self._classes: dict[str, tuple[type, str]] = {}
        self._current_plugin = "<direct>"

    def check(self, cls: type) -> None:
        """Raise :class:`LowRankError` if ``cls`` cannot be registered here (subclasses extend)."""

    def __call__(self, cls: type) -> type:
        self.check(cls)
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise LowRankError(f"plugin {self._current_plugin!r}: {self.kind} {cls.__name__} needs a `name` that is an identifier, got {name!r}")
        if name in self._classes:
            other, plugin = self._classes[name]
            raise self.duplicate_error(
                f"{self.kind} {name!r} registered twice: by plugin {plugin!r} ({other.__qualname__}) "
                f"and by plugin {self._current_plugin!r} ({cls.__qualname__})"
            )
        self._classes[name] = (cls, self._current_plugin)
        return cls

    def get(self, name: str) -> type | None:
        """The class registered as ``name``, or None."""
        entry = self._classes.get(name) if isinstance(name, str) else None
        return None if entry is None else entry[0]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def entries(self) -> list[tuple[str, Any]]:
        """``(name, entry)`` pairs sorted by name; ``entry`` has the class and ``plugin``."""
        return [(name, self.entry_class(cls, plugin)) for name, (cls, plugin) in sorted(self._classes.items())]

    def by_plugin(self) -> dict[str, list[str]]:
        """Plugin name -> the names it registered, both in registration order (built-ins first)."""
        out: dict[str, list[str]] = {}
        for name, (_, plugin) in self._classes.items():
            out.setdefault(plugin, []).append(name)
        return out

    def collect(self, pm: pluggy.PluginManager) -> Self:
        """Call every plugin's :attr:`hook`, recording which plugin registered what.

        A third-party plugin whose hook raises anything but a :class:`LowRankError` is left
        out (what it registered is dropped) with a warning, see :func:`broken_plugins`.
        """
        for impl in getattr(pm.hook, self.hook).get_hookimpls():
            self._current_plugin = impl.plugin_name
            try:
                impl.function(register=self)
            except LowRankError:
                raise
            except Exception as err:  # a third-party hook may raise anything
                if impl.plugin_name in BUILTIN_PLUGINS:
                    raise
                self._classes = {k: v for k, v in self._classes.items() if v[1] != impl.plugin_name}
                _report_broken(impl.plugin_name, f"its {self.hook} hook raised", err)
            finally:
                self._current_plugin = "<direct>"
        return self


class PassRegistry(Registry):
    """Pass id -> pass class, filled by the ``lowrank_register_passes`` hook.

    Calling the registry registers a pass: ``register(MyPass)``.
    """

    kind = "pass"
    hook = "lowrank_register_passes"
    duplicate_error = DuplicatePassError
    entry_class = RegisteredPass

    def check(self, cls: type) -> None:
        from optimum_lowrank.api import CompressionPass

        if not (isinstance(cls, type) and issubclass(cls, CompressionPass)):
            raise LowRankError(f"plugin {self._current_plugin!r} registered {cls!r}, which is not a CompressionPass subclass")

    def get(self, name: str) -> type[CompressionPass] | None:
        return super().get(name)


class MetricRegistry(Registry):
    """Metric id -> evaluator class, filled by the ``lowrank_register_metrics`` hook.

    Calling the registry registers a metric: ``register(MyEvaluator)``, an
    :class:`~optimum_lowrank.evaluation.Evaluator` subclass that declares ``name``,
    ``config_class`` (deriving from :class:`~optimum_lowrank.recipe.AccuracyConfig`
    and naming its one threshold field in ``threshold_field``), ``model_kinds``
    (a non-empty subset of ``("encoder", "decoder")``) and ``higher_is_better``.
    """

    kind = "metric"
    hook = "lowrank_register_metrics"
    duplicate_error = DuplicateMetricError
    entry_class = RegisteredMetric

    def check(self, cls: type) -> None:
        from optimum_lowrank.evaluation.base import MODEL_KINDS, Evaluator

        who = f"plugin {self._current_plugin!r}"
        if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
            raise LowRankError(f"{who} registered {cls!r}, which is not an Evaluator subclass")
        config = getattr(cls, "config_class", None)
        # AccuracyConfig lives in recipe.py, which imports this module: check what it guarantees instead.
        threshold = getattr(config, "threshold_field", None)
        if not (isinstance(config, type) and threshold in getattr(config, "model_fields", {}) and callable(getattr(config, "acceptable", None))):
            raise LowRankError(
                f"{who}: metric {cls.__name__} needs a `config_class` deriving from AccuracyConfig whose "
                f"`threshold_field` names one of its fields, got {config!r}"
            )
        kinds = getattr(cls, "model_kinds", None)
        if not (isinstance(kinds, tuple) and kinds and set(kinds) <= set(MODEL_KINDS)):
            raise LowRankError(f"{who}: metric {cls.__name__} needs `model_kinds`, a non-empty tuple of {MODEL_KINDS}, got {kinds!r}")
        if not isinstance(getattr(cls, "higher_is_better", None), bool):
            raise LowRankError(f"{who}: metric {cls.__name__} needs `higher_is_better`, True or False")

    def get(self, name: str) -> type[Evaluator] | None:
        return super().get(name)


@dataclass(frozen=True)
class RegisteredQuantizer:
    """A quantizer class (one ``export.quantize`` method) and the plugin that registered it."""

    quantizer_class: type
    plugin: str


class QuantizerRegistry(Registry):
    """Quantizer id -> :class:`~optimum_lowrank.exporters.quantizers.Quantizer` subclass, filled by
    the ``lowrank_register_quantizers`` hook: ``register(MyQuantizer)``."""

    kind = "quantizer"
    hook = "lowrank_register_quantizers"
    duplicate_error = DuplicateQuantizerError
    entry_class = RegisteredQuantizer

    def check(self, cls: type) -> None:
        from optimum_lowrank.exporters.quantizers import Quantizer

        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise LowRankError(f"plugin {self._current_plugin!r} registered {cls!r}, which is not a Quantizer subclass")


@dataclass(frozen=True)
class RegisteredLayer:
    """A layer class that a saved model may hold, how to read its constructor arguments and rebuild it."""

    layer_class: type
    plugin: str
    to_config: Any
    from_config: Any


class LayerRegistry(Registry):
    """Layer name -> ``nn.Module`` class that :func:`optimum_lowrank.save_pretrained` may write and
    :func:`optimum_lowrank.from_pretrained` rebuilds; filled by the ``lowrank_register_layers`` hook.

    ``register(MyLayer)`` registers a class that has ``layer_config(self) -> dict`` (its constructor
    keyword arguments: JSON values, tensors it holds, modules it holds) and optionally a classmethod
    ``from_layer_config(config) -> MyLayer`` (default ``MyLayer(**config)``), under its class name.
    ``register(cls, name=..., to_config=..., from_config=...)`` registers a class without those
    methods (the built-in ``torch.nn`` ones). A model holding an unregistered class cannot be saved.
    """

    kind = "layer"
    hook = "lowrank_register_layers"
    duplicate_error = DuplicateLayerError
    entry_class = RegisteredLayer

    def __init__(self) -> None:
        super().__init__()
        self._adapters: dict[str, tuple[Any, Any]] = {}
        self._names: dict[type, str] = {}

    def __call__(self, cls: type, *, name: str | None = None, to_config=None, from_config=None) -> type:
        import torch

        who = f"plugin {self._current_plugin!r}"
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise LowRankError(f"{who} registered {cls!r} as a layer, which is not a torch.nn.Module subclass")
        name = name or cls.__name__
        to_config = to_config or getattr(cls, "layer_config", None)
        from_config = from_config or getattr(cls, "from_layer_config", None) or (lambda config: cls(**config))
        if not callable(to_config):
            raise LowRankError(f"{who}: layer {cls.__qualname__} needs a `layer_config(self) -> dict` method (its constructor arguments)")
        if name in self._classes:
            other, plugin = self._classes[name]
            raise DuplicateLayerError(
                f"layer {name!r} registered twice: by plugin {plugin!r} ({other.__qualname__}) and by {who} ({cls.__qualname__})"
            )
        self._classes[name] = (cls, self._current_plugin)
        self._adapters[name] = (to_config, from_config)
        self._names[cls] = name
        return cls

    def name_of(self, cls: type) -> str | None:
        """The name ``cls`` (exactly; not a subclass) is registered under, or None."""
        return self._names.get(cls)

    def entry(self, name: str) -> RegisteredLayer | None:
        """Class, plugin and the config functions of the layer registered as ``name``, or None."""
        if name not in self._classes:
            return None
        cls, plugin = self._classes[name]
        return RegisteredLayer(cls, plugin, *self._adapters[name])

    def collect(self, pm: pluggy.PluginManager) -> Self:
        super().collect(pm)
        self._adapters = {k: v for k, v in self._adapters.items() if k in self._classes}
        self._names = {cls: name for name, (cls, _) in self._classes.items()}
        return self


def plugin_label(plugin: str) -> str:
    """How messages name a plugin: ``built in`` for :data:`BUILTIN_PLUGINS`, else ``plugin 'NAME'``."""
    return "built in" if plugin in BUILTIN_PLUGINS else f"plugin {plugin!r}"


class PluginWarning(UserWarning):
    """A third-party plugin could not be loaded and was left out."""


_BROKEN: dict[str, str] = {}


def broken_plugins() -> dict[str, str]:
    """Plugins left out in this process, by name: the one-line reason of each."""
    return dict(_BROKEN)


def broken_note() -> str:
    """``"; plugins not loaded: ..."`` for error messages, or ``""`` when every plugin loaded."""
    if not _BROKEN:
        return ""
    return "; plugins not loaded: " + "; ".join(_BROKEN.values())


def _report_broken(name: str, what: str, err: BaseException) -> None:
    text = str(err).splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    line = (f"plugin {name!r} was not loaded: {what}: {type(err).__name__}{': ' + text if text else ''} "
            f"(to skip it without this warning: {BLOCK_PLUGINS_ENV}={name})")
    _BROKEN[name] = line
    warnings.warn(line, PluginWarning, stacklevel=2)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    """Register each entry-point plugin that loads and whose hooks all exist; report the others."""
    for ep in _entry_points():
        if pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as err:  # noqa: BLE001 - importing a plugin may raise anything
            _report_broken(ep.name, "importing it failed", err)
            continue
        try:
            pm.register(plugin, name=ep.name)
            pm.check_pending()
        except Exception as err:  # noqa: BLE001 - pluggy's validation errors, or anything the plugin raises
            if pm.has_plugin(ep.name):
                pm.unregister(name=ep.name)
            _report_broken(ep.name, "it does not fit the hook specifications", err)
            continue
        if ep.dist is not None:
            pm._plugin_distinfo.append((plugin, ep.dist))  # what load_setuptools_entrypoints records


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
        If a built-in plugin implements a hook that does not exist. A third-party plugin
        that fails to import or to validate (e.g. a misspelled hook name) is left out with
        a :class:`PluginWarning` naming it, the error and ``OPTIMUM_LOWRANK_BLOCK_PLUGINS``.
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
        _load_entrypoints(pm)
    pm.check_pending()
    return pm


@lru_cache(maxsize=8)
def _collected(kind: type[Registry], autoload: bool, blocked: frozenset[str]) -> Registry:
    return kind().collect(get_plugin_manager(autoload))


def _default(kind: type[Registry]) -> Registry:
    """``kind`` filled from the default plugin manager, cached per environment settings (autoload, blocked plugins)."""
    autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0")
    return _collected(kind, autoload, frozenset(_blocked()))


def get_registry() -> PassRegistry:
    """The registry of every pass from the default plugin manager (cached per environment settings)."""
    return _default(PassRegistry)


def get_metric_registry() -> MetricRegistry:
    """The registry of every accuracy metric from the default plugin manager (cached per environment settings)."""
    return _default(MetricRegistry)


def get_layer_registry() -> LayerRegistry:
    """The registry of every savable layer class from the default plugin manager (cached per environment settings)."""
    return _default(LayerRegistry)


def get_quantizer_registry() -> QuantizerRegistry:
    """The registry of every quantizer from the default plugin manager (cached per environment settings)."""
    return _default(QuantizerRegistry)

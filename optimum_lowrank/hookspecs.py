"""The hook specifications of optimum-lowrank: the only contract a plugin implements.

A plugin is a module or object with functions decorated by
``optimum_lowrank.hookimpl`` and named like the specs below. Third-party
plugins are found through the ``optimum_lowrank`` entry-point group::

    # pyproject.toml of optimum-lowrank-mypass
    [project.entry-points.optimum_lowrank]
    mypass = "optimum_lowrank_mypass"

The built-in passes and accuracy metrics are registered through these same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.plugins import LayerRegistry, MetricRegistry, PassRegistry, QuantizerRegistry

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


@hookspec
def lowrank_register_metrics(register: MetricRegistry) -> None:
    """Register accuracy metrics for the recipe's ``accuracy:`` gate.

    Call ``register(MyEvaluator)`` once per metric, where ``MyEvaluator``
    subclasses :class:`optimum_lowrank.Evaluator` and sets

    - ``name``: the recipe's ``metric:`` id (an identifier);
    - ``config_class``: a pydantic model deriving from
      :class:`optimum_lowrank.AccuracyConfig` with the metric's own options and
      exactly one threshold field, named by its ``threshold_field`` class
      variable, and an ``acceptable(original, value) -> bool`` method;
    - ``model_kinds``: the model kinds it suits, a non-empty tuple of
      ``"encoder"`` / ``"decoder"``;
    - ``higher_is_better``: True or False;

    and implements the classmethod ``from_config(config, loaded, reference_model)``
    and ``evaluate_torch(model)`` / ``evaluate_onnx(path)``. A recipe's
    ``accuracy:`` section is validated by the registered metric's ``config_class``,
    so its options are checked like a pass's.

    Parameters
    ----------
    register : MetricRegistry
        Callable; ``register(evaluator_class)``.

    Raises
    ------
    DuplicateMetricError
        If another plugin already registered a metric with the same ``name``.
    LowRankError
        If the class lacks one of the declarations above.
    """


@hookspec
def lowrank_register_quantizers(register: QuantizerRegistry) -> None:
    """Register ``export.quantize`` methods.

    Call ``register(MyQuantizer)`` once per method, where ``MyQuantizer`` subclasses
    :class:`optimum_lowrank.Quantizer`, sets ``name`` (the recipe's ``quantize:`` id),
    ``summary`` and ``needs_calibration``, and implements
    ``quantize(onnx_path, output_path, request) -> dict`` (write the graph, return
    report details). A recipe's ``export.quantize`` is validated against the registry.

    Parameters
    ----------
    register : QuantizerRegistry
        Callable; ``register(quantizer_class)``.

    Raises
    ------
    DuplicateQuantizerError
        If another plugin already registered a quantizer with the same ``name``.
    """


@hookspec
def lowrank_register_layers(register: LayerRegistry) -> None:
    """Register the ``nn.Module`` classes a pass installs, so that compressed models holding them
    can be saved (:func:`optimum_lowrank.save_pretrained`) and rebuilt (:func:`optimum_lowrank.from_pretrained`).

    Call ``register(MyLayer)`` once per class. ``MyLayer`` defines ``layer_config(self) -> dict``,
    the keyword arguments of its constructor that rebuild its structure: JSON values (ints,
    floats, strings, lists, None), tensors it holds (their values are read back from the saved
    weights) and modules it holds (its children, or modules elsewhere in the model it shares,
    such as a tied head's embedding). ``MyLayer.from_layer_config(config)`` (a classmethod)
    builds it when ``MyLayer(**config)`` would not. Registered under the class name.

    Parameters
    ----------
    register : LayerRegistry
        Callable; ``register(layer_class)``, or
        ``register(layer_class, name=..., to_config=..., from_config=...)`` for a class
        without those methods.

    Raises
    ------
    DuplicateLayerError
        If another plugin already registered a layer under the same name.
    LowRankError
        If the class is not an ``nn.Module`` or has no ``layer_config``.
    """

"""Accuracy evaluators for the accuracy gate: the same metric on PyTorch and ONNX models.

Every evaluator measures one number on a fixed, deterministic sample of data, so the
original model, the compressed PyTorch model, its fp32 ONNX graph and its int8 ONNX
graph are compared on exactly the same inputs. The built-in metrics, registered
through the ``lowrank_register_metrics`` hook like any plugin's:

- ``perplexity`` (:class:`PerplexityEvaluator`, :class:`PerplexityConfig`): causal
  decoders, lower is better;
- ``stsb_spearman`` (:class:`STSBEvaluator`, :class:`STSBConfig`): encoders, higher
  is better (x100);
- ``cosine_agreement`` (:class:`CosineAgreementEvaluator`, :class:`CosineAgreementConfig`):
  encoders, data-free, higher is better (1.0 for the original model);
- ``accuracy`` (:class:`ClassificationAccuracyEvaluator`, :class:`AccuracyMetricConfig`):
  sequence classifiers on a labelled TSV (e.g. SST-2 dev), higher is better (x100).

The pipeline calls :func:`evaluator_from_config` with the recipe's validated
``accuracy:`` section; :func:`build_evaluator` builds one from keyword options.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from optimum_lowrank.errors import RecipeError, UnknownMetricError
from optimum_lowrank.evaluation.base import Evaluator
from optimum_lowrank.evaluation.classification import AccuracyMetricConfig, ClassificationAccuracyEvaluator
from optimum_lowrank.evaluation.perplexity import PerplexityConfig, PerplexityEvaluator
from optimum_lowrank.evaluation.sentence import CosineAgreementConfig, CosineAgreementEvaluator, STSBConfig, STSBEvaluator
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.plugins import MetricRegistry, get_metric_registry, plugin_label
from optimum_lowrank.recipe import AccuracyConfig, format_validation_error

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from optimum_lowrank.models import LoadedModel

__all__ = [
    "METRICS",
    "AccuracyMetricConfig",
    "ClassificationAccuracyEvaluator",
    "CosineAgreementConfig",
    "CosineAgreementEvaluator",
    "Evaluator",
    "PerplexityConfig",
    "PerplexityEvaluator",
    "STSBConfig",
    "STSBEvaluator",
    "build_evaluator",
    "evaluator_from_config",
]

_BUILTIN: tuple[type[Evaluator], ...] = (PerplexityEvaluator, STSBEvaluator, CosineAgreementEvaluator, ClassificationAccuracyEvaluator)

#: Names of the built-in metrics; plugins add more (see :func:`~optimum_lowrank.plugins.get_metric_registry`).
METRICS: tuple[str, ...] = tuple(cls.name for cls in _BUILTIN)


@hookimpl
def lowrank_register_metrics(register: MetricRegistry) -> None:
    for evaluator_class in _BUILTIN:
        register(evaluator_class)


def _lookup(metric: str, loaded: LoadedModel, registry: MetricRegistry | None) -> type[Evaluator]:
    """The evaluator class of ``metric``, checked against ``loaded``'s kind."""
    registry = registry or get_metric_registry()
    evaluator_class = registry.get(metric)
    if evaluator_class is None:
        listed = "; ".join(
            f"{', '.join(names)} ({plugin_label(plugin)})"
            for plugin, names in registry.by_plugin().items()
        )
        raise UnknownMetricError(f"unknown accuracy metric {metric!r}; registered metrics: {listed or '(none)'}")
    if loaded.kind not in evaluator_class.model_kinds:
        article = {"encoder": "an", "decoder": "a"}
        needed = " or ".join(f"{article[kind]} {kind}" for kind in evaluator_class.model_kinds)
        suited = [name for name, entry in registry.entries() if loaded.kind in entry.evaluator_class.model_kinds]
        raise RecipeError(
            f"metric {metric!r} needs {needed} model but {loaded.source} is {article[loaded.kind]} {loaded.kind}; "
            f"metrics for {loaded.kind}s: {', '.join(suited) or '(none registered)'}"
        )
    return evaluator_class


def evaluator_from_config(
    config: AccuracyConfig,
    loaded: LoadedModel,
    reference_model: PreTrainedModel | None = None,
    registry: MetricRegistry | None = None,
) -> Evaluator:
    """Build the evaluator of ``config.metric`` for ``loaded`` (what the pipeline calls).

    Parameters
    ----------
    config : AccuracyConfig
        A validated ``accuracy:`` section (an instance of the metric's ``config_class``),
        e.g. ``Recipe.accuracy``.
    loaded : LoadedModel
        The model being compressed; its tokenizer and kind are used.
    reference_model : PreTrainedModel, optional
        The original model; required by metrics that compare against it
        (``cosine_agreement``), which use it at construction.
    registry : MetricRegistry, optional
        Where the metric is looked up; every installed plugin's metrics by default.

    Returns
    -------
    Evaluator

    Raises
    ------
    UnknownMetricError
        If no plugin registers ``config.metric``; the message lists the registered ones.
    RecipeError
        If the metric does not suit the model's kind (the message lists those that
        do), or an option does not fit the model.
    DataError
        If the data is missing, empty or malformed.
    """
    evaluator_class = _lookup(config.metric, loaded, registry)
    return evaluator_class.from_config(config, loaded, reference_model)


def build_evaluator(
    metric: str,
    loaded: LoadedModel,
    *,
    data: str | os.PathLike | None = None,
    reference_model: PreTrainedModel | None = None,
    registry: MetricRegistry | None = None,
    **options: Any,
) -> Evaluator:
    """Build the evaluator for ``metric`` from keyword options, to measure without a gate.

    Parameters
    ----------
    metric : str
        A registered metric: ``perplexity``, ``stsb_spearman``, ``cosine_agreement``
        or one a plugin adds.
    loaded : LoadedModel
        The model being compressed; its tokenizer and kind are used.
    data : str, PathLike or None
        The metric's ``data`` option: ``perplexity`` and ``cosine_agreement``: a text
        source for :func:`optimum_lowrank.data.load_text` (None: Python's own
        documentation); ``stsb_spearman``: a required STS-B TSV.
    reference_model : PreTrainedModel, optional
        The original model; required by ``cosine_agreement``.
    registry : MetricRegistry, optional
        Where the metric is looked up; every installed plugin's metrics by default.
    **options
        The metric's own options, validated by its ``config_class`` (e.g. ``seq_len``,
        ``max_windows``, ``max_pairs``, ``num_samples``); the threshold may be left out.

    Returns
    -------
    Evaluator

    Raises
    ------
    UnknownMetricError
        If the metric is not registered; the message lists the registered ones.
    RecipeError
        If the metric does not suit the model kind (perplexity needs a decoder, the
        embedding metrics an encoder), an option is unknown (the message lists the
        allowed ones) or out of range, or ``cosine_agreement`` lacks ``reference_model``.
    DataError
        If the data is missing, empty or malformed (``stsb_spearman`` without data).
    """
    evaluator_class = _lookup(metric, loaded, registry)
    config_class = evaluator_class.config_class
    values = {**options, "metric": metric, "data": None if data is None else os.fspath(data)}
    try:
        config = config_class.model_validate(values, context={"measure_only": True})
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, f"metric {metric!r}", config_class)) from None
    return evaluator_class.from_config(config, loaded, reference_model)

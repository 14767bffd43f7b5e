"""optimum-lowrank: low-rank and tensor compression of transformer models, exported as
quantizable ONNX.

One call reads a recipe, applies its passes, checks accuracy against the
original model and exports ONNX (optionally int8)::

    from optimum_lowrank import optimize
    report = optimize("minilm", "recipes/minilm-svd.yaml", output="out/minilm")

This namespace is also the whole plugin API: a third-party pass imports
``hookimpl``, ``CompressionPass``, ``PassConfig``, ``PassContext``,
``LayerReport`` (with ``Spectrum``), the errors and the layer helpers from here and nowhere else; a
third-party accuracy metric imports ``Evaluator``, ``AccuracyConfig``, ``LoadedModel`` and the
ONNX Runtime helpers ``open_session`` / ``onnx_feed`` / ``torch_forward``
(see ``docs/plugins.md``).
"""

from __future__ import annotations

from optimum_lowrank.api import CompressionPass, PassConfig, PassContext, count_parameters, resolve_targets
from optimum_lowrank.errors import (
    AccuracyError,
    DataError,
    DeviceError,
    DistributedError,
    DuplicateLayerError,
    DuplicateMetricError,
    DuplicatePassError,
    ExportError,
    LowRankError,
    ModelLoadError,
    OutputError,
    OutputExistsError,
    PassError,
    RecipeError,
    TargetError,
    UnknownLayerError,
    UnknownMetricError,
    UnknownPassError,
)
from optimum_lowrank.evaluation.base import Evaluator, onnx_feed, open_session, torch_forward
from optimum_lowrank.exporters.quantizers import QuantizationRequest, Quantizer
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.layers.lowrank import LowRankEmbedding, LowRankLinear, linear_weight
from optimum_lowrank.linalg.svd import split_factors, truncated_svd
from optimum_lowrank.models import LoadedModel
from optimum_lowrank.pipeline import optimize
from optimum_lowrank.recipe import AccuracyConfig, Recipe, load_recipe
from optimum_lowrank.report import LayerReport, OptimizationReport, Spectrum
from optimum_lowrank.saving import from_pretrained, save_pretrained

__all__ = [
    "QuantizationRequest",
    "Quantizer",
    "AccuracyConfig",
    "AccuracyError",
    "CompressionPass",
    "DataError",
    "DeviceError",
    "DistributedError",
    "DuplicateLayerError",
    "DuplicateMetricError",
    "DuplicatePassError",
    "Evaluator",
    "ExportError",
    "LayerReport",
    "LoadedModel",
    "LowRankEmbedding",
    "LowRankError",
    "LowRankLinear",
    "ModelLoadError",
    "OptimizationReport",
    "OutputError",
    "OutputExistsError",
    "PassConfig",
    "PassContext",
    "PassError",
    "Recipe",
    "RecipeError",
    "Spectrum",
    "TargetError",
    "UnknownLayerError",
    "UnknownMetricError",
    "UnknownPassError",
    "count_parameters",
    "from_pretrained",
    "hookimpl",
    "linear_weight",
    "load_recipe",
    "onnx_feed",
    "open_session",
    "optimize",
    "resolve_targets",
    "save_pretrained",
    "split_factors",
    "torch_forward",
    "truncated_svd",
]
__version__ = "0.1.0"

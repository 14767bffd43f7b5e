"""Export of compressed models to ONNX, ONNX Runtime quantization and latency.

Submodules
----------
onnx
    :func:`export_onnx` (wraps Optimum's ``onnx_export_from_model`` on the
    in-memory model), :func:`onnx_size_mb`, :func:`onnx_task`.
runtime
    :func:`make_session`, :func:`feeds_for_input_ids`, :func:`build_dummy_feeds`.
parity
    :func:`check_parity` (ONNX Runtime vs PyTorch).
quantize
    :func:`quantize_onnx` (``none``, ``dynamic_int8``, ``static_int8``,
    ``weight_int8``, ``weight_int4``), :func:`calibration_feeds_from_ids`,
    :func:`optimize_graph` (ORTOptimizer levels 0-2).
latency
    :func:`measure_latency`.

Importing this package is cheap: the names below are loaded from their
submodule (and torch / onnx / onnxruntime / optimum with it) on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ParityResult": "parity",
    "build_dummy_feeds": "runtime",
    "check_parity": "parity",
    "export_onnx": "onnx",
    "feeds_for_input_ids": "runtime",
    "make_session": "runtime",
    "onnx_size_mb": "onnx",
    "onnx_task": "onnx",
    "QUANTIZATION_METHODS": "quantize",
    "calibration_feeds_from_ids": "quantize",
    "quantize_onnx": "quantize",
    "LatencyResult": "latency",
    "measure_latency": "latency",
    "OPTIMIZATION_LEVELS": "quantize",
    "optimize_graph": "quantize",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.exporters.latency import LatencyResult, measure_latency
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task
    from optimum_lowrank.exporters.parity import ParityResult, check_parity
    from optimum_lowrank.exporters.quantize import (
        OPTIMIZATION_LEVELS,
        QUANTIZATION_METHODS,
        calibration_feeds_from_ids,
        optimize_graph,
        quantize_onnx,
    )
    from optimum_lowrank.exporters.runtime import build_dummy_feeds, feeds_for_input_ids, make_session


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

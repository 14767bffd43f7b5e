"""Quantization of exported ONNX graphs with ONNX Runtime, and ORTOptimizer graph optimisation.

:func:`quantize_onnx` runs one registered quantizer (``export.quantize``; the built-ins are
in :mod:`optimum_lowrank.exporters.quantizers`, plugins add more through the
``lowrank_register_quantizers`` hook) with ONNX Runtime's log noise filtered and
nothing left behind on failure. :func:`calibration_feeds_from_ids` builds
``static_int8`` feeds; :func:`optimize_graph` wraps Optimum's ``ORTOptimizer``.

This CPU family (AVX2 without VNNI) can saturate signed int8 products, hence
``reduce_range=True`` by default (7-bit weights).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimum_lowrank.errors import DataError, ExportError, LowRankError
from optimum_lowrank.exporters.onnx import onnx_size_mb
from optimum_lowrank.exporters.quantizers import QuantizationRequest, copy_graph
from optimum_lowrank.exporters.runtime import feeds_for_input_ids, first_line, make_session
from optimum_lowrank.exporters.weight_only import WeightOnlySpec

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

logger = logging.getLogger(__name__)

__all__ = ["OPTIMIZATION_LEVELS", "QUANTIZATION_METHODS", "calibration_feeds_from_ids", "optimize_graph", "quantize_onnx"]

OPTIMIZATION_LEVELS = (0, 1, 2)

#: The built-in quantizers (plugins may register more; see ``optimum-lowrank passes``).
QUANTIZATION_METHODS = ("none", "dynamic_int8", "static_int8", "weight_int8", "weight_int4", "weight_only")

# Above this size a protobuf cannot hold the weights; ORT must write external data.
_EXTERNAL_DATA_MB = 1800.0


def calibration_feeds_from_ids(
    session_or_path: ort.InferenceSession | Path | str,
    token_batches: Iterable[np.ndarray],
) -> list[dict[str, np.ndarray]]:
    """Calibration feeds for :func:`quantize_onnx` (``static_int8``) from token ids.

    Parameters
    ----------
    session_or_path : onnxruntime.InferenceSession or Path
        The fp32 graph (or a session on it) whose inputs are filled.
    token_batches : iterable of np.ndarray, each shape (batch, seq_len), int64
        Token ids of real text (calibration data); batches may differ in shape.

    Returns
    -------
    list of dict[str, np.ndarray]
        One feed per batch, with ``attention_mask`` (ones), ``token_type_ids``
        (zeros), ``position_ids`` and empty past key/values added as the graph
        requires (see :func:`optimum_lowrank.exporters.onnx.feeds_for_input_ids`).

    Raises
    ------
    DataError
        If a batch is not a non-empty 2-D integer array.
    ExportError
        If the graph cannot be loaded or takes an input that cannot be filled.
    """
    session = session_or_path
    if isinstance(session_or_path, (str, Path)):
        session = make_session(Path(session_or_path))
    return [feeds_for_input_ids(session, batch) for batch in token_batches]


_ORT_NOISE = (
    "Please consider to run pre-processing",
    "is out-of-range for weight",
    "Failed to infer data type of tensor",  # expected; DefaultTensorType covers it
)


def _drop_ort_noise(record: logging.LogRecord) -> bool:
    # onnxruntime.quantization logs through the root logger.
    return not (record.levelno < logging.ERROR and any(n in record.getMessage() for n in _ORT_NOISE))


@contextlib.contextmanager
def _quiet_quantization() -> Iterator[None]:
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    root.addFilter(_drop_ort_noise)
    # MatMulNBitsQuantizer calls logging.basicConfig(level=INFO) when imported and then logs
    # every node at INFO: quiet its logger, and undo its change to the root logger afterwards.
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = nbits.level
    nbits.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeFilter(_drop_ort_noise)
        nbits.setLevel(level)
        root.setLevel(root_level)
        for handler in root.handlers[:]:
            if handler not in root_handlers:
                root.removeHandler(handler)


def _remove_outputs(output_path: Path) -> None:
    for candidate in (
        output_path,
        output_path.with_name(output_path.name + ".data"),
        output_path.with_name(output_path.name + "_data"),
    ):
        candidate.unlink(missing_ok=True)


def quantize_onnx(
    onnx_path: Path,
    output_path: Path,
    method: str,
    *,
    per_channel: bool = True,
    reduce_range: bool = True,
    calibration_feeds: Iterable[dict[str, np.ndarray]] | None = None,
    block_size: int = 32,
    exclude_nodes: Sequence[str] = (),
    weight_only: WeightOnlySpec | None = None,
    details: dict[str, Any] | None = None,
) -> Path:
    """Quantize the ONNX graph at ``onnx_path`` into ``output_path`` with the quantizer ``method``.

    Parameters
    ----------
    onnx_path : Path
        fp32 graph (from :func:`~optimum_lowrank.exporters.onnx.export_onnx`, or
        ORTOptimizer output).
    output_path : Path
        File to write; its folder must exist. May equal ``onnx_path`` only for
        ``"none"``. Graphs above ~1.8 GB are written with external data
        (``<output_path.name>.data``).
    method : str
        A registered quantizer: the built-ins ``none``, ``dynamic_int8``, ``static_int8``,
        ``weight_int8``, ``weight_int4``, ``weight_only`` (see
        :mod:`optimum_lowrank.exporters.quantizers`) or one a plugin adds.
    per_channel : bool, default True
        One scale per output channel of each weight (``dynamic_int8``, ``static_int8``).
    reduce_range : bool, default True
        7-bit weights; needed on AVX2 CPUs without VNNI, where 8-bit products
        saturate (``dynamic_int8``, ``static_int8``).
    calibration_feeds : iterable of dict[str, np.ndarray], optional
        Input feeds for quantizers that need calibration (``static_int8``); see
        :func:`calibration_feeds_from_ids`. A handful of batches suffices.
    block_size : int, power of 2 >= 16, default 32
        Weights per scale for the weight-only methods when ``weight_only`` is not given.
    exclude_nodes : sequence of str
        ONNX node names to leave in fp32 (e.g. the ``lm_head`` MatMul).
    weight_only : WeightOnlySpec, optional
        Options of the weight-only methods (bits per target, algorithm, embedding bits).
    details : dict, optional
        Filled with what the quantizer reports (weight-only: bits and relative
        Frobenius error per weight, shared tables, initializers over 100 KB).

    Returns
    -------
    Path
        ``output_path``.

    Raises
    ------
    ValueError
        If ``method`` is not registered (the message lists the registered ones) or
        ``block_size`` is not a power of 2 >= 16.
    DataError
        If the quantizer needs calibration and ``calibration_feeds`` is None or empty.
    ExportError
        If ONNX Runtime fails to quantize; the partial output is removed.
    """
    from optimum_lowrank.plugins import get_quantizer_registry

    registry = get_quantizer_registry()
    quantizer_class = registry.get(method)
    if quantizer_class is None:
        raise ValueError(f"unknown quantization method {method!r}; allowed: {', '.join(registry.names())}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 >= 16, got {block_size}")
    onnx_path = Path(onnx_path)
    output_path = Path(output_path)
    if not onnx_path.is_file():
        raise ExportError(f"no ONNX graph at {onnx_path}")
    feeds = list(calibration_feeds) if calibration_feeds is not None else []
    if quantizer_class.needs_calibration and not feeds:
        raise DataError(f"{method} quantization needs calibration_feeds (at least one feed dict), got none")
    if method != "none" and onnx_path.resolve() == output_path.resolve():
        raise ValueError(f"output_path must differ from onnx_path for method {method!r}")

    try:
        request = QuantizationRequest(
            per_channel=per_channel,
            reduce_range=reduce_range,
            block_size=block_size,
            calibration_feeds=feeds,
            exclude_nodes=tuple(exclude_nodes),
            weight_only=weight_only,
            external_data=onnx_size_mb(onnx_path) > _EXTERNAL_DATA_MB,
        )
        with _quiet_quantization():
            found = quantizer_class().quantize(onnx_path, output_path, request)
    except Exception as exc:
        if onnx_path.resolve() != output_path.resolve():
            _remove_outputs(output_path)
        if isinstance(exc, LowRankError):
            raise
        raise ExportError(f"{method} quantization of {onnx_path} failed: {first_line(exc)}") from exc
    if not output_path.is_file():
        raise ExportError(f"{method} quantization of {onnx_path} wrote no file at {output_path}")
    if details is not None:
        details.update(found or {})
    return output_path


def optimize_graph(onnx_path: Path, output_path: Path, level: int) -> Path:
    """Graph optimisation with Optimum's ``ORTOptimizer`` before quantization.

    Measured here: on low-rank BERT graphs level 2 loses the Attention fusion
    (Q/K/V stay MatMul pairs) and gave no speed-up, even on the dense model;
    measure before relying on it. The result quantizes with ``dynamic_int8``
    (which sets ``DefaultTensorType``), not with Optimum's ``ORTQuantizer``.

    Parameters
    ----------
    onnx_path : Path
        Graph from :func:`~optimum_lowrank.exporters.onnx.export_onnx`, with the
        model's ``config.json`` in the same folder (ORTOptimizer reads the
        model type, head count and hidden size from it). Below 2 GB.
    output_path : Path
        File to write; must differ from ``onnx_path`` unless ``level == 0``.
    level : int, one of :data:`OPTIMIZATION_LEVELS`
        0: copy unchanged; 1: basic ONNX Runtime optimisations (constant
        folding, redundant node removal); 2: also transformer fusions
        (LayerNorm, GELU, Attention where the pattern matches).

    Returns
    -------
    Path
        ``output_path``.

    Raises
    ------
    ValueError
        If ``level`` is not in :data:`OPTIMIZATION_LEVELS` or the paths clash.
    ExportError
        If there is no ``config.json`` next to the graph or ORTOptimizer fails;
        the partial output is removed.
    """
    import tempfile

    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown optimization level {level!r}; allowed: {', '.join(map(str, OPTIMIZATION_LEVELS))}")
    onnx_path = Path(onnx_path)
    output_path = Path(output_path)
    if not onnx_path.is_file():
        raise ExportError(f"no ONNX graph at {onnx_path}")
    if level == 0:
        copy_graph(onnx_path, output_path)
        return output_path
    if onnx_path.resolve() == output_path.resolve():
        raise ValueError("output_path must differ from onnx_path for optimization levels above 0")
    if not (onnx_path.parent / "config.json").is_file():
        raise ExportError(f"optimize_graph needs the model's config.json next to {onnx_path}")
    try:
        from optimum.onnxruntime import ORTOptimizer
        from optimum.onnxruntime.configuration import OptimizationConfig

        with tempfile.TemporaryDirectory(dir=output_path.parent, prefix=".optimize-") as tmp:
            optimizer = ORTOptimizer.from_pretrained(onnx_path.parent, file_names=[onnx_path.name])
            config = OptimizationConfig(optimization_level=level, disable_shape_inference=True)
            optimizer.optimize(optimization_config=config, save_dir=tmp, file_suffix="")
            shutil.move(str(Path(tmp) / onnx_path.name), str(output_path))
    except Exception as exc:
        if onnx_path.resolve() != output_path.resolve():
            _remove_outputs(output_path)
        raise ExportError(f"level-{level} optimization of {onnx_path} failed: {first_line(exc)}") from exc
    return output_path

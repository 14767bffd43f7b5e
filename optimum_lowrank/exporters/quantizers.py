"""The built-in ``export.quantize`` methods, registered through the ``lowrank_register_quantizers`` hook.

A quantizer turns the exported fp32 graph into the graph that ships. Built-ins:

``none``
    Copy the graph unchanged.
``dynamic_int8``
    :func:`onnxruntime.quantization.quantize_dynamic`: int8 weights (per channel by
    default), activations quantized per tensor at run time. Good for encoders (MiniLM:
    90.4 MB -> 22.9 MB, STS-B 86.72 -> 86.51); it broke a small Llama (SmolLM2-135M
    perplexity 35.1 -> 61.2).
``static_int8``
    :func:`onnxruntime.quantization.quantize_static` in QDQ format, activation ranges
    from calibration data (uint8 activations, int8 weights).
``weight_int8`` / ``weight_int4`` / ``weight_only``
    Weight-only block quantization (:mod:`optimum_lowrank.exporters.weight_only`):
    MatMul weights to ``MatMulNBits``, token-embedding tables to
    ``GatherBlockQuantized`` (shared with a tied head), per-target bits. The first two
    fix the body's bits at 8 / 4; ``weight_only`` reads everything from the recipe's
    ``export.weight_only`` block.

A third-party quantizer subclasses :class:`Quantizer` and is registered with
``register(MyQuantizer)`` from a ``lowrank_register_quantizers`` hook implementation.
"""

from __future__ import annotations

import logging
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from optimum_lowrank.errors import DataError
from optimum_lowrank.exporters.runtime import first_line
from optimum_lowrank.exporters.weight_only import WeightOnlySpec, initializer_table, quantize_weight_only_model
from optimum_lowrank.hookspecs import hookimpl

logger = logging.getLogger(__name__)

__all__ = ["QuantizationRequest", "Quantizer", "lowrank_register_quantizers"]

# Ops whose inputs static quantization calibrates and quantizes.
_STATIC_OP_TYPES = ("MatMul", "Gemm", "Gather")


@dataclass(frozen=True)
class QuantizationRequest:
    """Everything a quantizer may use; each reads what applies to it.

    Attributes
    ----------
    per_channel, reduce_range : bool
        int8 options (``reduce_range``: 7-bit weights, needed on AVX2 CPUs without VNNI).
    block_size : int
        Weights per scale for the weight-only methods (power of 2, >= 16).
    calibration_feeds : list of dict[str, np.ndarray]
        Input feeds of real text (``static_int8``).
    exclude_nodes : tuple of str
        ONNX node names to leave in fp32.
    weight_only : WeightOnlySpec or None
        The ``weight_only`` block; None: defaults with the method's bits.
    external_data : bool
        Write the weights as external data (graphs above ~1.8 GB).
    """

    per_channel: bool = True
    reduce_range: bool = True
    block_size: int = 32
    calibration_feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    exclude_nodes: tuple[str, ...] = ()
    weight_only: WeightOnlySpec | None = None
    external_data: bool = False


class Quantizer(ABC):
    """One ``export.quantize`` method.

    Class attributes
    ----------------
    name : str
        The recipe's ``quantize:`` id (an identifier).
    summary : str
        One line for ``optimum-lowrank passes`` and error messages.
    needs_calibration : bool
        True if :meth:`quantize` needs ``request.calibration_feeds``.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    @abstractmethod
    def quantize(self, onnx_path: Path, output_path: Path, request: QuantizationRequest) -> dict[str, Any]:
        """Write the quantized graph to ``output_path`` (its folder exists).

        Returns
        -------
        dict
            Details for the report (JSON-serialisable; may be empty).
        """


class NoQuantization(Quantizer):
    name = "none"
    summary = "copy the fp32 graph unchanged"

    def quantize(self, onnx_path: Path, output_path: Path, request: QuantizationRequest) -> dict[str, Any]:
        copy_graph(onnx_path, output_path)
        return {}


class DynamicInt8(Quantizer):
    name = "dynamic_int8"
    summary = "int8 weights, activations quantized at run time (quantize_dynamic)"

    def quantize(self, onnx_path: Path, output_path: Path, request: QuantizationRequest) -> dict[str, Any]:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(onnx_path),
            str(output_path),
            per_channel=request.per_channel,
            reduce_range=request.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(request.exclude_nodes),
            use_external_data_format=request.external_data,
            # Graphs from ORTOptimizer lack value_info for some MatMul outputs; this
            # default avoids "Unable to find data type for weight_name=...".
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return {}


class StaticInt8(Quantizer):
    name = "static_int8"
    summary = "QDQ int8 with activation ranges from calibration data (quantize_static)"
    needs_calibration = True

    def quantize(self, onnx_path: Path, output_path: Path, request: QuantizationRequest) -> dict[str, Any]:
        import tempfile

        import onnx
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if not request.calibration_feeds:
            raise DataError("static_int8 quantization needs calibration_feeds (at least one feed dict), got none")
        with tempfile.TemporaryDirectory(dir=output_path.parent, prefix=".quant-") as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            try:
                # Symbolic shape inference fails on these graphs (STACK.md); ORT
                # optimisation + ONNX shape inference still help the quantizer.
                quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True, save_as_external_data=request.external_data)
                source = prepared
            except Exception as exc:  # noqa: BLE001 - pre-processing is an optional help
                logger.warning("quant_pre_process failed (%s); quantizing the graph as exported", first_line(exc))
                source = onnx_path
            quantize_static(
                str(source),
                str(output_path),
                _FeedReader(request.calibration_feeds),
                quant_format=QuantFormat.QDQ,
                # Only weights' consumers: calibrating every op also quantizes the
                # -inf attention masks and the empty past key/values (NaN scales).
                op_types_to_quantize=list(_STATIC_OP_TYPES),
                per_channel=request.per_channel,
                reduce_range=request.reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(request.exclude_nodes),
                use_external_data_format=request.external_data,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        return {}


class WeightOnly(Quantizer):
    """Weight-only block quantization; ``bits`` None reads the bits from ``request.weight_only``."""

    name = "weight_only"
    summary = "block-wise 2/4/8-bit weights incl. embeddings and tied heads; per-target bits (export.weight_only)"
    bits: ClassVar[int | None] = None

    def quantize(self, onnx_path: Path, output_path: Path, request: QuantizationRequest) -> dict[str, Any]:
        import onnx

        spec = request.weight_only or WeightOnlySpec(block_size=request.block_size)
        if self.bits is not None:
            spec = replace(spec, bits=self.bits)
        spec = replace(spec, exclude_nodes=tuple(spec.exclude_nodes) + tuple(request.exclude_nodes))
        model, result = quantize_weight_only_model(onnx.load(str(onnx_path)), spec)
        save_graph(model, output_path, request.external_data)
        return {
            "bits": result.bits,
            "relative_error": {name: round(value, 6) for name, value in result.errors.items()},
            "shared_tables": result.shared_tables,
            "notes": result.notes,
            "large_initializers": initializer_table(model),
        }


class WeightInt8(WeightOnly):
    name = "weight_int8"
    summary = "weight_only with 8-bit MatMul weights"
    bits = 8


class WeightInt4(WeightOnly):
    name = "weight_int4"
    summary = "weight_only with 4-bit MatMul weights"
    bits = 4


class _FeedReader:
    """:class:`onnxruntime.quantization.CalibrationDataReader` over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._feeds):
            return None
        feed = self._feeds[self._index]
        self._index += 1
        return feed

    def rewind(self) -> None:
        self._index = 0


def save_graph(model, output_path: Path, external: bool) -> None:
    """Save ``model`` to ``output_path``, weights in ``<name>.data`` beside it when ``external``."""
    import onnx

    if external:
        onnx.save_model(model, str(output_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=output_path.name + ".data")
    else:
        onnx.save_model(model, str(output_path))


def copy_graph(onnx_path: Path, output_path: Path) -> None:
    """Copy a graph (and its external data, renamed to follow ``output_path``)."""
    import onnx

    if onnx_path.resolve() == output_path.resolve():
        return
    proto = onnx.load(str(onnx_path), load_external_data=False)
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        shutil.copyfile(onnx_path, output_path)
        return
    save_graph(onnx.load(str(onnx_path)), output_path, external=True)


BUILTIN_QUANTIZERS = (NoQuantization, DynamicInt8, StaticInt8, WeightInt8, WeightInt4, WeightOnly)


@hookimpl
def lowrank_register_quantizers(register) -> None:
    for quantizer in BUILTIN_QUANTIZERS:
        register(quantizer)

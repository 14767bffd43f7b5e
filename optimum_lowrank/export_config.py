"""The recipe's ``export:`` section: ONNX export, quantization (weight-only options included) and latency.

Kept apart from :mod:`optimum_lowrank.recipe` so that module stays about the recipe as a
whole; :mod:`optimum_lowrank.recipe` re-exports every name here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from optimum_lowrank.strict import StrictScalars

__all__ = ["ExportConfig", "LatencyConfig", "Strict", "WeightOnlyConfig", "WeightOnlyOverride"]


class Strict(StrictScalars):
    """Base of every recipe section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyConfig(Strict):
    """ONNX Runtime CPU latency measurement: median of ``repeats`` forward passes."""

    batch_size: int = Field(1, ge=1, le=1024)
    seq_len: int = Field(128, ge=1, le=8192)
    repeats: int = Field(20, ge=1, le=10_000)
    threads: int = Field(2, ge=1, le=256)


class WeightOnlyOverride(Strict):
    """Bits for the MatMuls of some modules: ``targets`` are globs or ``re:`` patterns over module names."""

    targets: tuple[str, ...] = Field(min_length=1)
    bits: Literal[2, 4, 8]


class WeightOnlyConfig(Strict):
    """``export.weight_only``: block-wise weight-only quantization (:mod:`optimum_lowrank.exporters.weight_only`).

    ``bits`` (2/4/8) for MatMul weights (``weight_int8`` / ``weight_int4`` fix it; with
    ``weight_only`` it defaults to 4); ``block_size`` weights per scale (power of 2,
    16-256; default: ``export.block_size``); ``symmetric``; ``algorithm``: ``rtn``
    (ORT's native round-to-nearest), ``k_quant`` or ``hqq`` (asymmetric, float zero
    points); ``accuracy_level`` of ``MatMulNBits`` (default: 4 for 2/8 bits, which
    ran 60-100x slower without it, unset for 4 bits); ``embedding_bits`` (default 8)
    for every table read by a Gather, shared with a tied LM head; ``head_bits`` (default:
    the embedding's); ``overrides``: per-target bits, the last match wins.
    """

    bits: Literal[2, 4, 8] | None = None
    block_size: int | None = Field(None, ge=16, le=256)
    symmetric: bool | None = None
    algorithm: Literal["rtn", "k_quant", "hqq", "gptq"] = "rtn"
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    embedding_bits: Literal[2, 4, 8] = 8
    head_bits: Literal[2, 4, 8] | None = None
    overrides: tuple[WeightOnlyOverride, ...] = ()

    @model_validator(mode="after")
    def _supported(self) -> WeightOnlyConfig:
        if self.block_size is not None and self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of 2 in [16, 256], got {self.block_size}")
        if self.algorithm == "gptq":
            raise ValueError(
                "algorithm 'gptq' is refused: ONNX Runtime 1.32's GPTQ reads the wrong triangle of the Hessian's "
                "Cholesky factor and its output was measured bit-identical to RTN; use rtn, k_quant or hqq"
            )
        if self.algorithm == "hqq" and self.symmetric:
            raise ValueError("algorithm 'hqq' is asymmetric (float zero points); drop symmetric: true or use rtn / k_quant")
        if self.algorithm == "k_quant" and self.accuracy_level not in (None, 4):
            raise ValueError("algorithm 'k_quant' takes no accuracy_level other than 4")
        return self


class ExportConfig(Strict):
    """ONNX export through Optimum's exporter, parity check, and ORT quantization.

    ``quantize``: a registered quantizer (``optimum-lowrank passes`` lists them):
    ``none``; ``dynamic_int8`` (weights int8 per channel, activations quantized at run
    time; good for encoders, measured to break small Llama decoders); ``static_int8``
    (QDQ, activations calibrated on the recipe's calibration data); ``weight_int8`` /
    ``weight_int4`` / ``weight_only`` (weight-only block quantization, embeddings and
    tied heads included; options in ``weight_only:``, see :class:`WeightOnlyConfig`).
    ``optimization_level`` 1 or 2 runs Optimum's ``ORTOptimizer`` on the fp32 graph
    before parity and quantization (measured here: no speed-up on low-rank BERT
    graphs; 0 is the default). ``baseline_latency`` exports the original model too and
    times it (the report flags a graph slower than it); ``baseline_int8`` quantizes that
    original graph with ONNX Runtime's stock ``dynamic_int8`` and measures its size and,
    with an ``accuracy:`` section, its metric: the reference points of ``accuracy_size.png``.
    """

    format: Literal["onnx"] = "onnx"
    opset: int | None = Field(None, ge=14, le=23)
    optimization_level: Literal[0, 1, 2] = 0
    quantize: str = "none"
    per_channel: bool = True
    reduce_range: bool = True
    block_size: int = Field(32, ge=16, le=4096)
    weight_only: WeightOnlyConfig | None = None
    parity_atol: float = Field(1e-3, gt=0)
    parity_rtol: float = Field(1e-4, ge=0, lt=1)
    latency: LatencyConfig | None = LatencyConfig()
    baseline_latency: bool = True
    baseline_int8: bool = True

    @model_validator(mode="after")
    def _weight_only_fits(self) -> ExportConfig:
        if self.weight_only is None:
            return self
        if self.quantize not in ("weight_int8", "weight_int4", "weight_only"):
            raise ValueError(f"weight_only options apply to quantize weight_int8 / weight_int4 / weight_only, not {self.quantize!r}")
        fixed = {"weight_int8": 8, "weight_int4": 4}.get(self.quantize)
        if fixed is not None and self.weight_only.bits not in (None, fixed):
            raise ValueError(f"quantize {self.quantize!r} fixes bits {fixed}; weight_only.bits {self.weight_only.bits} contradicts it")
        return self

    def weight_only_spec(self):
        """The :class:`~optimum_lowrank.exporters.weight_only.WeightOnlySpec` these options describe."""
        from optimum_lowrank.exporters.weight_only import WeightOnlySpec

        wo = self.weight_only or WeightOnlyConfig()
        bits = {"weight_int8": 8, "weight_int4": 4}.get(self.quantize, wo.bits or 4)
        symmetric = wo.symmetric if wo.symmetric is not None else wo.algorithm != "hqq"
        return WeightOnlySpec(
            bits=bits,
            block_size=wo.block_size or self.block_size,
            symmetric=symmetric,
            algorithm=wo.algorithm,
            accuracy_level=wo.accuracy_level,
            embedding_bits=wo.embedding_bits,
            head_bits=wo.head_bits,
            overrides=tuple((o.targets, o.bits) for o in wo.overrides),
        )

"""The export step of the pipeline: ONNX export of the compressed model, parity, quantization, the original's baselines, and the saved PyTorch model.

Everything here writes into the staging folder :func:`optimum_lowrank.pipeline.optimize`
renames into place once every check has passed.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from optimum_lowrank.api import PassContext
from optimum_lowrank.errors import ExportError
from optimum_lowrank.progress import Progress
from optimum_lowrank.recipe import Recipe
from optimum_lowrank.report import AccuracyReport, ExportReport, OptimizationReport
from optimum_lowrank.report_files import ORIGINAL_FP32, ORIGINAL_INT8

if TYPE_CHECKING:
    from optimum_lowrank.evaluation import Evaluator
    from optimum_lowrank.export_config import ExportConfig
    from optimum_lowrank.models import LoadedModel

__all__ = ["export_compressed", "measure_baselines", "save_pytorch_model", "save_tokenizer"]


def export_compressed(
    compressed: torch.nn.Module,
    loaded: LoadedModel,
    recipe: Recipe,
    context: PassContext,
    evaluator: Evaluator | None,
    report: OptimizationReport,
    staging: Path,
    say: Progress,
) -> ExportReport:
    from optimum_lowrank.exporters.latency import measure_latency
    from optimum_lowrank.exporters.noise import ExportNoise
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task
    from optimum_lowrank.exporters.parity import check_parity
    from optimum_lowrank.exporters.quantize import calibration_feeds_from_ids, optimize_graph, quantize_onnx

    cfg = recipe.export
    task = onnx_task(compressed)
    vocab_size = getattr(loaded.model.config, "vocab_size", None)
    result = ExportReport(task=task, opset=cfg.opset, quantization=cfg.quantize)
    onnx_dir = staging / "onnx"

    t0 = time.perf_counter()
    noise = ExportNoise()
    with say.step(f"exporting ONNX ({task})"):
        fp32 = export_onnx(compressed, onnx_dir, task, cfg.opset, noise=noise)
    if cfg.optimization_level:
        with say.step(f"ORTOptimizer level {cfg.optimization_level}"):
            optimized = optimize_graph(fp32, onnx_dir / "model_optimized.onnx", cfg.optimization_level)
            os.replace(optimized, fp32)
    result.seconds["export"] = time.perf_counter() - t0
    result.files["onnx_fp32"] = str(fp32)
    result.sizes_mb["onnx/model.onnx"] = onnx_size_mb(fp32)

    with say.step("checking ONNX Runtime vs PyTorch parity"):
        parity = check_parity(compressed, fp32, atol=cfg.parity_atol, rtol=cfg.parity_rtol, vocab_size=vocab_size)
    result.parity = parity.to_dict()
    if not parity.passed:
        held = f"\nthird-party messages during the export:\n{noise.details()}" if noise else ""
        raise ExportError(
            f"ONNX Runtime output differs from PyTorch: max |diff| {parity.max_abs_diff:.3g} > atol {cfg.parity_atol:g} "
            f"+ rtol {cfg.parity_rtol:g} x max|output| {parity.reference_max_abs:.3g} "
            f"({parity.describe()}; {parity.per_shape}); nothing was written{held}"
        )
    if noise:
        say.line(noise.summary(f"this project's parity check passed (max |diff| {parity.max_abs_diff:.2e})"))

    graphs = {"output fp32": fp32}
    if cfg.quantize != "none":
        feeds = None
        from optimum_lowrank.plugins import get_quantizer_registry

        if get_quantizer_registry().get(cfg.quantize).needs_calibration:
            feeds = calibration_feeds_from_ids(fp32, [ids.unsqueeze(0).numpy() for ids in context.calibration_ids])
        t0 = time.perf_counter()
        with say.step(f"quantizing ({cfg.quantize})"):
            quantized = quantize_onnx(
                fp32,
                onnx_dir / "model_quantized.onnx",
                cfg.quantize,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                calibration_feeds=feeds,
                block_size=cfg.block_size,
                weight_only=cfg.weight_only_spec() if cfg.quantize.startswith("weight_") else None,
                details=result.quantization_details,
            )
        result.seconds["quantize"] = time.perf_counter() - t0
        result.files["onnx_quantized"] = str(quantized)
        result.sizes_mb["onnx/model_quantized.onnx"] = onnx_size_mb(quantized)
        graphs["output quantized"] = quantized

    acc = report.accuracy
    if evaluator is not None:
        with say.step(f"evaluating {evaluator.metric} of the fp32 graph (ONNX Runtime)"):
            acc.onnx_fp32 = evaluator.evaluate_onnx(fp32)
        if "output quantized" in graphs:
            with say.step(f"evaluating {evaluator.metric} of the quantized graph (ONNX Runtime)"):
                acc.onnx_quantized = evaluator.evaluate_onnx(graphs["output quantized"])

    options = None
    if cfg.latency is not None:
        lat = cfg.latency
        options = dict(batch_size=lat.batch_size, seq_len=lat.seq_len, repeats=lat.repeats, threads=lat.threads, vocab_size=vocab_size)
    measure_baselines(loaded, task, cfg, evaluator, result, acc, options, say)
    if options is not None:
        with say.step("measuring ONNX Runtime latency"):
            for name, path in graphs.items():
                result.latency[name] = measure_latency(path, **options).to_dict()
    save_tokenizer(loaded, onnx_dir)
    return result


def save_pytorch_model(compressed: torch.nn.Module, loaded: LoadedModel, report: OptimizationReport, staging: Path, out_dir: Path,
                  say: Progress) -> None:
    """Write the compressed model to ``staging/pytorch`` (moved to ``out_dir/pytorch`` with the rest)."""
    from optimum_lowrank.saving import write_pretrained

    with say.step("saving the compressed PyTorch model"):
        write_pretrained(compressed, staging / "pytorch", tokenizer=loaded.tokenizer, passes=report.passes)
    report.notes.append(f"compressed PyTorch model saved to {out_dir / 'pytorch'} (optimum_lowrank.from_pretrained rebuilds it)")


def measure_baselines(
    loaded: LoadedModel,
    task: str,
    cfg: ExportConfig,
    evaluator: Evaluator | None,
    result: ExportReport,
    acc: AccuracyReport | None,
    latency: dict | None,
    say: Progress,
) -> None:
    """The original model's graphs the report compares against, measured in a temporary folder and not kept.

    ``export.baseline_latency`` (and ``latency``): the original fp32 graph, its size and latency;
    ``export.baseline_int8``: the original quantized by ONNX Runtime's stock ``dynamic_int8``, its
    size, its metric (with an evaluator) and, with ``baseline_latency``, its latency.
    """
    from optimum_lowrank.exporters.latency import measure_latency
    from optimum_lowrank.exporters.noise import ExportNoise
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb
    from optimum_lowrank.exporters.quantize import quantize_onnx

    timed = cfg.baseline_latency and latency is not None
    if not (timed or cfg.baseline_int8):
        return
    with tempfile.TemporaryDirectory() as tmp:
        noise = ExportNoise()
        with say.step("exporting the original model (the report's baselines)"):
            original = export_onnx(loaded.model, Path(tmp) / "onnx", task, cfg.opset, noise=noise)
        if noise:
            say.line(noise.summary("the original's graph serves only as a reference (size, metric, latency)"))
        result.sizes_mb[ORIGINAL_FP32] = onnx_size_mb(original)
        graphs = {"original fp32": original}
        if cfg.baseline_int8:
            with say.step("quantizing the original with ONNX Runtime's stock dynamic int8"):
                int8 = quantize_onnx(original, Path(tmp) / "onnx" / "model_quantized.onnx", "dynamic_int8")
            result.sizes_mb[ORIGINAL_INT8] = onnx_size_mb(int8)
            graphs["original ORT dynamic int8"] = int8
            if evaluator is not None and acc is not None:
                with say.step(f"evaluating {evaluator.metric} of the original's stock int8 graph"):
                    acc.original_onnx_quantized = evaluator.evaluate_onnx(int8)
        if timed:
            with say.step("measuring ONNX Runtime latency of the original's graphs"):
                for name, path in graphs.items():
                    result.latency[name] = measure_latency(path, **latency).to_dict()


def save_tokenizer(loaded: LoadedModel, onnx_dir: Path) -> None:
    """Keep the tokenizer next to the graphs so ``ORTModel.from_pretrained(onnx_dir)`` works."""
    if loaded.tokenizer is not None and not (onnx_dir / "tokenizer_config.json").exists():
        loaded.tokenizer.save_pretrained(onnx_dir)

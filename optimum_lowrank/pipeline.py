"""The pipeline: load -> passes -> accuracy gate -> ONNX export -> quantization -> report.

Nothing the caller owns is modified: passes run on a deep copy of the model,
files are written to a temporary folder next to ``output`` that is renamed
into place only when every check has passed, and the process-wide torch
settings a run changes are given back when it ends.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.errors import AccuracyError, RecipeError
from optimum_lowrank.execution.device import resolve_device
from optimum_lowrank.execution.distributed import Ranks, checked_output, joined
from optimum_lowrank.execution.plan import plan_execution, run_sequential, sequential_model
from optimum_lowrank.export_step import export_compressed, save_pytorch_model
from optimum_lowrank.output import check_output as _check_output
from optimum_lowrank.output import private_tempdir
from optimum_lowrank.output import staging as _staging
from optimum_lowrank.progress import Progress, silenced
from optimum_lowrank.recipe import Recipe, load_recipe
from optimum_lowrank.report import AccuracyReport, OptimizationReport, PassReport
from optimum_lowrank.report_files import write_report_files

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from optimum_lowrank.evaluation import Evaluator
    from optimum_lowrank.models import LoadedModel
    from optimum_lowrank.plugins import PassRegistry

__all__ = ["apply_passes", "optimize"]


def optimize(
    model: str | os.PathLike | PreTrainedModel,
    recipe: Recipe | dict | str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    registry: PassRegistry | None = None,
    progress: bool = True,
    save_pytorch: bool = False,
    device: str = "cpu",
) -> OptimizationReport:
    """Compress ``model`` as ``recipe`` says, check its accuracy, and export it.

    Parameters
    ----------
    model : PreTrainedModel, local model folder, ``.gguf`` file, alias or hub id
        Aliases ``minilm`` and ``smollm2`` name the packaged real models
        (see :mod:`optimum_lowrank.models`).
    recipe : Recipe, dict, YAML path or YAML text
        See :mod:`optimum_lowrank.recipe`.
    output : path, optional
        Folder to write ``onnx/model.onnx``, ``onnx/model_quantized.onnx`` (when
        quantizing), the model card ``onnx/README.md``, ``report.json``, ``report.md``
        and the plots (:mod:`optimum_lowrank.report_files`). Without it, exported files
        are checked and then discarded.
    tokenizer : PreTrainedTokenizerBase, optional
        Required when ``model`` is an in-memory model whose tokenizer cannot be found.
    overwrite : bool
        Replace an existing non-empty ``output`` folder that this project wrote (it holds
        the marker file :data:`optimum_lowrank.output.MARKER`), only once everything
        succeeded; a folder holding anything else is never replaced.
    registry : PassRegistry, optional
        Where pass ids are looked up; defaults to every installed plugin.
    progress : bool
        Print step lines to stderr; False also turns off every progress bar
        (passes, fine-tuning, evaluation) for the run.
    save_pytorch : bool
        Also write the compressed PyTorch model (and the tokenizer) to ``output/pytorch/``
        (:func:`optimum_lowrank.saving.save_pretrained`'s layout, safetensors weights);
        :func:`optimum_lowrank.from_pretrained` rebuilds it exactly. Needs ``output``.
    device : {"cpu", "cuda", "auto"}
        Where the passes compute (sequential mode: blocks, statistics and decompositions;
        whole-model mode: the compressed copy during the passes); evaluation and export stay
        on the CPU. See :func:`optimum_lowrank.execution.resolve_device`.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is one rank of a multi-process
    calibration (see :mod:`optimum_lowrank.execution.distributed`); only rank 0 exports
    and writes. The recipe's ``execution:`` section chooses whole-model or sequential
    (block-by-block, streamed from disk) mode; see :mod:`optimum_lowrank.execution`.

    Returns
    -------
    OptimizationReport
        Also written to ``output/report.json``.

    Raises
    ------
    RecipeError, TargetError, PassError
        Bad recipe, target or option (or ``save_pytorch`` without ``output``); raised before anything is written.
    ModelLoadError, DataError
        The model or the evaluation/calibration data cannot be loaded.
    OutputExistsError
        ``output`` exists, is not empty and ``overwrite`` is False, or holds files this
        project did not write (see :mod:`optimum_lowrank.output`); checked before the model loads.
    OutputError
        ``output`` is ``/``, the home folder, the working directory or an ancestor of it,
        a symbolic link, a file, or not writable; checked before the model loads.
    AccuracyError
        The gate failed; carries the report. Nothing is written.
    ExportError
        Export, ONNX checking, ORT parity or quantization failed.
    DeviceError
        ``device="cuda"`` without a CUDA device.
    DistributedError
        The ranks of a multi-process run disagree on the recipe or model, or one stopped.

    Notes
    -----
    For a decoder the run calls ``torch.set_flush_denormal(True)`` (CPU matmuls over
    denormal activations, common with dequantised weights, are about 3x slower).
    When ``optimize`` returns or raises, the flush-denormal mode and the state of
    torch's global CPU random number generator are as they were before the call.
    Torch has no getter for flush-denormal: the mode is read on entry by a probe
    and set back at exit; where the probe cannot tell, it is set back to False
    (torch's default).
    """
    with _restored_torch_state(), silenced(not progress), private_tempdir():
        return _optimize(model, recipe, output, tokenizer=tokenizer, overwrite=overwrite, registry=registry, progress=progress,
                         save_pytorch=save_pytorch, device=device)


def _optimize(
    model: str | os.PathLike | PreTrainedModel,
    recipe: Recipe | dict | str | os.PathLike,
    output: str | os.PathLike | None,
    *,
    tokenizer: PreTrainedTokenizerBase | None,
    overwrite: bool,
    registry: PassRegistry | None,
    progress: bool,
    save_pytorch: bool,
    device: str,
) -> OptimizationReport:
    """:func:`optimize` without the restoring of global state."""
    from optimum_lowrank.plugins import get_registry

    recipe = load_recipe(recipe, registry)
    if recipe.search is not None:
        raise RecipeError("this recipe has a 'search:' section: run it with optimum_lowrank.search.search() or "
                          "`optimum-lowrank optimize --recipe`; the search writes a search-free recipe.yaml that optimize() runs")
    if save_pytorch and output is None:
        raise RecipeError("save_pytorch writes output/pytorch/: give an output folder")
    where = resolve_device(device)
    with joined(recipe.execution.timeout_s, where) as ranks:
        return _optimize_on(model, recipe, output, tokenizer, overwrite, registry or get_registry(), progress, where, ranks,
                            save_pytorch)


def _optimize_on(
    model: str | os.PathLike | PreTrainedModel,
    recipe: Recipe,
    output: str | os.PathLike | None,
    tokenizer: PreTrainedTokenizerBase | None,
    overwrite: bool,
    registry: PassRegistry,
    progress: bool,
    device: torch.device,
    ranks: Ranks | None,
    save_pytorch: bool,
) -> OptimizationReport:
    """:func:`optimize` once the recipe, the device and the process group are settled."""
    from optimum_lowrank.models import load_model

    started = time.perf_counter()
    say = Progress(progress)
    plan = plan_execution(recipe, model, registry, ranks)
    recipe = plan.recipe_for(recipe)
    out_dir = checked_output(lambda: _check_output(output, overwrite), ranks)
    if plan.sequential:
        with say.step("reading the model's config and safetensors headers (sequential mode)"):
            loaded = sequential_model(plan, tokenizer)
        if ranks is not None:
            ranks.agree(plan.digest(recipe), "recipe and model")
    else:
        with say.step("loading model"):
            loaded = load_model(model, tokenizer)
    if loaded.kind == "decoder":
        torch.set_flush_denormal(True)
    evaluator = None
    if recipe.accuracy is not None:
        with say.step("preparing accuracy data"):
            evaluator = _build_evaluator(recipe, loaded)
    context = _context(recipe, loaded)
    finetune_ids = None
    if recipe.finetune is not None and recipe.finetune.num_samples is not None:
        with say.step("preparing fine-tune data"):  # before the passes: a too-short text stops here
            finetune_ids = _finetune_windows(recipe, loaded)

    checkpoint = None
    if plan.sequential:
        compressed, pass_reports, result = run_sequential(
            plan, recipe, loaded, context, registry, device=device, ranks=ranks, materialise=recipe.export is not None or save_pytorch, say=say
        )
        checkpoint = result.folder
    else:
        context.notes.append(plan.reason)
        compressed, pass_reports = apply_passes(loaded.model, recipe, context, registry, say, device=device)
    finetuned = None
    if recipe.finetune is not None:
        from optimum_lowrank.finetune import finetune

        ft = recipe.finetune
        fresh = finetune_ids is not None
        where = f"{ft.num_samples} windows after the calibration windows" if fresh else "the calibration windows"
        budget = " or ".join(filter(None, [f"{ft.steps} steps" if ft.steps else "", f"{ft.max_minutes:g} CPU minutes" if ft.max_minutes else ""]))
        with say.step(f"fine-tuning ({budget} on {where})"):
            finetuned = finetune(
                compressed,
                finetune_ids if fresh else context.calibration_ids,
                kind=loaded.kind,
                reference_model=loaded.model,
                seed=recipe.seed,
                progress=progress,
                **ft.model_dump(exclude={"num_samples"}),
            )
        finetuned["data"] = f"{where} of the calibration text, {recipe.calibration.seq_len} tokens each"
    report = OptimizationReport(
        model=loaded.source,
        kind=loaded.kind,
        recipe=recipe.to_dict(),
        params_before=count_parameters(loaded.model),
        params_after=count_parameters(compressed) if compressed is not None else pass_reports[-1].model_params_after,
        passes=pass_reports,
        finetune=finetuned,
        calibration=context.calibration_description,
        notes=context.notes,
    )

    if ranks is not None and not ranks.is_main:
        report.notes.append(f"rank {ranks.rank} of {ranks.world_size}: calibrated its share; rank 0 exports and writes")
        report.seconds = time.perf_counter() - started
        return report
    if evaluator is not None:
        report.accuracy = _accuracy_report(recipe, evaluator)
        with say.step(f"evaluating {evaluator.metric} of the original model"):
            report.accuracy.original = evaluator.evaluate_torch(loaded.model)
        with say.step(f"evaluating {evaluator.metric} of the compressed model"):
            report.accuracy.compressed_torch = evaluator.evaluate_torch(compressed)
        _gate(report, recipe.accuracy.enforce, fail_fast=True)

    if recipe.export is None:
        _note_unenforced(report)
        report.seconds = time.perf_counter() - started
        if out_dir is not None:
            with _staging(out_dir) as staging:
                report.output = str(out_dir)
                _keep_checkpoint(checkpoint, staging, report)
                if save_pytorch:
                    save_pytorch_model(compressed, loaded, report, staging, out_dir, say)
                report.to_json(staging / "report.json")
                write_report_files(report, staging)
        return report

    with _staging(out_dir) as staging:
        report.export = export_compressed(compressed, loaded, recipe, context, evaluator, report, staging, say)
        if recipe.accuracy is not None:
            _gate(report, recipe.accuracy.enforce, fail_fast=False)
        _note_unenforced(report)
        report.seconds = time.perf_counter() - started
        report.output = None if out_dir is None else str(out_dir)
        if out_dir is not None:
            _keep_checkpoint(checkpoint, staging, report)
            report.export.files = {k: str(out_dir / Path(v).relative_to(staging)) for k, v in report.export.files.items()}
            if save_pytorch:
                save_pytorch_model(compressed, loaded, report, staging, out_dir, say)
        report.to_json(staging / "report.json")
        if out_dir is None:
            report.notes.append("no output folder given: the exported files were checked and discarded")
        else:
            write_report_files(report, staging)
    return report


def apply_passes(
    model: torch.nn.Module,
    recipe: Recipe,
    context: PassContext,
    registry: PassRegistry | None = None,
    progress: Progress | None = None,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, list[PassReport]]:
    """Run the recipe's passes on a deep copy of ``model`` (moved to ``device`` for the passes, if given, and back to the CPU).

    Returns
    -------
    compressed : nn.Module
        The copy, in eval mode; ``model`` itself is never modified.
    reports : list of PassReport, one per recipe step.

    Raises
    ------
    TargetError, PassError
        From target selection or the pass itself; the copy is discarded.
    """
    from optimum_lowrank.plugins import get_registry

    registry = registry or get_registry()
    progress = progress or Progress(False)
    compressed = copy.deepcopy(model)
    if device is not None and device.type != "cpu":
        compressed.to(device)
    reports = []
    for index, step in enumerate(recipe.passes):
        compression_pass = registry.get(step.pass_id)(step.config)
        with progress.step(f"pass {index + 1}/{len(recipe.passes)}: {step.pass_id}"):
            targets = compression_pass.select(compressed)
            before = count_parameters(compressed)
            t0 = time.perf_counter()
            layers = compression_pass.apply(compressed, targets, context)
            seconds = time.perf_counter() - t0
        reports.append(PassReport(step.pass_id, step.to_dict(), layers, before, count_parameters(compressed), seconds))
    return compressed.cpu().eval(), reports


def _keep_checkpoint(checkpoint: Path | None, staging: Path, report: OptimizationReport) -> None:
    """Move sequential mode's compressed checkpoint into the output (``checkpoint/``)."""
    if checkpoint is not None:
        shutil.move(str(checkpoint), staging / "checkpoint")
        report.notes.append("compressed weights: checkpoint/ (load with optimum_lowrank.execution.load_compressed)")


# --------------------------------------------------------------------------- helpers


@contextmanager
def _restored_torch_state() -> Iterator[None]:
    """Give back, at exit, the process-wide torch settings a run changes.

    - flush-denormal (``torch.set_flush_denormal``): torch has no getter, so the mode
      is read by a probe (a float32 denormal times one is zero only when denormals
      are flushed) and set back to what it was; where the probe cannot see it (a CPU
      without the setting) it is set back to False, torch's default;
    - the state of the global CPU random number generator: module constructors
      (``nn.Linear`` initialisation) draw from it; passes that need randomness use
      their own ``torch.Generator``.
    """
    flush = _flush_denormal_enabled()
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_flush_denormal(flush)
        torch.set_rng_state(rng)


def _flush_denormal_enabled() -> bool:
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


def _finetune_windows(recipe: Recipe, loaded: LoadedModel) -> torch.Tensor:
    """``finetune.num_samples`` fresh windows: the calibration text's windows after the calibration ones."""
    from optimum_lowrank.data import load_text
    from optimum_lowrank.errors import DataError
    from optimum_lowrank.finetune import fresh_windows

    cal = recipe.calibration
    if loaded.tokenizer is None:
        raise DataError("finetune.num_samples cuts windows from the calibration text and needs the model's tokenizer")
    text, _ = load_text(cal.data)
    return fresh_windows(loaded.tokenizer, text, cal.seq_len, cal.num_samples, recipe.finetune.num_samples)


def _context(recipe: Recipe, loaded: LoadedModel) -> PassContext:
    from optimum_lowrank.data import load_text, token_windows

    cal = recipe.calibration
    notes: list[str] = []

    def calibration_ids() -> torch.Tensor:
        text, _ = load_text(cal.data)
        return token_windows(loaded.tokenizer, text, cal.seq_len, cal.num_samples, strict=True)

    def token_counts():
        from optimum_lowrank.vocab import token_counts as count_tokens

        text, source = load_text(cal.data)
        counts = count_tokens(loaded.tokenizer, text, source)
        needed = cal.num_samples * cal.seq_len
        if counts.tokens < needed:  # the report announces "N windows of L tokens": say what the counts rest on
            notes.append(
                f"token counts come from the whole calibration text, {counts.tokens:,} tokens ({source}): fewer than "
                f"calibration.num_samples x seq_len = {cal.num_samples} x {cal.seq_len} = {needed:,}"
            )
        return counts

    if cal.data is None:
        description = "pydoc_data.topics (English prose shipped with Python; no data named in the recipe)"
    else:
        description = str(cal.data)
    description += f", {cal.num_samples} windows of {cal.seq_len} tokens"
    return PassContext(
        kind=loaded.kind,
        tokenizer=loaded.tokenizer,
        calibration_loader=calibration_ids,
        calibration_description=description,
        seed=recipe.seed,
        notes=notes,
        token_counts_loader=token_counts if loaded.tokenizer is not None else None,
    )


def _build_evaluator(recipe: Recipe, loaded: LoadedModel) -> Evaluator:
    """The evaluator of the recipe's metric, from its validated config (the registered metric's ``config_class``)."""
    from optimum_lowrank.evaluation import evaluator_from_config

    return evaluator_from_config(recipe.accuracy, loaded, reference_model=loaded.model)


def _accuracy_report(recipe: Recipe, evaluator: Evaluator) -> AccuracyReport:
    name, value = recipe.accuracy.threshold
    return AccuracyReport(
        metric=evaluator.metric,
        higher_is_better=evaluator.higher_is_better,
        data=evaluator.description,
        threshold_name=name,
        threshold=value,
    )


def _acceptable(acc: AccuracyReport, value: float) -> bool:
    """The metric's own rule, ``config_class.acceptable``, for the threshold the report carries."""
    from optimum_lowrank.plugins import get_metric_registry

    config_class = get_metric_registry().get(acc.metric).config_class
    # acceptable() reads only the threshold; the recipe's config was validated when it was loaded.
    config = config_class.model_construct(metric=acc.metric, **{acc.threshold_name: acc.threshold})
    return config.acceptable(acc.original, value)


def _gate(report: OptimizationReport, enforce: bool, fail_fast: bool) -> None:
    """Check every measured figure against the threshold; raise AccuracyError on any failure if ``enforce``."""
    acc = report.accuracy
    figures = {"compressed torch": acc.compressed_torch, "ONNX fp32": acc.onnx_fp32, "ONNX quantized": acc.onnx_quantized}
    acc.failures = [
        f"{name} {acc.metric} {value:.4g} vs original {acc.original:.4g} ({acc.threshold_name}={acc.threshold:g})"
        for name, value in figures.items()
        if value is not None and not _acceptable(acc, value)
    ]
    acc.passed = not acc.failures
    if acc.failures and enforce:
        where = " before export" if fail_fast else ""
        raise AccuracyError(f"accuracy gate failed{where}: " + "; ".join(acc.failures), report)


def _note_unenforced(report: OptimizationReport) -> None:
    if report.accuracy is not None and report.accuracy.failures:
        report.notes.append("accuracy gate not enforced (enforce: false): " + "; ".join(report.accuracy.failures))

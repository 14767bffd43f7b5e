"""Which execution mode a run takes, and the pipeline's sequential step.

:func:`plan_execution` decides, before any weight is read, between whole-model mode
(today's: load, deep-copy, run each pass on the copy) and sequential mode
(:mod:`optimum_lowrank.execution.sequential`), from the recipe's ``execution:`` section,
the number of processes and the size of the model (see
:class:`~optimum_lowrank.execution.config.ExecutionConfig` for the ``auto`` threshold).
:func:`run_sequential` is the pipeline's pass step in sequential mode.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from optimum_lowrank.errors import ModelLoadError, RecipeError
from optimum_lowrank.execution.checkpoint import SourceCheckpoint, empty_model, load_compressed
from optimum_lowrank.execution.config import WHOLE_MODEL_COPIES
from optimum_lowrank.execution.distributed import Ranks, digest
from optimum_lowrank.execution.sequential import SequentialResult, compress_sequentially
from optimum_lowrank.report import PassReport

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.api import PassContext
    from optimum_lowrank.models import LoadedModel
    from optimum_lowrank.plugins import PassRegistry
    from optimum_lowrank.progress import Progress
    from optimum_lowrank.recipe import Recipe

__all__ = ["ExecutionPlan", "model_folder", "plan_execution", "run_sequential", "sequential_blockers"]


def model_folder(spec) -> tuple[Path, str] | None:
    """The local folder of safetensors files behind a model spec, or None (an in-memory model, a hub id).

    A packaged alias or ``.gguf`` file resolves to its safetensors conversion in the cache,
    converted now if absent (a GGUF conversion loads the whole model once).
    """
    from optimum_lowrank.gguf_cache import cache_entry_problem, gguf_cache_dir
    from optimum_lowrank.models import ALIASES, load_model, resolve_alias

    if not isinstance(spec, (str, os.PathLike)):
        return None
    text = os.fspath(spec)
    path = resolve_alias(text) if text in ALIASES else Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve(), str(path.resolve())
    if path.is_file() and path.suffix.lower() == ".gguf":
        cache = gguf_cache_dir(path)
        if cache_entry_problem(cache) is not None:
            load_model(text)  # converts and caches (the loaded model is dropped at once)
        return cache, f"{text} (GGUF, float32 safetensors at {cache})"
    return None


def sequential_blockers(recipe: Recipe, registry: PassRegistry) -> list[str]:
    """Why ``recipe`` cannot run block by block (empty when it can)."""
    problems = []
    for step in recipe.passes:
        problem = registry.get(step.pass_id)(step.config).sequential_problem()
        if problem:
            problems.append(problem)
    if recipe.finetune is not None:
        problems.append("finetune: trains the whole compressed model against the whole original")
    if recipe.accuracy is not None:
        problems.append("accuracy: the gate evaluates the whole original model")
    export = recipe.export
    if export is not None and export.latency is not None and export.baseline_latency and "baseline_latency" in export.model_fields_set:
        problems.append("export.baseline_latency: exports the whole original model")
    return problems


@dataclass
class ExecutionPlan:
    """The mode of a run and why.

    Attributes
    ----------
    mode : {"whole", "sequential"}
    reason : str
        One sentence for the report's notes (the estimate and the threshold for ``auto``).
    source : SourceCheckpoint or None
        The safetensors files sequential mode streams.
    description : str
        Where the model comes from, for the report.
    """

    mode: str
    reason: str
    source: SourceCheckpoint | None = None
    description: str = ""

    @property
    def sequential(self) -> bool:
        return self.mode == "sequential"

    def recipe_for(self, recipe: Recipe) -> Recipe:
        """``recipe`` as this mode runs it: sequential mode drops the default latency baseline (it would
        export the whole original model; asking for it explicitly is refused by :func:`plan_execution`)."""
        export = recipe.export
        if not self.sequential or export is None or export.latency is None or not export.baseline_latency:
            return recipe
        self.reason += "; no latency baseline of the original model (it would load the whole model)"
        return recipe.model_copy(update={"export": export.model_copy(update={"baseline_latency": False})})

    def digest(self, recipe: Recipe) -> str:
        """Hash of the recipe and the model's files (headers only) that every rank must share."""
        return digest(recipe.to_yaml(), self.source.identity() if self.source is not None else self.description)


def plan_execution(recipe: Recipe, spec, registry: PassRegistry, ranks: Ranks | None) -> ExecutionPlan:
    """Choose whole-model or sequential mode for running ``recipe`` on model ``spec``.

    Raises
    ------
    RecipeError
        ``mode: sequential`` (or a multi-process run) with a recipe that cannot run block by
        block: the message names each blocking pass or section and the passes that can; or a
        multi-process run with ``mode: whole``.
    ModelLoadError
        Sequential mode on a model that is not a local folder of safetensors files (or an
        alias / GGUF file converted to one).
    """
    cfg = recipe.execution
    if cfg.mode == "whole":
        if ranks is not None:
            raise RecipeError(f"execution.mode 'whole' cannot split calibration over {ranks.world_size} processes; "
                              "multi-process runs calibrate sequentially (mode: sequential or auto)")
        return ExecutionPlan("whole", "execution.mode: whole")
    blockers = sequential_blockers(recipe, registry)
    forced = cfg.mode == "sequential" or ranks is not None
    why = "execution.mode: sequential" if cfg.mode == "sequential" else f"{ranks.world_size} processes" if ranks else ""
    if forced and blockers:
        able = [name for name, entry in registry.entries() if entry.pass_class.supports_sequential]
        raise RecipeError(f"{why} runs the passes one block at a time, but " + "; ".join(blockers)
                          + f". Passes that can run sequentially: {', '.join(able)}. Or use execution: {{mode: whole}} in one process")
    if ranks is not None and not ranks.is_main:  # rank 0 converts a GGUF file alone; the others read its cache
        ranks.barrier("waiting for rank 0 to prepare the model files")
    found = model_folder(spec)
    if ranks is not None and ranks.is_main:
        ranks.barrier("waiting for the other ranks to start")
    if found is None:
        if forced:
            raise ModelLoadError(f"{why} streams weights from a local folder of safetensors files (or an alias / .gguf file); "
                                 f"{spec if isinstance(spec, (str, os.PathLike)) else type(spec).__name__} is not one")
        return ExecutionPlan("whole", "execution.mode: auto, whole-model mode (the model is not a local safetensors folder)")
    source = SourceCheckpoint(found[0])
    if forced:
        return ExecutionPlan("sequential", why, source, found[1])
    import psutil

    need = WHOLE_MODEL_COPIES * source.numel() * 4
    limit = cfg.memory_limit_gb * 1e9 if cfg.memory_limit_gb is not None else psutil.virtual_memory().available / 2
    what = (f"execution.mode: auto: whole-model mode needs about {need / 1e9:.3g} GB ({WHOLE_MODEL_COPIES:g} float32 copies of "
            f"{source.numel():,} weights), threshold {limit / 1e9:.3g} GB"
            + (" (memory_limit_gb)" if cfg.memory_limit_gb is not None else " (half the available memory)"))
    if need <= limit:
        return ExecutionPlan("whole", what + ": whole-model mode")
    if blockers:
        return ExecutionPlan("whole", what + ": whole-model mode anyway, since " + "; ".join(blockers))
    return ExecutionPlan("sequential", what + ": sequential mode", source, found[1])


def sequential_model(plan: ExecutionPlan, tokenizer) -> LoadedModel:
    """A LoadedModel whose ``model`` is the skeleton on the ``meta`` device (for the parameter count and the config)."""
    from transformers import AutoConfig, AutoTokenizer

    from optimum_lowrank.models import LoadedModel, config_kind

    folder = plan.source.folder
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises many types here
            raise ModelLoadError(f"cannot load a tokenizer from {str(folder)!r}: {exc}") from exc
    return LoadedModel(empty_model(config), tokenizer, config_kind(config), plan.description)


def run_sequential(
    plan: ExecutionPlan,
    recipe: Recipe,
    loaded: LoadedModel,
    context: PassContext,
    registry: PassRegistry,
    *,
    device: torch.device,
    ranks: Ranks | None,
    materialise: bool,
    say: Progress,
) -> tuple[torch.nn.Module | None, list[PassReport], SequentialResult]:
    """The pipeline's pass step in sequential mode.

    Returns
    -------
    compressed : nn.Module or None
        The compressed model rebuilt from the checkpoint (rank 0, when ``materialise``:
        an export needs it), on the CPU; else None.
    reports : list of PassReport
    result : SequentialResult
        ``folder`` is the compressed checkpoint in a private temporary folder (rank 0),
        for the pipeline to move into its output.
    """
    passes = [registry.get(step.pass_id)(step.config) for step in recipe.passes]
    work = None if ranks is not None and not ranks.is_main else Path(tempfile.mkdtemp(prefix="sequential-"))
    where = f" over {ranks.describe()}" if ranks is not None else ""
    started = time.perf_counter()
    with say.step(f"compressing block by block from {plan.source.folder}{where} on {device}"):
        result = compress_sequentially(
            plan.source, passes, context, work, kind=loaded.kind, device=device, ranks=ranks,
            batch_size=recipe.execution.batch_size, spread_layers=recipe.execution.spread_layers, progress=say.enabled,
        )
    seconds = time.perf_counter() - started
    reports, before = [], result.params_before
    for step, layers in zip(recipe.passes, result.layers):
        after = before - sum(layer.params_before - layer.params_after for layer in layers)
        reports.append(PassReport(step.pass_id, step.to_dict(), layers, before, after, seconds / max(len(passes), 1)))
        before = after
    compressed = None
    if materialise and result.folder is not None:
        with say.step("loading the compressed checkpoint for export"):
            compressed = load_compressed(result.folder)
    context.notes.append(
        f"sequential mode ({plan.reason}): {len(result.block_seconds)} blocks, {sum(result.block_seconds):.1f} s, "
        f"peak resident memory {result.peak_rss_mb:,.0f} MB{where}; pass seconds are the total split evenly over the passes"
    )
    return compressed, reports, result

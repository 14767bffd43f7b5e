"""The search: sensitivity, then greedy allocation, then verification of the exported, quantized graph.

Algorithm
---------
1. Export the original model (fp32 ONNX), read what the weight-only exporter will quantize and
   what it keeps (:class:`~optimum_lowrank.search.allocate.GraphLayout`), and score the fp32 graph
   and ONNX Runtime's stock dynamic-int8 graph on the search and the gate data (references).
2. Factorize the token table at each ``embedding_ratios`` (usage-aware ``svd`` pass) on copies.
3. Sensitivity (:mod:`~optimum_lowrank.search.sensitivity`): the damage of each linear layer
   alone at each bit-width, and of the embedding group at each (ratio, bits), HAWQ-style.
4. Allocation (:mod:`~optimum_lowrank.search.allocate`): the greedy path of least damage per
   byte saved, bytes computed in ORT's layout; the summed damage is mapped to the metric
   (``exp`` of the summed KL divergence for perplexity; a slope for STS-B, first estimated from the
   pair-cosine noise, as ASVD / SVD-LLM-style rank searches map a per-layer proxy to perplexity).
5. Verification (the tuning loops of Intel Neural Compressor and Olive, and NNCF's
   ``quantize_with_accuracy_control``, but on the exported graph): the point predicted to meet the
   objective is exported, quantized and scored with ONNX Runtime on the search split; the
   measured damage refits the mapping and the next point is searched between the best passing and
   the first failing one (a bracketing search along the path), for at most ``max_rounds`` rounds.
   One more round cross-checks the other (block size, algorithm) paths: the smallest point one of
   them now predicts within the budget is verified if it beats the best passing candidate.
   When the bracket closes on one big step (factorizing the token table saves megabytes at once),
   the gap is filled with configurations that keep the step and give layers their larger bits back
   (:func:`~optimum_lowrank.search.allocate.fill_gap`), and the search goes on inside it.
6. The chosen graph, the fp32 original and the dynamic-int8 graph are scored on the gate data
   (a split the search never saw), and the outputs are written (:mod:`~optimum_lowrank.search.report`).

Nothing is written unless every step succeeds (a temporary folder is renamed at the end).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from optimum_lowrank.cache import cache_root
from optimum_lowrank.errors import ObjectiveNotMetError
from optimum_lowrank.export_step import save_tokenizer
from optimum_lowrank.output import private_tempdir, read_json_cache, write_json_cache
from optimum_lowrank.pipeline import _check_output, _restored_torch_state, _staging
from optimum_lowrank.progress import Progress, bar, silenced
from optimum_lowrank.search.allocate import Choice, DamageModel, GraphLayout, Unit, fill_gap, greedy_path, pick_index
from optimum_lowrank.search.config import SearchConfig
from optimum_lowrank.search.report import Candidate, SearchReport, write_outputs
from optimum_lowrank.search.sensitivity import Probe, cache_key, key, measure_sensitivity, model_fingerprint
from optimum_lowrank.search.setup import SearchSetup, embedding_variant, linear_targets, parse_search_config, weight_only_spec

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["search"]


def search(
    model: str | os.PathLike | PreTrainedModel,
    config: SearchConfig | dict | str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SearchReport:
    """Find the smallest quantized ONNX graph within an accuracy budget (or the best within a size).

    Parameters
    ----------
    model : PreTrainedModel, model folder, ``.gguf`` file, alias (``minilm``, ``smollm2``) or hub id
    config : SearchConfig, dict, or a recipe (path, YAML text or dict with ``version`` and ``search:``)
        See :class:`~optimum_lowrank.search.config.SearchConfig`.
    output : path, optional
        Folder for ``onnx/model_quantized.onnx`` (with ``model.onnx``, config and tokenizer, so
        Optimum's ``ORTModel*.from_pretrained(output / "onnx", file_name="model_quantized.onnx")``
        loads it), ``recipe.yaml`` (a search-free recipe that reproduces it with ``optimize``),
        ``search.json``, ``search.png``, ``allocation.png`` and ``allocation.md``. Without it the
        files are checked and discarded.
    tokenizer : PreTrainedTokenizerBase, optional
        Required with an in-memory model whose tokenizer cannot be found.
    overwrite : bool
        Replace a non-empty ``output`` (only once everything succeeded).
    progress : bool
        Step lines and progress bars on stderr.

    Returns
    -------
    SearchReport
        Also written to ``output/search.json``.

    Raises
    ------
    RecipeError
        Bad config: unknown key (the message lists the allowed ones), no objective or several, bits
        the exporter lacks, an objective that does not fit the metric.
    DataError, ModelLoadError, OutputExistsError, ExportError
        As :func:`optimum_lowrank.optimize`.
    ObjectiveNotMetError
        No candidate met the objective (or the chosen one failed the gate with ``enforce_gate``);
        carries the best point found and every candidate. Nothing is written.

    Notes
    -----
    Deterministic for a fixed ``seed`` (the measurements are rounded to 6 significant digits
    before they order the path). Sensitivities and the reference scores are cached on disk
    (``$OPTIMUM_LOWRANK_CACHE/search``) per model weights, data and options; the report says
    which steps were read from the cache.
    """
    config = parse_search_config(config)
    with _restored_torch_state(), silenced(not progress), private_tempdir():
        return _search(model, config, output, tokenizer=tokenizer, overwrite=overwrite, progress=progress)


def _search(model, config: SearchConfig, output, *, tokenizer, overwrite: bool, progress: bool) -> SearchReport:
    from optimum_lowrank.models import load_model

    started = time.perf_counter()
    say = Progress(progress)
    out_dir = _check_output(output, overwrite)
    with say.step("loading model"):
        loaded = load_model(model, tokenizer)
    if loaded.kind == "decoder":
        torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    setup = SearchSetup(config, loaded)
    report = SearchReport.start(setup)
    with say.step("preparing search and gate data"):
        search_eval, gate_eval = setup.evaluators()
    report.search_data, report.gate_data = search_eval.description, gate_eval.description
    working = copy.deepcopy(loaded.model).eval()
    fingerprint = model_fingerprint(working)

    with _staging(out_dir) as staging:
        work = staging / "work"
        exports: dict[float, Path] = {}
        t0 = time.perf_counter()
        with say.step("exporting the original model (fp32 ONNX)"):
            exports[1.0] = setup.export(working, work / "ratio-1" / "onnx")
        layout = setup.layout(exports[1.0])
        report.seconds["export_original"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with say.step("scoring the fp32 original and ORT dynamic int8 (search and gate data)"):
            report.references = _references(setup, exports[1.0], work, search_eval, gate_eval, fingerprint)
        report.seconds["references"] = time.perf_counter() - t0
        original = report.references["original_fp32"]["search"]

        t0 = time.perf_counter()
        variants, layouts = {}, {}
        for ratio in setup.ratios:
            if ratio == 1.0:
                variants[ratio], layouts[ratio] = embedding_variant(setup, working, layout, 1.0), layout
            else:
                with say.step(f"factorizing {setup.embedding_name} at ratio {ratio:g} (svd, rank {setup.rank(ratio)}, keep_top_k {setup.keep_top_k(ratio)})"):
                    variants[ratio], layouts[ratio] = setup.factorize(working, layout, ratio)
        report.seconds["embedding_passes"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with say.step("measuring per-layer sensitivity"):
            probe = Probe(working, loaded.kind, setup.sensitivity_batches(), pairs=setup.sensitivity_pairs)
            targets, unmeasured = linear_targets(working, layout)
            cache_name = cache_key(model=fingerprint, kind=loaded.kind, **setup.cache_parts(), targets=[t.name for t in targets])
            sensitivity = measure_sensitivity(
                probe, targets, list(variants.values()), config.bits, config.embedding_bits, config.block_sizes,
                measure_all_bits=config.measure_all_bits, algorithms=config.algorithms,
                cache_file=cache_root() / "search" / f"sens-{cache_name}.json",
            )
        report.sensitivity = sensitivity
        report.seconds["sensitivity"] = time.perf_counter() - t0
        report.notes += [f"{name}: not a torch Linear of the exported shape; kept at {max(config.bits)} bits" for name in unmeasured]

        damage = setup.damage_model(sensitivity, original)
        paths = {}
        for algorithm in config.algorithms:
            for block in config.block_sizes:
                variant_units = _units(setup, layout, layouts, sensitivity, unmeasured, block, algorithm)
                paths[(block, algorithm)] = (variant_units, greedy_path(variant_units, layout.fixed_bytes))
        (block, algorithm), report.block_predictions = _pick_variant(setup, paths, damage)
        units, path = paths[(block, algorithm)]
        report.units, report.path, report.prior_scale = units, path, damage.scale
        report.block_size, report.algorithm = block, algorithm

        t0 = time.perf_counter()
        path, lo, hi = _verify(setup, units, path, damage, exports, variants, work, search_eval, original, report, say)
        report.path = path
        try:
            chosen, failure = _choose(setup, path, lo, hi, report), None
        except ObjectiveNotMetError as err:
            chosen, failure = None, err
        other = _cross_check(setup, paths, (block, algorithm), damage, chosen, exports, variants, work, search_eval, original, report, say)
        report.seconds["verification"] = time.perf_counter() - t0
        if other is not None and other[1].passed:
            (block, algorithm), chosen = other
            report.units, report.path = paths[(block, algorithm)]
            report.block_size, report.algorithm = block, algorithm
        elif chosen is None:
            if other is not None:
                failure.candidates.append(other[1].to_json())
            raise failure

        t0 = time.perf_counter()
        with say.step("scoring the chosen graph on the gate data"):
            chosen.gate = gate_eval.evaluate_onnx(chosen.file)
        chosen.gate_damage = setup.metric_damage(report.references["original_fp32"]["gate"], chosen.gate)
        report.seconds["gate"] = time.perf_counter() - t0
        report.chosen, report.damage_model = chosen, damage
        _check_gate(setup, report)

        with say.step("writing outputs"):
            onnx_dir = staging / "onnx"
            shutil.move(str(exports[chosen.ratio].parent), str(onnx_dir))
            shutil.copyfile(chosen.file, onnx_dir / "model_quantized.onnx")
            save_tokenizer(loaded, onnx_dir)
            shutil.rmtree(work, ignore_errors=True)
            report.seconds["total"] = time.perf_counter() - started
            report.output = None if out_dir is None else str(out_dir)
            write_outputs(report, setup, staging)
    return report


def _references(setup: SearchSetup, fp32: Path, work: Path, search_eval, gate_eval, fingerprint: str) -> dict[str, Any]:
    """fp32 original and stock dynamic int8: sizes and scores on both splits (cached on disk)."""
    from optimum_lowrank.exporters.onnx import onnx_size_mb
    from optimum_lowrank.exporters.quantize import quantize_onnx

    key = cache_key(model=fingerprint, references=True, **setup.reference_parts())
    cache = cache_root() / "search" / f"ref-{key}.json"
    cached = read_json_cache(cache)
    if isinstance(cached, dict):
        return {**cached, "cached": True}
    int8 = quantize_onnx(fp32, work / "dynamic_int8.onnx", "dynamic_int8")
    refs = {
        "original_fp32": {"size_mb": onnx_size_mb(fp32), "search": search_eval.evaluate_onnx(fp32), "gate": gate_eval.evaluate_onnx(fp32)},
        "dynamic_int8": {"size_mb": onnx_size_mb(int8), "search": search_eval.evaluate_onnx(int8), "gate": gate_eval.evaluate_onnx(int8)},
    }
    int8.unlink()
    write_json_cache(cache, refs)
    return {**refs, "cached": False}


def _units(setup: SearchSetup, layout: GraphLayout, layouts: dict, sensitivity, unmeasured: list[str], block: int,
           algorithm: str = "rtn") -> list[Unit]:
    """The linear units (choices: bits) and, last, the embedding group (choices: ratio and bits) at ``block``
    with the linear layers quantized by ``algorithm``."""
    bits = sorted(setup.config.bits, reverse=True)
    units = []
    for name in layout.linears:
        if name in unmeasured:
            units.append(Unit(name, (Choice((bits[0],), layout.linear_bytes(name, bits[0], block, algorithm), 0.0),)))
            continue
        damages = sensitivity.linears[name]
        units.append(Unit(name, tuple(Choice((b,), layout.linear_bytes(name, b, block, algorithm), damages[key(b, block, algorithm)])
                                      for b in bits)))
    choices = []
    for ratio, lay in layouts.items():
        for b in sorted(setup.config.embedding_bits, reverse=True):
            nbytes = lay.embedding_bytes(b, block, algorithm) + lay.fixed_bytes - layout.fixed_bytes
            choices.append(Choice((ratio, b), nbytes, sensitivity.embedding[f"{ratio:g}/{key(b, block)}"]))
    units.append(Unit(setup.embedding_name, tuple(choices)))
    return units


def _pick_variant(setup: SearchSetup, paths: dict, damage: DamageModel) -> tuple[tuple[int, str], dict]:
    """The (block size, algorithm) whose path predicts the smallest graph within the budget (``size_mb``: the least
    damage within the size, or the smallest graph if none fits); ties go to the smaller block, then to ``rtn``.
    Returns it and every variant's prediction, keyed ``"rtn/64"``."""
    objective, budget = setup.config.objective
    predictions = {}
    for variant, (_, path) in paths.items():
        point = path[pick_index(path, objective, budget, damage, -1, len(path))]
        predictions[variant] = {"path_index": point.index, "predicted_mb": point.nbytes / 1e6,
                                "predicted_damage": damage.metric_damage(point.damage), "path_points": len(path)}
    order = {name: i for i, name in enumerate(("rtn", "hqq"))}

    def rank(v: tuple[int, str]) -> tuple:
        p, tie = predictions[v], (v[0], order[v[1]])
        if objective == "size_mb":  # fits first, least damage; else the smallest (the closest to fitting)
            fits = p["predicted_mb"] <= budget
            return (not fits, p["predicted_damage"] if fits else p["predicted_mb"], *tie)
        return (p["predicted_damage"] > budget, p["predicted_mb"], *tie)

    best = min(predictions, key=rank)
    return best, {f"{algorithm}/{block}": p for (block, algorithm), p in predictions.items()}


def _verify(setup, units, path, damage: DamageModel, exports, variants, work: Path, search_eval, original: float, report, say):
    """Bracketing search along the path, filling a closed gap that is one big step (:func:`fill_gap`) while
    rounds remain; returns ``(path, lo, hi)`` (see :func:`~optimum_lowrank.search.allocate.pick_index`)."""
    objective, budget = setup.config.objective
    lo, hi, offset = -1, len(path), 0
    block = report.block_size
    rounds = setup.config.max_rounds
    progress = bar(total=rounds, desc="candidates", unit="graph")
    round_index = 0
    try:
        while True:
            last = round_index >= rounds
            if objective != "size_mb" and last and lo == -1 and hi > 0 and not any(c.index == 0 for c in report.candidates):
                index = 0  # one more round: nothing passed, try the largest candidate
            elif last:
                break
            else:
                if hi - lo <= 1:
                    extra = _gap(units, path, lo, hi, objective, budget, offset)
                    if not extra:
                        break
                    path, hi = _insert(path, extra, lo, hi, report)
                index = pick_index(path, objective, budget, damage, lo, hi, offset)
            candidate = _evaluate(setup, units, path[index], block, report.algorithm, exports, variants, work, search_eval, original, say,
                                  name=f"candidate-{len(report.candidates)}")
            round_index += 1
            candidate.round = round_index
            report.candidates.append(candidate)
            progress.update()
            if objective == "size_mb":
                offset = candidate.nbytes - path[index].nbytes
                lo, hi = (lo, index) if candidate.nbytes <= budget * 1e6 else (index, hi)
            else:
                damage.fit(path[index].damage, candidate.damage)
                candidate.passed = candidate.damage <= budget
                lo, hi = (index, hi) if candidate.passed else (lo, index)
    finally:
        progress.close()
    return path, lo, hi


def _cross_check(setup, paths: dict, current: tuple[int, str], damage: DamageModel, chosen: Candidate | None, exports, variants,
                 work: Path, search_eval, original: float, report, say) -> tuple[tuple[int, str], Candidate] | None:
    """One more round (accuracy objectives): another (block size, algorithm) path's prediction, re-read with the damage
    mapping refitted to every measurement so far, verified when it is smaller than the best passing candidate (or
    when none passed). The paths are ranked on predictions; a prediction at the budget's edge can fail where
    another path had room (SmolLM2: HQQ in blocks of 64 predicted 115.1 MB and measured +6.5%, while blocks of 32
    predicted 116.4 MB at +0.05%). Returns the variant and the verified candidate, or None when none qualifies."""
    objective, budget = setup.config.objective
    if objective == "size_mb":
        return None
    options = []
    for variant, (units, path) in paths.items():
        point = path[pick_index(path, objective, budget, damage, -1, len(path))]
        if variant != current and damage.metric_damage(point.damage) <= budget and (chosen is None or point.nbytes < chosen.nbytes):
            options.append((point.nbytes, variant, point))
    if not options:
        return None
    _, variant, point = min(options)
    candidate = _evaluate(setup, paths[variant][0], point, variant[0], variant[1], exports, variants, work, search_eval, original, say,
                          name=f"candidate-{len(report.candidates)}")
    candidate.round, candidate.passed = len(report.candidates) + 1, candidate.damage <= budget
    report.candidates.append(candidate)
    return variant, candidate


def _gap(units, path, lo: int, hi: int, objective: str, budget: float, offset: int) -> list:
    """Points between the bracket's two neighbours (``[]`` when the bracket is open at an end)."""
    if lo < 0 or hi >= len(path):
        return []
    fixed = path[hi].nbytes - sum(u.choices[p].nbytes for u, p in zip(units, path[hi].picks))
    limit = path[lo].nbytes if objective != "size_mb" else min(path[lo].nbytes, int(budget * 1e6) - offset + 1)
    return fill_gap(units, path[hi], limit, fixed)


def _insert(path, extra, lo: int, hi: int, report) -> tuple[list, int]:
    """``extra`` (increasing bytes) between ``lo`` and ``hi``; renumbers the path and the candidates after it."""
    merged = [*path[: lo + 1], *reversed(extra), *path[hi:]]
    for candidate in report.candidates:
        if candidate.index >= hi:
            candidate.index += len(extra)
    return [dataclasses.replace(p, index=i) for i, p in enumerate(merged)], hi + len(extra)


def _evaluate(setup, units, point, block: int, algorithm: str, exports, variants, work: Path, search_eval, original: float, say,
              name: str) -> Candidate:
    from optimum_lowrank.exporters.onnx import onnx_size_mb
    from optimum_lowrank.exporters.quantize import quantize_onnx

    t0 = time.perf_counter()
    ratio, ebits = units[-1].choices[point.picks[-1]].value
    bits = {u.name: u.choices[p].value[0] for u, p in zip(units[:-1], point.picks[:-1])}
    if ratio not in exports:
        with say.step(f"exporting the model with the embedding at ratio {ratio:g} (fp32 ONNX)"):
            exports[ratio] = setup.export(variants[ratio].model, work / f"ratio-{ratio:g}" / "onnx")
    spec = weight_only_spec(setup, exports[ratio], bits, ebits, ratio, block, algorithm)
    out = work / f"{name}.onnx"
    details: dict = {}
    with say.step(f"candidate {point.index}: {point.nbytes / 1e6:.2f} MB predicted; quantizing and scoring"):
        quantize_onnx(exports[ratio], out, "weight_only", weight_only=spec, details=details)
        metric = search_eval.evaluate_onnx(out)
    nbytes = int(round(onnx_size_mb(out) * 1e6))
    return Candidate(
        index=point.index, ratio=ratio, embedding_bits=ebits, bits=bits, predicted_bytes=point.nbytes, nbytes=nbytes,
        proxy=point.damage, search=metric, damage=setup.metric_damage(original, metric), seconds=time.perf_counter() - t0,
        file=out, spec=spec,
    )


def _choose(setup: SearchSetup, path, lo: int, hi: int, report: SearchReport) -> Candidate:
    objective, budget = setup.config.objective
    index = hi if objective == "size_mb" else lo
    by_index = {c.index: c for c in report.candidates}
    if index not in by_index:
        best = _best(setup, report.candidates)
        what = f"no graph fits in {budget:g} MB" if objective == "size_mb" else f"no candidate meets {objective}={budget:g} on the search data"
        raise ObjectiveNotMetError(
            f"{what}; best point found: {best.summary(setup) if best else 'none'} "
            f"(original fp32: {report.references['original_fp32']['search']:.4g}); nothing was written",
            best=best.to_json() if best else None, candidates=[c.to_json() for c in report.candidates],
        )
    return by_index[index]


def _best(setup: SearchSetup, candidates: list[Candidate]) -> Candidate | None:
    if not candidates:
        return None
    if setup.config.objective[0] == "size_mb":
        return min(candidates, key=lambda c: c.nbytes)
    return min(candidates, key=lambda c: (c.damage, c.nbytes))


def _check_gate(setup: SearchSetup, report: SearchReport) -> None:
    objective, budget = setup.config.objective
    chosen = report.chosen
    if objective == "size_mb":
        chosen.gate_passed = None
        return
    chosen.gate_passed = chosen.gate_damage <= budget
    if not chosen.gate_passed:
        message = (
            f"the chosen graph meets {objective}={budget:g} on the search data ({chosen.summary(setup)}) but not on the gate "
            f"data: {setup.metric} {chosen.gate:.4g} vs original {report.references['original_fp32']['gate']:.4g} "
            f"(damage {chosen.gate_damage:.4g})"
        )
        if setup.config.enforce_gate:
            raise ObjectiveNotMetError(message + "; nothing was written (lower the budget, or set enforce_gate: false)",
                                       best=chosen.to_json(), candidates=[c.to_json() for c in report.candidates])
        report.notes.append(message + "; written anyway (enforce_gate: false)")

"""What a search writes: ``search.json``, the reproducing ``recipe.yaml``, the plots and the allocation table."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimum_lowrank.recipe import Recipe
from optimum_lowrank.search.allocate import DamageModel, PathPoint, Unit
from optimum_lowrank.search.config import SEARCH_METRICS
from optimum_lowrank.search.sensitivity import Sensitivity, key

__all__ = ["Candidate", "SearchReport", "concrete_recipe", "write_outputs"]


@dataclass
class Candidate:
    """One configuration exported, quantized (weight-only) and scored with ONNX Runtime."""

    index: int
    ratio: float
    embedding_bits: int
    bits: dict[str, int]
    predicted_bytes: int
    nbytes: int
    proxy: float
    search: float
    damage: float
    seconds: float
    file: Path | None = None
    spec: Any = None
    round: int = 0
    passed: bool | None = None
    gate: float | None = None
    gate_damage: float | None = None
    gate_passed: bool | None = None

    @property
    def size_mb(self) -> float:
        return self.nbytes / 1e6

    def summary(self, setup) -> str:
        return f"{self.size_mb:.2f} MB, {setup.metric} {self.search:.4g} on the search data (damage {self.damage:+.4g})"

    def to_json(self, full: bool = False) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for b in self.bits.values():
            counts[str(b)] = counts.get(str(b), 0) + 1
        out = {
            "round": self.round, "path_index": self.index, "size_mb": self.size_mb, "predicted_mb": self.predicted_bytes / 1e6,
            "embedding_ratio": self.ratio, "embedding_bits": self.embedding_bits, "layers_per_bits": counts,
            "block_size": getattr(self.spec, "block_size", None), "algorithm": getattr(self.spec, "algorithm", None),
            "predicted_proxy": self.proxy, "search_metric": self.search, "search_damage": self.damage, "passed": self.passed,
            "seconds": self.seconds,
        }
        if self.gate is not None:
            out.update(gate_metric=self.gate, gate_damage=self.gate_damage, gate_passed=self.gate_passed)
        if full:
            out["bits"] = dict(self.bits)
        return out


@dataclass
class SearchReport:
    """Everything a search measured and chose; :meth:`to_json` is ``search.json``."""

    model: str
    kind: str
    objective: tuple[str, float]
    metric: str
    config: dict[str, Any]
    search_data: str = ""
    gate_data: str = ""
    search_label: str = ""
    gate_label: str = ""
    references: dict[str, Any] = field(default_factory=dict)
    sensitivity: Sensitivity | None = None
    units: list[Unit] = field(default_factory=list)
    path: list[PathPoint] = field(default_factory=list)
    prior_scale: float | None = None
    block_size: int = 0
    algorithm: str = "rtn"
    block_predictions: dict[int, dict[str, Any]] = field(default_factory=dict)
    damage_model: DamageModel | None = None
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    started: str = ""

    @classmethod
    def start(cls, setup) -> SearchReport:
        config = setup.config.model_dump(mode="json", exclude_defaults=True)
        return cls(model=setup.loaded.source, kind=setup.kind, objective=setup.config.objective, metric=setup.metric, config=config,
                   started=time.strftime("%Y-%m-%d %H:%M:%S"), search_label=setup.search_label, gate_label=setup.gate_label)

    def allocation(self) -> list[dict[str, Any]]:
        """Per unit: its chosen bits (or embedding ratio and bits), bytes and the measured damages."""
        if self.chosen is None:
            return []
        sens = self.sensitivity
        rows = []
        for unit in self.units[:-1]:
            bits = self.chosen.bits[unit.name]
            choice = next(c for c in unit.choices if c.value == (bits,))
            rows.append({"unit": unit.name, "bits": bits, "bytes": choice.nbytes,
                         "damage": {str(c.value[0]): c.damage for c in unit.choices},
                         "relative_error": {str(c.value[0]): sens.errors[unit.name][key(c.value[0], self.block_size, self.algorithm)]
                                            for c in unit.choices if sens and key(c.value[0], self.block_size, self.algorithm)
                                            in sens.errors.get(unit.name, {})}})
        emb = self.units[-1]
        choice = next(c for c in emb.choices if c.value == (self.chosen.ratio, self.chosen.embedding_bits))
        rows.append({"unit": emb.name, "ratio": self.chosen.ratio, "bits": self.chosen.embedding_bits, "bytes": choice.nbytes,
                     "damage": {f"{c.value[0]:g}/{c.value[1]}": c.damage for c in emb.choices}})
        return rows

    def to_json(self) -> dict[str, Any]:
        sens = self.sensitivity
        return {
            "model": self.model, "kind": self.kind, "started": self.started, "objective": {self.objective[0]: self.objective[1]},
            "metric": self.metric, "search_data": self.search_data, "gate_data": self.gate_data, "config": self.config,
            "seconds": self.seconds, "references": self.references,
            "sensitivity": None if sens is None else {"proxy": sens.proxy, "measurements": sens.measurements, "seconds": sens.seconds,
                                                      "cached": sens.cached, "estimated": len(sens.estimated)},
            "damage_model": None if self.damage_model is None else {"form": self.damage_model.form, "prior_scale": self.prior_scale,
                                                                    "final_scale": self.damage_model.scale},
            "block_size": self.block_size, "algorithm": self.algorithm, "block_predictions": {str(b): p for b, p in self.block_predictions.items()},
            "path": [{"index": p.index, "predicted_mb": p.nbytes / 1e6, "proxy": p.damage,
                      "predicted_damage": None if self.damage_model is None else self.damage_model.metric_damage(p.damage), "step": p.step}
                     for p in self.path],
            "candidates": [c.to_json() for c in self.candidates],
            "chosen": None if self.chosen is None else self.chosen.to_json(full=True),
            "allocation": self.allocation(), "notes": self.notes, "output": self.output,
        }

    def table(self) -> str:
        """The console summary: references, candidates, chosen."""
        refs, lines = self.references, [f"search: {self.model} ({self.kind}), {self.objective[0]}={self.objective[1]:g}, metric {self.metric}"]
        lines.append(f"  search data: {self.search_data}\n  gate data:   {self.gate_data}")
        if self.chosen is not None:
            c = self.chosen
            lines.append(f"  chosen: {c.size_mb:.2f} MB, block size {self.block_size}, {self.algorithm}, embedding ratio {c.ratio:g} at {c.embedding_bits} bits, "
                         + ", ".join(f"{n} linear layers at {b} bits" for b, n in sorted(c.to_json()["layers_per_bits"].items(), key=lambda kv: -int(kv[0]))))
        lines.append(f"  {'graph':<28} {'MB':>8} {'search':>10} {'gate':>10}")
        for name in ("original_fp32", "dynamic_int8"):
            r = refs.get(name, {})
            lines.append(f"  {name:<28} {r.get('size_mb', math.nan):8.2f} {r.get('search', math.nan):10.4g} {r.get('gate', math.nan):10.4g}")
        for c in self.candidates:
            tag = "  <- chosen" if c is self.chosen else ""
            lines.append(f"  round {c.round}: point {c.index:<14} {c.size_mb:8.2f} {c.search:10.4g} {'' if c.gate is None else f'{c.gate:10.4g}'}{tag}")
        lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


def concrete_recipe(report: SearchReport, setup) -> Recipe:
    """A search-free recipe that reproduces the chosen graph with :func:`optimum_lowrank.optimize`."""
    chosen, spec = report.chosen, report.chosen.spec
    objective, budget = setup.config.objective
    threshold = SEARCH_METRICS[setup.metric]
    if objective == "size_mb" or chosen.gate_passed is False:  # a measured figure, reported, not enforced
        value, enforce = max(0.0, math.ceil(chosen.gate_damage * 1e4) / 1e4), False
    else:
        value, enforce = budget, True
    accuracy: dict[str, Any] = {"metric": setup.metric, "data": setup.data, **setup.gate_options(), threshold: value}
    if not enforce:
        accuracy["enforce"] = False
    weight_only = {"bits": spec.bits, "block_size": spec.block_size, "embedding_bits": spec.embedding_bits,
                   "overrides": [{"targets": list(patterns), "bits": bits} for patterns, bits in spec.overrides]}
    if spec.algorithm != "rtn":
        weight_only["algorithm"] = spec.algorithm
    export: dict[str, Any] = {"quantize": "weight_only", "weight_only": weight_only}
    if setup.positions < 128:  # the default latency input is 128 tokens
        export["latency"] = {"seq_len": setup.positions}
    data: dict[str, Any] = {"version": 1, "passes": [] if chosen.ratio == 1 else [setup.pass_step(chosen.ratio)],
                            "accuracy": accuracy, "export": export}
    if chosen.ratio != 1:
        data["calibration"] = {"data": setup.calibration}
    if setup.config.seed:
        data["seed"] = setup.config.seed
    return Recipe.from_dict(data)


def write_outputs(report: SearchReport, setup, folder: Path) -> None:
    """``search.json``, ``recipe.yaml``, ``allocation.md``, ``search.png``, ``allocation.png``, ``report.md`` and the
    model card ``onnx/README.md`` into ``folder``."""
    recipe = concrete_recipe(report, setup)
    c = report.chosen
    header = [
        f"# Found by optimum-lowrank's search ({report.started}): {report.objective[0]}={report.objective[1]:g}, metric {report.metric}.",
        f"# Chosen: {c.size_mb:.2f} MB; {report.metric} {c.search:.4g} on the search data ({report.search_label}; original"
        f" {report.references['original_fp32']['search']:.4g}),",
        f"# {c.gate:.4g} on the gate data ({report.gate_label}; original fp32 {report.references['original_fp32']['gate']:.4g}).",
        "# Reproduce: optimum-lowrank optimize --model MODEL --recipe recipe.yaml --output DIR",
    ]
    (folder / "recipe.yaml").write_text("\n".join(header) + "\n" + recipe.to_yaml())
    (folder / "search.json").write_text(json.dumps(report.to_json(), indent=1))
    (folder / "allocation.md").write_text(allocation_markdown(report))
    plot_search(report, folder / "search.png")
    plot_allocation(report, folder / "allocation.png")
    (folder / "report.md").write_text(search_markdown(report))
    if (folder / "onnx").is_dir():
        (folder / "onnx" / "README.md").write_text(search_card(report))


def _figures(report: SearchReport) -> list[str]:
    """The graphs' Markdown table: the original, ORT's stock dynamic int8 and the chosen graph, on both splits."""
    refs, c = report.references, report.chosen
    lines = [f"| graph | file | MB | {report.metric}, search data | {report.metric}, gate data |", "| --- | --- | --- | --- | --- |"]
    for label, ref in (("original fp32", refs["original_fp32"]), ("original, ORT dynamic int8", refs["dynamic_int8"])):
        lines.append(f"| {label} | (not kept) | {ref['size_mb']:.2f} | {ref['search']:.4g} | {ref['gate']:.4g} |")
    lines.append(f"| this model, weight-only | model_quantized.onnx | {c.size_mb:.2f} | {c.search:.4g} | {c.gate:.4g} |")
    return ["", *lines, "", f"Search data: {report.search_label}. Gate data: {report.gate_label}."]


def _done(report: SearchReport) -> list[str]:
    c = report.chosen
    bits = ", ".join(f"{n} at {b} bits" for b, n in sorted(c.to_json()["layers_per_bits"].items(), key=lambda kv: -int(kv[0])))
    return [f"- searched for the smallest graph with {report.objective[0]}={report.objective[1]:g} ({report.metric}): "
            f"{len(report.candidates)} candidates exported and scored with ONNX Runtime",
            f"- token embedding: {'kept whole' if c.ratio == 1 else f'factorized at ratio {c.ratio:g}'}, {c.embedding_bits}-bit",
            f"- linear layers, weight-only block quantization (block size {report.block_size}, {report.algorithm}): {bits}",
            "- `recipe.yaml` (one folder up) reproduces the graph with `optimum-lowrank optimize`"]


def search_markdown(report: SearchReport) -> str:
    """``report.md`` of a search: the figures, the plots, the console table."""
    return "\n".join([f"# optimum-lowrank search: {report.model.split(' (')[0]}", "", *_done(report), "", "## Graphs", *_figures(report), "",
                      "## Plots", "", "![search](search.png)", "![allocation](allocation.png)", "",
                      "Per-layer bits and damages: [allocation.md](allocation.md).", "", "## Console table", "",
                      "```text", report.table(), "```", ""])


def search_card(report: SearchReport) -> str:
    """The Hugging Face model card of the chosen graph (:func:`optimum_lowrank.model_card.render_card`)."""
    from optimum_lowrank.model_card import card_metadata, render_card

    task = "text-generation-with-past" if report.kind == "decoder" else "feature-extraction"
    c = report.chosen
    intro = ("ONNX graph of `{name}` made smaller by optimum-lowrank's search (per-layer bit-widths and the token "
             f"embedding's factorization, scored with ONNX Runtime): {c.size_mb:.2f} MB. `{{file_name}}` is the graph to use.")
    return render_card(meta=card_metadata(report.model, task, ["weight-only", "search"]), source=report.model, alerts=[], intro=intro,
                       done=_done(report), figures=_figures(report)[1:], task=task, file_name="model_quantized.onnx",
                       records="`search.json`, `report.md`, `allocation.md` and `recipe.yaml`")


def allocation_markdown(report: SearchReport) -> str:
    rows = report.allocation()
    widths = sorted({k for r in rows[:-1] for k in r["damage"]}, key=int, reverse=True)
    lines = [f"# Allocation ({report.chosen.size_mb:.2f} MB; damage = {report.sensitivity.proxy} of that change alone)", "",
             "| unit | bits | bytes | " + " | ".join(f"damage @{b}" for b in widths) + " | " + " | ".join(f"rel. error @{b}" for b in widths) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in widths * 2) + " |"]
    for r in rows[:-1]:
        lines.append(f"| {r['unit']} | {r['bits']} | {r['bytes']:,} | " + " | ".join(f"{r['damage'].get(b, math.nan):.3g}" for b in widths)
                     + " | " + " | ".join(f"{r['relative_error'].get(b, math.nan):.3g}" for b in widths) + " |")
    emb = rows[-1]
    lines += ["", f"Token embedding `{emb['unit']}`: ratio {emb['ratio']:g}, {emb['bits']}-bit, {emb['bytes']:,} bytes "
              "(all Gather tables, a tied head's scales and the factorized table's projection).", "",
              "| ratio/bits | damage |", "| --- | --- |"] + [f"| {k} | {v:.3g} |" for k, v in emb["damage"].items()]
    return "\n".join(lines) + "\n"


def plot_search(report: SearchReport, path: Path) -> None:
    """Metric vs size on the search data (candidates, predicted path) and on the gate data (chosen vs references)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs, c = report.references, report.chosen
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, split in zip(axes, ("search", "gate")):
        original = refs["original_fp32"][split]
        if split == "search":
            dm = report.damage_model
            sizes = [p.nbytes / 1e6 for p in report.path]
            predicted = [original - dm.metric_damage(p.damage) if report.kind == "encoder" else original * (1 + dm.metric_damage(p.damage))
                         for p in report.path]
            ax.plot(sizes, predicted, "-", color="0.7", label="greedy path (predicted)")
            ax.scatter([x.size_mb for x in report.candidates], [x.search for x in report.candidates], color="tab:gray", zorder=3, label="candidates (ONNX Runtime)")
            for x in report.candidates:
                ax.annotate(str(x.round), (x.size_mb, x.search), textcoords="offset points", xytext=(4, 4), fontsize=8)
        value = c.search if split == "search" else c.gate
        ax.scatter([c.size_mb], [value], marker="*", s=220, color="tab:red", zorder=4, label=f"chosen ({c.size_mb:.3g} MB)")
        ax.scatter([refs["original_fp32"]["size_mb"]], [original], marker="s", color="black", zorder=4, label="original fp32")
        ax.scatter([refs["dynamic_int8"]["size_mb"]], [refs["dynamic_int8"][split]], marker="^", color="tab:blue", zorder=4, label="ORT dynamic int8")
        name, budget = report.objective
        if name == "max_drop":
            ax.axhline(original - budget, ls="--", color="tab:red", lw=0.8, label=f"budget ({name} {budget:g})")
        elif name == "max_increase":
            ax.axhline(original * (1 + budget), ls="--", color="tab:red", lw=0.8, label=f"budget ({name} {budget:g})")
        else:
            ax.axvline(budget, ls="--", color="tab:red", lw=0.8, label=f"budget ({budget:g} MB)")
        shown = [original, refs["dynamic_int8"][split], value] + ([x.search for x in report.candidates] if split == "search" else [])
        if name != "size_mb":
            shown.append(original - budget if name == "max_drop" else original * (1 + budget))
        low, high = min(shown), max(shown)
        pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
        ax.set_ylim(low - pad, high + pad)
        ax.set_xscale("log")
        ax.set_xlabel("ONNX file size (MB)")
        ax.set_ylabel(report.metric)
        ax.set_title(("search split: " if split == "search" else "gate split: ") + (report.search_label if split == "search" else report.gate_label), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report.model.split(' (')[0][:60]}: {report.objective[0]}={report.objective[1]:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_allocation(report: SearchReport, path: Path) -> None:
    """Bits per linear layer as a grid (block x layer role), the embedding's choice in the title."""
    from optimum_lowrank.plots import plot_layer_grid

    rows = report.allocation()
    emb = rows[-1]
    plot_layer_grid({r["unit"]: r["bits"] for r in rows[:-1]}, path, label="bits", vmin=2, vmax=8,
                    title=f"bits per layer ({report.chosen.size_mb:.2f} MB); {emb['unit']}: ratio {emb['ratio']:g}, {emb['bits']}-bit")

"""What :func:`optimum_lowrank.optimize` writes for people beside ``report.json``.

- ``report.md``: the key figures, any slowdown in a visible line, the plots and the console table;
- ``spectra.png``: the singular-value spectra the passes computed, the kept rank marked;
- ``allocation.png``: the kept rank per layer (and ``bits.png``, the bits per weight of a
  weight-only quantization);
- ``accuracy_size.png``: the metric against the file size for the original, ONNX Runtime's
  stock dynamic int8 of the original and this output (needs an ``accuracy:`` section);
- ``onnx/README.md``: the Hugging Face model card (:mod:`optimum_lowrank.model_card`).

Every figure comes from the :class:`~optimum_lowrank.report.OptimizationReport`; nothing is measured here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from optimum_lowrank.model_card import model_card
from optimum_lowrank.plots import GraphPoint, plot_accuracy_vs_size, plot_layer_grid, plot_spectra
from optimum_lowrank.report import OptimizationReport, format_table

__all__ = ["GraphRow", "graph_rows", "report_markdown", "write_report_files"]

#: ``ExportReport.sizes_mb`` keys of the graphs the pipeline measures but does not keep.
ORIGINAL_FP32 = "original fp32 (not kept)"
ORIGINAL_INT8 = "original ORT dynamic int8 (not kept)"


@dataclass(frozen=True)
class GraphRow:
    """One ONNX graph's figures: file (None when not kept), MB, metric value and median latency (ms), each None if not measured."""

    label: str
    file: str | None
    size_mb: float | None
    metric: float | None
    latency_ms: float | None


def graph_rows(report: OptimizationReport) -> list[GraphRow]:
    """The original fp32 graph, the stock ORT dynamic int8 of the original, and this output's graphs (those measured)."""
    exp, acc = report.export, report.accuracy
    if exp is None:
        return []

    def latency(name: str) -> float | None:
        return exp.latency.get(name, {}).get("median_ms")

    rows = [
        GraphRow("original fp32", None, exp.sizes_mb.get(ORIGINAL_FP32), acc and acc.original, latency("original fp32")),
        GraphRow("original, ORT dynamic int8", None, exp.sizes_mb.get(ORIGINAL_INT8), acc and acc.original_onnx_quantized,
                 latency("original ORT dynamic int8")),
        GraphRow("this model, fp32", "model.onnx", exp.sizes_mb.get("onnx/model.onnx"), acc and acc.onnx_fp32, latency("output fp32")),
    ]
    if "onnx/model_quantized.onnx" in exp.sizes_mb:
        rows.append(GraphRow(f"this model, {exp.quantization}", "model_quantized.onnx", exp.sizes_mb["onnx/model_quantized.onnx"],
                             acc and acc.onnx_quantized, latency("output quantized")))
    return [r for r in rows if r.size_mb is not None or r.metric is not None or r.latency_ms is not None]


def _cell(value: float | None, digits: str = ".4g") -> str:
    return "-" if value is None else format(value, digits)


def figures_table(report: OptimizationReport) -> str:
    """The graphs' figures as a Markdown table (shared by ``report.md`` and the model card)."""
    metric = report.accuracy.metric if report.accuracy is not None else "metric"
    lines = [f"| graph | file | MB | {metric} | ORT latency (ms, median) |", "| --- | --- | --- | --- | --- |"]
    for row in graph_rows(report):
        lines.append(f"| {row.label} | {row.file or '(not kept)'} | {_cell(row.size_mb, '.2f')} | {_cell(row.metric)} | "
                     f"{_cell(row.latency_ms, '.1f')} |")
    return "\n".join(lines)


def layer_table(report: OptimizationReport, limit: int = 60) -> str:
    """Per layer: pass, action, kept rank / full rank, parameters before and after (the first ``limit`` rows)."""
    rows = []
    for p in report.passes:
        for layer in p.layers:
            full = layer.spectrum.length if layer.spectrum is not None else None
            rank = "-" if layer.rank is None else (f"{layer.rank}/{full}" if full else str(layer.rank))
            rows.append(f"| {p.pass_id} | `{layer.name}` | {layer.action} | {rank} | {layer.params_before:,} | {layer.params_after:,} |")
    if not rows:
        return ""
    more = [f"| ... | {len(rows) - limit} more layers in report.json | | | | |"] if len(rows) > limit else []
    return "\n".join(["| pass | layer | action | rank / full | params before | params after |", "| --- | --- | --- | --- | --- | --- |",
                      *rows[:limit], *more])


def key_figures(report: OptimizationReport) -> list[str]:
    """Bullet lines: parameters, file sizes against the original and the stock int8, accuracy, gate."""
    lines = [f"- parameters: {report.params_before:,} -> {report.params_after:,} ({report.compression_ratio:.2f}x fewer)"]
    rows = {r.label: r for r in graph_rows(report)}
    shipped = rows.get(f"this model, {report.export.quantization}") if report.export else None
    shipped = shipped or rows.get("this model, fp32")
    if shipped is not None and shipped.size_mb:
        versus = [f"{shipped.size_mb / rows[k].size_mb:.0%} of the {k} graph ({rows[k].size_mb:.2f} MB)"
                  for k in ("original fp32", "original, ORT dynamic int8") if k in rows and rows[k].size_mb]
        lines.append(f"- file: `onnx/{shipped.file}`, {shipped.size_mb:.2f} MB" + (": " + ", ".join(versus) if versus else ""))
    acc = report.accuracy
    if acc is not None:
        figures = "; ".join(f"{r.label}: {r.metric:.4g}" for r in rows.values() if r.metric is not None)
        verdict = {None: "not checked", True: "passed", False: "FAILED"}[acc.passed]
        lines.append(f"- {acc.metric} ({acc.data}): {figures}; gate {acc.threshold_name}={acc.threshold:g} {verdict}")
    return lines


def _spectra(report: OptimizationReport) -> dict:
    return {layer.name if len(report.passes) == 1 else f"{p.pass_id}: {layer.name}": (layer.spectrum, layer.rank)
            for p in report.passes for layer in p.layers if layer.spectrum is not None}


def write_plots(report: OptimizationReport, folder: Path) -> list[str]:
    """Draw every plot the report has data for into ``folder``; returns the file names written."""
    written = []
    spectra = _spectra(report)
    if spectra:
        plot_spectra(spectra, folder / "spectra.png", title=f"singular values of the decomposed layers: {_short(report.model)}")
        written.append("spectra.png")
    ranks = {layer.name: layer.rank / layer.spectrum.length for p in report.passes for layer in p.layers
             if layer.rank is not None and layer.spectrum is not None and layer.action != "skipped"}
    if ranks:
        text = {layer.name: str(layer.rank) for p in report.passes for layer in p.layers if layer.name in ranks}
        plot_layer_grid(ranks, folder / "allocation.png", label="kept rank / full rank", vmin=0, vmax=1, text=text,
                        title=f"kept rank per layer (cell: rank; colour: share of the full rank); {_short(report.model)}")
        written.append("allocation.png")
    bits = (report.export.quantization_details.get("bits") or {}) if report.export else {}
    if bits:
        plot_layer_grid({_module(name): float(b) for name, b in bits.items()}, folder / "bits.png", label="bits", vmin=2, vmax=8,
                        title=f"bits per weight ({report.export.quantization})")
        written.append("bits.png")
    acc = report.accuracy
    points = [GraphPoint(r.label, r.size_mb, r.metric, *_STYLE.get(r.label, ("*", "tab:red")))
              for r in graph_rows(report) if r.size_mb is not None and r.metric is not None]
    if acc is not None and points:
        budget = _budget(acc)
        plot_accuracy_vs_size(points, folder / "accuracy_size.png", metric=acc.metric, title=f"{acc.metric} against file size: {_short(report.model)}",
                              budget=budget, budget_label=f"gate ({acc.threshold_name} {acc.threshold:g})")
        written.append("accuracy_size.png")
    return written


_STYLE = {"original fp32": ("s", "black"), "original, ORT dynamic int8": ("^", "tab:blue"), "this model, fp32": ("o", "tab:orange")}


def _budget(acc) -> float | None:
    """The gate's limit in the metric's unit, where the threshold is one (max_drop, max_increase, a minimum)."""
    if acc.original is None:
        return None
    if acc.threshold_name == "max_drop":
        return acc.original - acc.threshold
    if acc.threshold_name == "max_increase":
        return acc.original * (1 + acc.threshold)
    if acc.threshold_name.startswith("min_"):
        return acc.threshold
    return None


def _module(weight_name: str) -> str:
    """``/encoder/layer.0/attention/self/query/MatMul`` or ``encoder.layer.0.attention.self.query.weight`` -> a module name."""
    name = re.sub(r"[/_](MatMul|Gather)\w*$|\.weight$", "", weight_name.strip("/"))
    return name.replace("/", ".")


def _short(model: str) -> str:
    return model.split(" (")[0].split(";")[0][:60]


def report_markdown(report: OptimizationReport, images: list[str]) -> str:
    """``report.md``: title, slowdowns, key figures, graphs table, plots, layers, the console table."""
    parts = [f"# optimum-lowrank report: {_short(report.model)}", ""]
    parts += [f"**{line}**" for line in report.slowdowns()] + ([""] if report.slowdowns() else [])
    parts += key_figures(report) + [""]
    if report.export is not None:
        parts += ["## Graphs", "", figures_table(report), ""]
    if images:
        parts += ["## Plots", ""] + [f"![{name[:-4]}]({name})" for name in images] + [""]
    layers = layer_table(report)
    if layers:
        parts += ["## Layers", "", layers, ""]
    parts += ["## Console table", "", "```text", report.table(), "```", ""]
    return "\n".join(parts)


def write_report_files(report: OptimizationReport, folder: Path) -> list[str]:
    """Write ``report.md``, the plots and (when there is an ``onnx/`` folder) its model card into ``folder``.

    Returns
    -------
    list of str
        The file names written, relative to ``folder``.
    """
    folder = Path(folder)
    images = write_plots(report, folder)
    (folder / "report.md").write_text(report_markdown(report, images), encoding="utf-8")
    written = ["report.md", *images]
    if report.export is not None and (folder / "onnx").is_dir():
        (folder / "onnx" / "README.md").write_text(model_card(report, figures_table(report), key_figures(report)), encoding="utf-8")
        written.append("onnx/README.md")
    return written

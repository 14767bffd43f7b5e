"""The optimization report: dataclasses that serialise to JSON and render as a console table."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "ACTIONS", "AccuracyReport", "ExportReport", "LayerAction", "LayerReport", "OptimizationReport", "PassReport", "Spectrum",
    "format_table",
]

#: A latency at least this many times the original graph's is reported as a slowdown (below it: measurement noise).
SLOWER_THAN = 1.05

#: What a pass did to a layer: factorized into factors, replaced by another module, or left as it was.
LayerAction = Literal["factorized", "replaced", "skipped"]
ACTIONS: tuple[str, ...] = get_args(LayerAction)


@dataclass
class Spectrum:
    """A layer's singular values, downsampled so that a report holds them for every layer.

    About ``points`` values survive whatever the layer's size (a few hundred bytes in
    ``report.json``): the first and the last, positions spaced evenly and geometrically
    (the head of a spectrum falls fastest), and the two either side of the kept rank,
    so a plot shows where the cut fell.

    Attributes
    ----------
    length : int
        Length of the full spectrum: ``min(out_features, in_features)`` of what was decomposed.
    index : list of int
        0-based positions kept, ascending, each in ``[0, length)``.
    values : list of float
        The singular values at ``index`` (4 significant digits), in the decomposed matrix's units.
    basis : str
        What was decomposed: ``"weight"``; ``"whitened"`` (SVD-LLM: the weight times the
        Cholesky factor of the inputs' Gram matrix); ``"scaled"`` (ASVD: the weight times
        per-channel input scales); ``"weighted rows"`` (embedding rows weighted by token frequency);
        ``"soft-threshold (trained)"`` (SoftLMs' singular values after training). Plugins name their own.
    """

    length: int
    index: list[int]
    values: list[float]
    basis: str = "weight"

    @classmethod
    def from_singular_values(cls, singular_values: Sequence[float], rank: int | None = None, basis: str = "weight",
                             points: int = 32, length: int | None = None) -> Spectrum:
        """Downsample a full spectrum.

        Parameters
        ----------
        singular_values : sequence of float or Tensor, shape (length,), descending
        rank : int, optional
            The rank kept; positions ``rank - 1`` and ``rank`` are always kept.
        basis : str
            See the class attributes.
        points : int, >= 2
            About how many positions to keep (a few more with ``rank``; all when the spectrum is shorter).
        length : int, optional
            The full spectrum's length when ``singular_values`` holds only its head (a randomized
            or partial SVD); default ``len(singular_values)``.

        Raises
        ------
        ValueError
            If the spectrum is empty or ``points`` < 2.
        """
        values = singular_values.tolist() if hasattr(singular_values, "tolist") else list(singular_values)
        known = len(values)
        if known == 0 or points < 2 or (length is not None and length < known):
            raise ValueError(f"a spectrum needs at least one value, points >= 2 and length >= the values given; "
                             f"got {known} values, points={points}, length={length}")
        half = max(points // 2, 2)
        positions = {round(i * (known - 1) / (half - 1)) for i in range(half)}
        positions |= {min(known, round(known ** (i / (half - 1)))) - 1 for i in range(half)}
        if rank is not None:
            positions |= {p for p in (rank - 1, rank) if 0 <= p < known}
        index = sorted(positions)
        return cls(length=length or known, index=index, values=[float(f"{float(values[i]):.4g}") for i in index], basis=basis)


@dataclass(kw_only=True)
class LayerReport:
    """What a pass did to one module. Built with keywords only::

        LayerReport(name="encoder.layer.0.output.dense", module_type="Linear", action="factorized",
                    params_before=12_288, params_after=4_096, rank=32)

    Attributes
    ----------
    name : str
        Qualified module name.
    module_type : str
    action : {"factorized", "replaced", "skipped"}
        ``factorized``: the module became a factorized layer; ``replaced``: another
        module took its place (e.g. a dense layer holding trained weights);
        ``skipped``: left as it was (``note`` says why).
    params_before, params_after : int
        Parameters of the module (after = before when skipped).
    rank : int or None
    note : str
        Why a layer was skipped, tied-head handling, errors measured, ...
    metrics : dict of str -> float
        Figures the pass measured (errors, seconds, ...).
    spectrum : Spectrum or None
        The singular values the pass computed, downsampled (:meth:`Spectrum.from_singular_values`);
        the report's ``spectra.png`` draws them with ``rank`` marked.

    Raises
    ------
    ValueError
        If ``action`` is not one of :data:`ACTIONS`.
    """

    name: str
    module_type: str
    action: LayerAction
    params_before: int
    params_after: int
    rank: int | None = None
    note: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    spectrum: Spectrum | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"{self.name}: unknown LayerReport action {self.action!r}; allowed: {', '.join(ACTIONS)}")


@dataclass
class PassReport:
    """One recipe step: the layers it touched, the model's parameter count before/after, seconds."""

    pass_id: str
    config: dict[str, Any]
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    seconds: float

    @property
    def touched(self) -> int:
        return sum(layer.action != "skipped" for layer in self.layers)


@dataclass
class AccuracyReport:
    """The accuracy gate. Values are in the metric's own unit (perplexity; Spearman x 100; cosine)."""

    metric: str
    higher_is_better: bool
    data: str
    threshold_name: str
    threshold: float
    original: float | None = None
    compressed_torch: float | None = None
    onnx_fp32: float | None = None
    onnx_quantized: float | None = None
    #: The original model quantized by ONNX Runtime's stock dynamic int8 (``export.baseline_int8``).
    original_onnx_quantized: float | None = None
    passed: bool | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class ExportReport:
    """Files written and checks run on them. Sizes in MB (1e6 bytes); latencies in milliseconds."""

    task: str
    opset: int | None
    quantization: str
    files: dict[str, str] = field(default_factory=dict)
    sizes_mb: dict[str, float] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: What the quantizer reported; weight-only: ``bits`` and ``relative_error`` (Frobenius,
    #: dequantized vs fp32) per weight, ``shared_tables``, ``large_initializers`` (>= 100 KB).
    quantization_details: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizationReport:
    """Everything :func:`optimum_lowrank.optimize` did and measured."""

    model: str
    kind: str
    recipe: dict[str, Any]
    params_before: int
    params_after: int
    passes: list[PassReport] = field(default_factory=list)
    finetune: dict[str, Any] | None = None
    accuracy: AccuracyReport | None = None
    export: ExportReport | None = None
    output: str | None = None
    calibration: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def compression_ratio(self) -> float:
        """Whole-model parameters before / after."""
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compression_ratio"] = round(self.compression_ratio, 4)
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        """Indented JSON; lists of numbers (spectra) stay on one line."""
        text = _NUMBER_LIST.sub(_one_line, json.dumps(self.to_dict(), indent=2, default=str))
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def slowdowns(self) -> list[str]:
        """One line per exported graph whose median ORT latency is at least :data:`SLOWER_THAN` x the original's.

        Empty when nothing got slower or the original was not timed (``export.baseline_latency: false``).
        """
        latency = self.export.latency if self.export is not None else {}
        original = latency.get("original fp32", {}).get("median_ms")
        lines = []
        for name, lat in latency.items():
            ms = lat.get("median_ms")
            if name == "original fp32" or not original or ms is None or ms < SLOWER_THAN * original:
                continue
            lines.append(
                f"SLOWER THAN THE ORIGINAL: {name} runs {ms / original:.2f}x the original fp32 graph's latency "
                f"({ms:,.1f} vs {original:,.1f} ms median, ONNX Runtime CPU, batch {lat.get('batch_size')} x {lat.get('seq_len')} tokens, "
                f"{lat.get('threads')} threads)"
            )
        return lines

    def table(self) -> str:
        """The report as plain-text tables for a console."""
        parts = [f"model: {self.model} ({self.kind})"]
        rows = [
            [p.pass_id, f"{p.touched}/{len(p.layers)}", f"{p.model_params_before:,}", f"{p.model_params_after:,}", f"{p.seconds:.1f}"]
            for p in self.passes
        ]
        rows.append(["total", "", f"{self.params_before:,}", f"{self.params_after:,}", f"{self.seconds:.1f}"])
        parts.append(format_table(["pass", "layers touched", "params before", "params after", "seconds"], rows))
        parts.append(f"compression ratio (model parameters): {self.compression_ratio:.3f}x")
        skipped = [f"  {p.pass_id}: {layer.name}: {layer.note}" for p in self.passes for layer in p.layers if layer.action == "skipped"]
        if skipped:
            parts.append(f"skipped layers ({len(skipped)}):\n" + "\n".join(skipped[:10]) + ("\n  ..." if len(skipped) > 10 else ""))
        if self.finetune:
            ft = self.finetune
            parts.append(
                f"fine-tune: {ft.get('steps')} steps, loss {ft.get('loss_before', float('nan')):.4g} -> "
                f"{ft.get('loss_after', float('nan')):.4g} ({ft.get('seconds', 0):.0f} s)"
            )
        acc = self.accuracy
        if acc is not None:
            cells = [acc.original, acc.compressed_torch, acc.onnx_fp32, acc.onnx_quantized]
            header = ["metric", "original", "compressed torch", "ONNX fp32", "ONNX quantized"]
            if acc.original_onnx_quantized is not None:
                cells.append(acc.original_onnx_quantized)
                header.append("original, ORT int8")
            verdict = {None: "not checked", True: "PASS", False: "FAIL"}[acc.passed]
            parts.append(
                format_table(
                    [*header, "gate"],
                    [[acc.metric] + [_fmt(v) for v in cells] + [f"{verdict} ({acc.threshold_name}={acc.threshold:g})"]],
                )
            )
            parts.append(f"accuracy data: {acc.data}")
        exp = self.export
        if exp is not None:
            rows = [[name, f"{size:.1f}"] for name, size in exp.sizes_mb.items()]
            parts.append(format_table(["file", "MB"], rows))
            if exp.parity:
                parts.append(
                    f"ORT vs PyTorch parity: max |diff| {exp.parity.get('max_abs_diff', float('nan')):.2e} "
                    f"(atol {exp.parity.get('atol')} + rtol {exp.parity.get('rtol')} x max|output| "
                    f"{exp.parity.get('reference_max_abs', 0):.3g}) -> {'ok' if exp.parity.get('passed') else 'MISMATCH'}"
                )
            if exp.latency:
                rows = [
                    [name, _fmt(lat.get("median_ms")), str(lat.get("batch_size")), str(lat.get("seq_len")), str(lat.get("threads"))]
                    for name, lat in exp.latency.items()
                ]
                parts.append(format_table(["ORT CPU latency", "median ms", "batch", "seq", "threads"], rows))
            parts.extend(self.slowdowns())
        parts.extend(f"note: {note}" for note in self.notes)
        if self.output:
            parts.append(f"output: {self.output}")
        return "\n\n".join(parts)


_NUMBER_LIST = re.compile(r"\[\s*(-?\d[\d.eE+-]*(?:,\s*-?\d[\d.eE+-]*)*)\s*\]")


def _one_line(match: re.Match) -> str:
    return "[" + ", ".join(part.strip() for part in match.group(1).split(",")) + "]"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.1f}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Align ``rows`` under ``header`` in columns separated by two spaces."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)

"""The report's pictures, drawn with matplotlib's Agg backend (no display needed): PNG files.

- :func:`plot_spectra`: per-layer singular-value spectra with the kept rank marked,
  one panel per layer role (``attention.self.query``, ``mlp.down_proj``, ...), one line per block;
- :func:`plot_layer_grid`: one figure per layer property (rank, bits) as a block x role grid;
  the search's ``allocation.png`` and ``optimize``'s ``allocation.png`` both use it;
- :func:`plot_accuracy_vs_size`: metric against file size for a few named graphs.

Each function writes one PNG and closes its figure; matplotlib is imported inside them.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.report import Spectrum

__all__ = ["GraphPoint", "block_and_role", "plot_accuracy_vs_size", "plot_layer_grid", "plot_spectra"]

_BLOCK = re.compile(r"\.(\d+)\.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def block_and_role(name: str) -> tuple[int | None, str]:
    """``("encoder.layer.3.intermediate.dense")`` -> ``(3, "intermediate.dense")``; ``(None, name)`` without a block number."""
    match = _BLOCK.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end():]


def plot_spectra(layers: Mapping[str, tuple[Spectrum, int | None]], path: Path, title: str = "") -> None:
    """Singular values (relative to each layer's largest) against their index, the kept rank marked.

    Parameters
    ----------
    layers : mapping name -> (Spectrum, rank or None)
        One entry per decomposed layer; layers of the same role share a panel, coloured
        by block (dark = first block).
    path : Path
        The PNG written.
    title : str
        Figure title.

    Raises
    ------
    ValueError
        If ``layers`` is empty.
    """
    if not layers:
        raise ValueError("no spectra to plot")
    plt = _pyplot()
    roles: dict[str, list[tuple[int | None, str, Spectrum, int | None]]] = {}
    for name, (spectrum, rank) in layers.items():
        block, role = block_and_role(name)
        roles.setdefault(role, []).append((block, name, spectrum, rank))
    cols = min(3, len(roles))
    rows = math.ceil(len(roles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (role, entries) in zip(axes.flat, roles.items()):
        blocks = sorted({b for b, *_ in entries if b is not None}) or [0]
        for block, name, spectrum, rank in sorted(entries, key=lambda e: (e[0] is None, e[0] or 0)):
            top = spectrum.values[0] or 1.0
            colour = cmap(0.85 * blocks.index(block) / max(len(blocks) - 1, 1)) if block is not None else "black"
            relative = [v / top for v in spectrum.values]
            ax.plot(spectrum.index, relative, "-", color=colour, lw=1, label=None if block is None else f"block {block}")
            if rank is not None and rank - 1 in spectrum.index:
                kept = relative[spectrum.index.index(rank - 1)]
                ax.plot([rank - 1], [kept], "o", color=colour, ms=5, mec="black", mew=0.6)
        ranks = sorted({r for *_, r in entries if r is not None})
        label = f"kept rank {ranks[0]}" if len(ranks) == 1 else (f"kept ranks {ranks[0]}-{ranks[-1]}" if ranks else "no rank")
        basis = entries[0][2].basis
        ax.set_title(f"{role}\n({len(entries)} layers, {label}; {basis})", fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("index", fontsize=8)
        ax.set_ylabel("singular value / largest", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if 1 < len(entries) <= 8:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(roles):]:
        ax.axis("off")
    fig.suptitle((title + "\n" if title else "") + "dots: the last singular value kept", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_layer_grid(values: Mapping[str, float], path: Path, *, label: str, title: str, vmin: float | None = None,
                    vmax: float | None = None, text: Mapping[str, str] | None = None, extra: Sequence[str] = ()) -> None:
    """One value per layer as a block x role grid (the colour is the value, the cell text ``text[name]`` or the value).

    Parameters
    ----------
    values : mapping qualified layer name -> float
        Layers without a block number (``embeddings.word_embeddings``, ``lm_head``) are listed
        under the title instead.
    path : Path
        The PNG written.
    label : str
        Colour-bar label (``bits``, ``kept rank / full rank``).
    title : str
    vmin, vmax : float, optional
        Colour range; the values' range when left out.
    text : mapping name -> str, optional
        Cell labels (default: the value, ``:g``).
    extra : sequence of str
        More lines under the title.
    """
    import numpy as np

    plt = _pyplot()
    cells: dict[tuple[int, str], str] = {}
    others = list(extra)
    for name in values:
        block, role = block_and_role(name)
        if block is None:
            others.append(f"{name}: {(text or {}).get(name, f'{values[name]:g}')}")
        else:
            cells[(block, role)] = name
    blocks = sorted({b for b, _ in cells})
    roles = list(dict.fromkeys(role for _, role in sorted(cells, key=lambda k: k[0])))
    grid = np.full((max(len(blocks), 1), max(len(roles), 1)), np.nan)
    for (b, role), name in cells.items():
        grid[blocks.index(b), roles.index(role)] = values[name]
    shown = [v for v in values.values() if v == v]
    low = vmin if vmin is not None else (min(shown) if shown else 0.0)
    high = vmax if vmax is not None else (max(shown) if shown else 1.0)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(roles) + 2), max(3, 0.28 * len(blocks) + 1.5)))
    image = ax.imshow(grid, cmap="viridis", vmin=low, vmax=high if high > low else low + 1, aspect="auto")
    middle = (low + high) / 2
    for (b, role), name in cells.items():
        cell = (text or {}).get(name, f"{values[name]:g}")
        ax.text(roles.index(role), blocks.index(b), cell, ha="center", va="center", color="white" if values[name] < middle else "black",
                fontsize=7)
    ax.set_xticks(range(len(roles)), roles, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=8)
    ax.set_ylabel("block")
    if others:
        title += "; " + "; ".join(others)[:160]
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class GraphPoint:
    """One graph on the accuracy-vs-size plot: ``label``, file size in MB, metric value, matplotlib marker and colour."""

    label: str
    size_mb: float
    value: float
    marker: str = "o"
    colour: str = "tab:gray"


def plot_accuracy_vs_size(points: Sequence[GraphPoint], path: Path, *, metric: str, title: str = "",
                          budget: float | None = None, budget_label: str = "") -> None:
    """The metric against the ONNX file size (log scale) for a few graphs.

    Parameters
    ----------
    points : sequence of GraphPoint
        Points whose value is NaN are left out.
    path : Path
        The PNG written.
    metric : str
        Y-axis label.
    title : str
    budget : float, optional
        The accuracy gate's limit, drawn as a dashed line.
    budget_label : str

    Raises
    ------
    ValueError
        If no point has a finite value.
    """
    points = [p for p in points if p.value == p.value and p.size_mb > 0]
    if not points:
        raise ValueError("no graph with a measured size and metric to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for p in points:
        ax.scatter([p.size_mb], [p.value], marker=p.marker, s=140 if p.marker == "*" else 60, color=p.colour, zorder=3,
                   label=f"{p.label} ({p.size_mb:.3g} MB, {p.value:.4g})")
    shown = [p.value for p in points]
    if budget is not None:
        ax.axhline(budget, ls="--", color="tab:red", lw=0.8, label=budget_label or f"gate ({budget:.4g})")
        shown.append(budget)
    low, high = min(shown), max(shown)
    pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
    ax.set_ylim(low - pad, high + pad)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel("ONNX file size (MB, log scale)")
    ax.set_ylabel(metric)
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

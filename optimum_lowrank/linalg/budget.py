"""Global rank allocation: per-layer ranks that meet one parameter budget over all targets.

A uniform ``rank_ratio`` treats every layer alike, although layers differ a lot in
how much they lose per dropped singular value. Given, per layer, the *gain* of
each singular direction (its squared singular value, possibly of the whitened
matrix, possibly normalised or weighted by a sensitivity), :func:`allocate_ranks`
chooses ranks greedily: starting from ``min_rank`` everywhere, it repeatedly keeps
the direction with the largest gain per added parameter (``out + in`` for one more
rank) until the budget is spent. Gains within a layer are non-increasing, so the
greedy choice is a global threshold on gain per parameter (the solution of the
continuous relaxation of this knapsack).

A layer whose rank reaches its *effective* break-even is kept dense: from there
on the dense layer costs no more than the factors are allowed to and loses
nothing, so the remaining directions are kept at once (a single greedy item
whose gain is the rest of the layer's energy and whose cost is the rest of the
dense layer's parameters). The effective break-even is the smallest rank whose
factors would keep more than ``1 - min_saving`` of the layer's weights
(:func:`factorizes`); with ``min_saving = 0`` it is the plain break-even rank
``out * in / (out + in)``.

Minimum saving per layer (``min_layer_saving``)
-----------------------------------------------
A factorised layer runs two matrix products instead of one. Just under the
break-even rank it saves few parameters and few FLOPs, and ONNX Runtime measured
it *slower* than the dense layer: at 5% fewer parameters 0.97x for 576x576 and
1536x384 (128 tokens) and 0.98x for 384x384 (1024 tokens), while from 10% fewer
every measured shape was faster (1.00x-1.17x), see the ``layer_latency`` rows of
``benchmarks/results/adaptive_rank.json``. The passes therefore keep a linear
layer dense when its factors would keep more than ``1 - min_layer_saving`` of its
weights (default ``DEFAULT_MIN_LAYER_SAVING`` = 0.1), and the allocation treats
that rank as the layer's break-even, so the global budget is still met.

Budget
------
``target_params_ratio`` is the fraction of the targeted layers' parameters that
remain (weights and biases; biases are kept as they are): 0.7 means 30% fewer.
The allocation never exceeds the budget. With ``min_saving = 0`` it undershoots
it by less than the largest ``out + in`` of the targets (one rank of one layer);
e.g. at most 0.2 percentage points for SmolLM2-135M's 210 projections. With a
minimum saving, the last step of a layer to dense costs up to about
``min_saving * out * in + out + in``, and the undershoot is below the largest such
step. When a dense step is left over, the allocation takes it anyway if shrinking
other factorised layers by their least useful directions makes room for it and
loses less gain than the step adds; so with several factorised layers the
undershoot stays below one rank of the largest target in practice too (1,000
random allocations of 1-12 layers with ``min_saving`` 0 or 0.1: it exceeded one
rank only where a single layer was left factorised).

Normalisation (``normalize``)
-----------------------------
``relative`` (default)
    Gains divided by the layer's total, ``sigma_i^2 / sum_j sigma_j^2``: the
    allocation equalises the marginal *relative* (activation-weighted, when the
    singular values are whitened) error per parameter. Insensitive to the scale of
    each layer's activations and outputs.
``absolute``
    Raw ``sigma_i^2``: the marginal squared error of the layer's output (in that
    layer's units; comparable between layers only when their outputs are).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from optimum_lowrank.errors import PassError

__all__ = [
    "DEFAULT_MIN_LAYER_SAVING",
    "BudgetAllocation",
    "LayerSpectrum",
    "allocate_ranks",
    "break_even_rank",
    "budget_dense_note",
    "dense_rank",
    "factorizes",
    "layer_cost",
    "min_saving_note",
]

DEFAULT_MIN_LAYER_SAVING = 0.1
"""Default ``min_layer_saving`` of ``svd``, ``activation_svd`` and ``softlm`` (see the module docstring)."""

LATENCY_EVIDENCE = (
    "in ONNX Runtime a layer factorised at 5% fewer parameters ran slower than the dense one "
    "(0.97x for 576x576 and 1536x384), from 10% fewer every measured shape was faster "
    "(benchmarks/results/adaptive_rank.json, layer_latency)"
)
LATENCY_EVIDENCE_SHORT = "factorised layers saving less ran slower than the dense ones in ONNX Runtime"


@dataclass
class LayerSpectrum:
    """What the allocator needs to know about one target.

    Attributes
    ----------
    name : str
    shape : (out_features, in_features)
    gains : Tensor, shape (k,), k = min(out_features, in_features)
        Non-negative importance of each singular direction, in the layer's SVD order
        (non-increasing), e.g. squared (whitened) singular values.
    extra_params : int
        Parameters that stay whatever the rank (the bias), counted in the budget.
    weight : float, > 0
        Multiplies the (normalised) gains, e.g. a per-layer sensitivity.
    min_saving : float in [0, 1)
        The layer is factorised only if its factors keep at most ``1 - min_saving`` of
        its weights (:func:`factorizes`); otherwise it is kept dense.
    """

    name: str
    shape: tuple[int, int]
    gains: Tensor
    extra_params: int = 0
    weight: float = 1.0
    min_saving: float = 0.0


@dataclass
class BudgetAllocation:
    """The outcome of :func:`allocate_ranks`.

    Attributes
    ----------
    ranks : dict name -> int
        Chosen rank; a layer with ``dense[name]`` True keeps its dense weight (its
        rank is then ``min(out, in)``).
    dense : dict name -> bool
    params_before, params_after : int
        Parameters of all targets (weights + extra), before and with the chosen ranks.
    budget : int
        ``floor(target_params_ratio * params_before)``.
    """

    ranks: dict[str, int]
    dense: dict[str, bool]
    params_before: int
    params_after: int
    budget: int
    target_params_ratio: float
    notes: list[str] = field(default_factory=list)

    @property
    def achieved_ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / max(self.params_before, 1)


def break_even_rank(shape: tuple[int, int]) -> float:
    """``out * in / (out + in)``: a rank at or above it does not reduce the parameters."""
    m, n = shape
    return m * n / (m + n)


def factorizes(shape: tuple[int, int], rank: int, min_saving: float = 0.0) -> bool:
    """Whether factors of ``rank`` are worth it: ``rank * (out + in) < out * in`` and ``<= (1 - min_saving) * out * in``.

    Parameters
    ----------
    shape : (out, in)
    rank : int
    min_saving : float in [0, 1)
        Smallest fraction of the layer's weights the factors must save (0: any saving).

    Raises
    ------
    PassError
        If ``min_saving`` is outside [0, 1).
    """
    if not 0 <= min_saving < 1:
        raise PassError(f"min_layer_saving must be in [0, 1), got {min_saving}")
    m, n = shape
    factors = rank * (m + n)
    return factors < m * n and factors <= (1 - min_saving) * m * n


def dense_rank(shape: tuple[int, int], min_saving: float = 0.0) -> int:
    """The effective break-even: the smallest rank that does not :func:`factorize <factorizes>` (>= 1)."""
    m, n = shape
    if not 0 <= min_saving < 1:
        raise PassError(f"min_layer_saving must be in [0, 1), got {min_saving}")
    r = max(1, math.floor(min(m * n - 1, (1 - min_saving) * m * n) / (m + n)) + 1)
    while r > 1 and not factorizes(shape, r - 1, min_saving):  # float rounding at the boundary
        r -= 1
    while factorizes(shape, r, min_saving):
        r += 1
    return r


def layer_cost(shape: tuple[int, int], rank: int, min_saving: float = 0.0) -> int:
    """Weights of a layer at ``rank``: ``rank * (out + in)`` if it :func:`factorizes`, else ``out * in`` (kept dense)."""
    m, n = shape
    return rank * (m + n) if factorizes(shape, rank, min_saving) else m * n


def budget_dense_note(shape: tuple[int, int], min_saving: float) -> str:
    """The report note of a layer the budget allocation keeps dense (it reached its effective break-even)."""
    m, n = shape
    if min_saving <= 0:
        return f"kept dense by the budget allocation (it reached the break-even rank {m * n / (m + n):.1f} of a {m}x{n} layer)"
    return (
        f"kept dense by the budget allocation (it reached rank {dense_rank(shape, min_saving)}, whose factors would keep more than "
        f"1 - min_layer_saving = {1 - min_saving:.0%} of the {m}x{n} weights: {LATENCY_EVIDENCE_SHORT}; "
        f"plain break-even rank {m * n / (m + n):.1f})"
    )


def min_saving_note(rank: int, shape: tuple[int, int], min_saving: float) -> str | None:
    """The report note of a layer kept dense because factors of ``rank`` would save less than ``min_saving``.

    None if ``rank`` factorizes, or if it does not reduce the layer at all (the plain
    break-even case, which the callers word themselves).
    """
    m, n = shape
    if factorizes(shape, rank, min_saving) or rank * (m + n) >= m * n:
        return None
    kept = rank * (m + n) / (m * n)
    return (
        f"rank {rank} would keep {kept:.1%} of the {m}x{n} weights, more than 1 - min_layer_saving = {1 - min_saving:.0%}: "
        f"kept dense, since a factorised layer that saves so little is slower than the dense one "
        f"({LATENCY_EVIDENCE})"
    )


def allocate_ranks(
    spectra: list[LayerSpectrum],
    target_params_ratio: float,
    *,
    normalize: Literal["relative", "absolute"] = "relative",
    min_rank: int = 1,
) -> BudgetAllocation:
    """Per-layer ranks maximising the kept gain under a global parameter budget (greedy).

    Parameters
    ----------
    spectra : list of LayerSpectrum
        At least one; names unique.
    target_params_ratio : float in (0, 1)
        Fraction of the targets' parameters to keep.
    normalize : {"relative", "absolute"}
        See the module docstring.
    min_rank : int, >= 1
        Every factorized layer keeps at least this rank.

    Returns
    -------
    BudgetAllocation
        ``params_after <= budget``.

    Raises
    ------
    PassError
        If the ratio is outside (0, 1), or the budget is below ``min_rank`` for every layer
        (the message gives the smallest feasible ratio).
    """
    if not 0 < target_params_ratio < 1:
        raise PassError(f"target_params_ratio must be in (0, 1), got {target_params_ratio}")
    if not spectra:
        raise PassError("no layers to allocate a budget over")
    if min_rank < 1:
        raise PassError(f"min_rank must be >= 1, got {min_rank}")
    before = sum(s.shape[0] * s.shape[1] + s.extra_params for s in spectra)
    budget = int(target_params_ratio * before)
    ranks: dict[str, int] = {}
    dense: dict[str, bool] = {}
    gains: dict[str, list[float]] = {}
    spent = 0
    for spec in spectra:
        m, n = spec.shape
        k = min(m, n)
        g = spec.gains.detach().double().clamp_min(0).flatten()
        if g.numel() != k:
            raise PassError(f"{spec.name}: {g.numel()} gains for a {m}x{n} layer, expected {k}")
        if normalize == "relative":
            total = float(g.sum())
            g = g / total if total > 0 else torch.zeros_like(g)
        elif normalize != "absolute":
            raise PassError(f"unknown normalize {normalize!r}; allowed: relative, absolute")
        gains[spec.name] = (g * spec.weight).tolist()
        r = min(min_rank, k)
        ranks[spec.name] = r
        dense[spec.name] = not factorizes(spec.shape, r, spec.min_saving)
        if dense[spec.name]:
            ranks[spec.name] = k
        spent += layer_cost(spec.shape, r, spec.min_saving) + spec.extra_params
    if spent > budget:
        raise PassError(
            f"target_params_ratio {target_params_ratio} is below what rank {min_rank} in every layer keeps "
            f"({spent / before:.4f} of {before:,} parameters); raise the ratio or lower min_rank"
        )

    def item(spec: LayerSpectrum) -> tuple[float, float, int, str] | None:
        """(-gain per parameter, cost, next rank, name) of growing ``spec`` by one step, or None if done."""
        name = spec.name
        r = ranks[name]
        if dense[name] or r >= min(spec.shape):
            return None
        cost = layer_cost(spec.shape, r + 1, spec.min_saving) - layer_cost(spec.shape, r, spec.min_saving)
        if not factorizes(spec.shape, r + 1, spec.min_saving):  # going dense keeps every remaining direction
            gain = sum(gains[name][r:])
        else:
            gain = gains[name][r]
        return (-gain / max(cost, 1), cost, r + 1, name)

    by_name = {spec.name: spec for spec in spectra}
    if len(by_name) != len(spectra):
        raise PassError("layer names must be unique")
    heap = [it for it in (item(spec) for spec in spectra) if it is not None]
    heapq.heapify(heap)
    left_over: list[tuple[float, int, str]] = []  # dense steps that did not fit: (gain, cost, name)
    while heap:
        neg_ratio, cost, rank, name = heapq.heappop(heap)
        spec = by_name[name]
        if spent + cost > budget:
            if not factorizes(spec.shape, rank, spec.min_saving):
                left_over.append((-neg_ratio * max(cost, 1), cost, name))
            continue  # this layer cannot grow any more; cheaper steps of other layers may still fit
        spent += cost
        ranks[name] = rank
        if not factorizes(spec.shape, rank, spec.min_saving):
            dense[name] = True
            ranks[name] = min(spec.shape)
        nxt = item(spec)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    spent += _exchange(left_over, by_name, ranks, dense, gains, budget - spent, min_rank)
    return BudgetAllocation(ranks, dense, before, spent, budget, target_params_ratio)


def _exchange(
    left_over: list[tuple[float, int, str]],
    by_name: dict[str, LayerSpectrum],
    ranks: dict[str, int],
    dense: dict[str, bool],
    gains: dict[str, list[float]],
    slack: int,
    min_rank: int,
) -> int:
    """Take a dense step that did not fit by shrinking other layers, where that keeps more gain.

    With a minimum saving, the step of a layer from its largest factorised rank to dense
    is large (about ``min_saving * out * in``); the greedy loop skips it when it does not
    fit, and the budget may then be undershot by up to that much. Here, for each such
    step (largest gain first), the missing parameters are freed by dropping the least
    useful directions (smallest gain per parameter) of the other factorised layers; the
    exchange is made only if the gain it adds exceeds the gain it drops. Mutates
    ``ranks`` and ``dense``; returns the change of the spent parameters (<= ``slack``).
    """
    delta = 0
    for _, _, name in sorted(left_over, reverse=True):
        spec = by_name[name]
        if dense[name] or ranks[name] >= min(spec.shape):
            continue
        r0 = ranks[name]  # recomputed: an earlier exchange may have shrunk this layer
        cost = spec.shape[0] * spec.shape[1] - layer_cost(spec.shape, r0, spec.min_saving)
        gain = sum(gains[name][r0:])
        need = cost - (slack - delta)
        # candidates: the last kept direction of every other factorised layer, cheapest loss per parameter first
        trial = dict(ranks)
        freed, lost = 0, 0.0
        heap = []
        for other, r in trial.items():
            o = by_name[other]
            if other != name and not dense[other] and r > min_rank:
                heap.append((gains[other][r - 1] / (o.shape[0] + o.shape[1]), other))
        heapq.heapify(heap)
        while freed < need and heap:
            ratio, other = heapq.heappop(heap)
            o = by_name[other]
            r = trial[other]
            freed += o.shape[0] + o.shape[1]
            lost += gains[other][r - 1]
            trial[other] = r - 1
            if lost >= gain:
                break
            if trial[other] > min_rank:
                heapq.heappush(heap, (gains[other][trial[other] - 1] / (o.shape[0] + o.shape[1]), other))
        if freed < need or lost >= gain:
            continue
        ranks.update(trial)
        ranks[name] = min(spec.shape)
        dense[name] = True
        delta += cost - freed
    return delta

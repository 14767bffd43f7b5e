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

A layer whose rank reaches the break-even rank ``out * in / (out + in)`` is kept
dense: from there on the dense layer costs no more than the factors and loses
nothing, so the remaining directions are kept at once (a single greedy item
whose gain is the rest of the layer's energy).

Budget
------
``target_params_ratio`` is the fraction of the targeted layers' parameters that
remain (weights and biases; biases are kept as they are): 0.7 means 30% fewer.
The allocation never exceeds the budget, and undershoots it by less than the
largest ``out + in`` of the targets (one rank of one layer); e.g. at most 0.2
percentage points for SmolLM2-135M's 210 projections.

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
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from optimum_lowrank.errors import PassError

__all__ = ["BudgetAllocation", "LayerSpectrum", "allocate_ranks", "break_even_rank", "layer_cost"]


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
    """

    name: str
    shape: tuple[int, int]
    gains: Tensor
    extra_params: int = 0
    weight: float = 1.0


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


def layer_cost(shape: tuple[int, int], rank: int) -> int:
    """Weights of a layer at ``rank``: ``rank * (out + in)``, or ``out * in`` if that is not smaller (kept dense)."""
    m, n = shape
    return min(rank * (m + n), m * n)


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
        dense[spec.name] = r * (m + n) >= m * n
        spent += layer_cost(spec.shape, r) + spec.extra_params
    if spent > budget:
        raise PassError(
            f"target_params_ratio {target_params_ratio} is below what rank {min_rank} in every layer keeps "
            f"({spent / before:.4f} of {before:,} parameters); raise the ratio or lower min_rank"
        )

    def item(spec: LayerSpectrum) -> tuple[float, float, int, str] | None:
        """(-gain per parameter, cost, next rank, name) of growing ``spec`` by one step, or None if done."""
        name, (m, n) = spec.name, spec.shape
        r = ranks[name]
        if dense[name] or r >= min(m, n):
            return None
        cost = layer_cost(spec.shape, r + 1) - layer_cost(spec.shape, r)
        if (r + 1) * (m + n) >= m * n:  # going dense keeps every remaining direction
            gain = sum(gains[name][r:])
        else:
            gain = gains[name][r]
        return (-gain / max(cost, 1), cost, r + 1, name)

    by_name = {spec.name: spec for spec in spectra}
    if len(by_name) != len(spectra):
        raise PassError("layer names must be unique")
    heap = [it for it in (item(spec) for spec in spectra) if it is not None]
    heapq.heapify(heap)
    while heap:
        _, cost, rank, name = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this layer cannot grow any more; cheaper steps of other layers may still fit
        spent += cost
        spec = by_name[name]
        ranks[name] = rank
        if rank * (spec.shape[0] + spec.shape[1]) >= spec.shape[0] * spec.shape[1]:
            dense[name] = True
            ranks[name] = min(spec.shape)
        nxt = item(spec)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return BudgetAllocation(ranks, dense, before, spent, budget, target_params_ratio)

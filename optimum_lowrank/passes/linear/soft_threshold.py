"""The differentiable soft-thresholded SVD layer of SoftLMs.

:class:`SoftThresholdLinear` holds ``W = U diag(s) V`` and multiplies the
singular values by ``sigmoid((s - tau) / T)`` with a trainable threshold ``tau``;
:meth:`SoftThresholdLinear.to_lowrank` turns it into a :class:`LowRankLinear`
with the singular values above the threshold. :class:`SoftLMState` records the
optimisation. Source: Wang et al., "SoftLMs" (see ``../shared/METHODS.md``) and
:mod:`optimum_lowrank.passes.linear.softlm`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers.lowrank import LowRankLinear
from optimum_lowrank.linalg.budget import factorizes

__all__ = [
    "SoftLMState",
    "SoftThresholdLinear",
]


@dataclass
class SoftLMState:
    """The soft-threshold layers of a :meth:`SoftLMPass.train_soft` run and what happened in training.

    Attributes
    ----------
    soft : dict name -> SoftThresholdLinear
        In ``model`` after training, until :meth:`SoftLMPass.truncate`.
    originals : dict name -> nn.Module
        The replaced layers.
    shapes : dict name -> (out_features, in_features)
    extras : dict name -> int
        Bias parameters.
    initial_ranks : dict name -> int
        Ranks of the starting point.
    projected : dict name -> int
        Directions removed after training to meet the budget.
    log : dict
        ``loss_first``, ``loss_last`` (task loss), ``ratio_last`` (soft parameter ratio), ``seconds``.
    """

    loss: str
    steps: int
    target_params_ratio: float
    initial_ranks: dict[str, int]
    soft: dict[str, SoftThresholdLinear] = field(default_factory=dict)
    originals: dict[str, nn.Module] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    extras: dict[str, int] = field(default_factory=dict)
    projected: dict[str, int] = field(default_factory=dict)
    log: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the report's notes."""
        nan = float("nan")
        return (
            f"softlm: {self.steps} steps, {self.loss} loss {self.log.get('loss_first', nan):.4f} -> {self.log.get('loss_last', nan):.4f}, "
            f"soft parameter ratio {self.log.get('ratio_last', nan):.4f} (target {self.target_params_ratio}); "
            f"{sum(self.projected.values())} direction(s) removed after training to meet the budget"
        )


class SoftThresholdLinear(nn.Module):
    """``y = x V^T diag(ReLU(s - tau)) U^T + bias`` with a learnable threshold ``tau``.

    ``s`` and ``tau`` are stored divided by ``scale``, the median of the positive singular
    values at construction (robust to the few outlier directions whitened spectra have),
    so that learning rates and the temperature are relative to the layer's typical value.

    Parameters
    ----------
    u : Tensor, shape (out_features, k)
    s : Tensor, shape (k,), >= 0
    v : Tensor, shape (k, in_features)
        ``u @ diag(s) @ v`` is the dense weight (e.g. a thin SVD, possibly whitened).
    bias : Tensor of shape (out_features,), or None
    tau : float, >= 0
        Initial threshold, in the units of ``s``.
    train_factors : bool
        Make ``u``, ``v`` (and the bias) trainable too.

    Shapes
    ------
    input (..., in_features) -> output (..., out_features). Only the directions with
    ``s_i > tau`` are computed (the others contribute exactly zero), so the cost per
    token is ``rank * (in + out)``.
    """

    def __init__(self, u: Tensor, s: Tensor, v: Tensor, bias: Tensor | None = None, *, tau: float = 0.0, train_factors: bool = False):
        super().__init__()
        k = s.numel()
        if u.shape[1] != k or v.shape[0] != k:
            raise PassError(f"inconsistent factors: u {tuple(u.shape)}, s {tuple(s.shape)}, v {tuple(v.shape)}")
        self.out_features, self.in_features = u.shape[0], v.shape[1]
        positive = s[s > 0]
        typical = float(positive.median()) if positive.numel() else 0.0
        self.scale = typical if typical > 0 and math.isfinite(typical) else 1.0
        self.u = nn.Parameter(u.detach().float().clone(), requires_grad=train_factors)
        self.v = nn.Parameter(v.detach().float().clone(), requires_grad=train_factors)
        self.s = nn.Parameter(s.detach().float() / self.scale)
        self.tau = nn.Parameter(torch.tensor(float(tau) / self.scale))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=train_factors)

    def singular_values(self) -> Tensor:
        """``ReLU(s - tau)``, shape (k,), in the original units."""
        return F.relu(self.s - self.tau) * self.scale

    def hard_rank(self) -> int:
        """Number of directions with ``s_i > tau``."""
        return int((self.s > self.tau).sum())

    def soft_rank(self, temperature: float) -> Tensor:
        """``sum_i sigmoid((s_i - tau) / temperature)`` (temperature relative to ``scale``); differentiable."""
        return torch.sigmoid((self.s - self.tau) / temperature).sum()

    def weight(self) -> Tensor:
        """The dense weight ``U diag(ReLU(s - tau)) V``, shape (out_features, in_features)."""
        return (self.u * self.singular_values()) @ self.v

    def forward(self, x: Tensor) -> Tensor:
        keep = (self.s > self.tau).nonzero().flatten()
        values = (self.s[keep] - self.tau) * self.scale
        y = ((x @ self.v[keep].t()) * values) @ self.u[:, keep].t()
        return y if self.bias is None else y + self.bias

    def to_lowrank(self, min_saving: float = 0.0) -> nn.Module:
        """The layer with only the surviving directions: ``LowRankLinear`` (rank >= 1), or ``nn.Linear`` with the
        thresholded weight where the surviving rank does not :func:`~optimum_lowrank.linalg.budget.factorizes`
        (at/above break-even, or saving less than ``min_saving`` of the weights)."""
        m, n = self.out_features, self.in_features
        with torch.no_grad():
            values = self.singular_values()
            keep = (self.s > self.tau).nonzero().flatten()
            if keep.numel() == 0:  # nothing survives: the weight is zero; keep one direction with value 0
                keep = self.s.argmax().reshape(1)
            r = keep.numel()
            bias = None if self.bias is None else self.bias.detach()
            if not factorizes((m, n), r, min_saving):
                dense = nn.Linear(n, m, bias=bias is not None)
                dense.weight.copy_(self.weight())
                if bias is not None:
                    dense.bias.copy_(bias)
                return dense
            root = values[keep].sqrt()
            layer = LowRankLinear(n, m, r, bias=bias is not None)
            return layer.load_factors(self.u[:, keep] * root, root[:, None] * self.v[keep], bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.s.numel()}, rank={self.hard_rank()}"

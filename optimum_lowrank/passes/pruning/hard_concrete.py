"""Hard-concrete (L0) gates and the Lagrangian sparsity controller.

:class:`HardConcrete` holds one learnable ``log_alpha`` per prunable unit (a head,
an FFN dimension, a whole sublayer) and samples gates in [0, 1] that are exactly 0
or 1 with non-zero probability (Louizos et al.). :class:`Lagrangian` turns
"expected sparsity should be ``t``" into a penalty whose multipliers are trained by
gradient *ascent* (Xia et al., CoFi; Wang et al.).

References
----------
.. [1] Louizos, Welling, Kingma, "Learning Sparse Neural Networks through L0
   Regularization", arXiv:1712.01312.
.. [2] Xia, Zhong, Chen, "Structured Pruning Learns Compact and Accurate Models"
   (CoFi), arXiv:2204.00408.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["HardConcrete", "Lagrangian"]

#: Stretch interval (l, r) and temperature of the hard-concrete distribution (CoFi's values).
LIMIT_LOW, LIMIT_HIGH, TEMPERATURE = -0.1, 1.1, 2.0 / 3.0


class HardConcrete(nn.Module):
    """``size`` hard-concrete gates.

    Parameters
    ----------
    size : int >= 1
        Number of gates.
    droprate_init : float, 0 < droprate_init < 1
        Initial probability that a gate is closed (CoFi: 0.5).

    Attributes
    ----------
    log_alpha : Parameter, shape (size,)
        Location of each gate's distribution; larger keeps the unit.

    Raises
    ------
    ValueError
        If ``size < 1`` or ``droprate_init`` is outside (0, 1).
    """

    def __init__(self, size: int, droprate_init: float = 0.5) -> None:
        super().__init__()
        if size < 1 or not 0.0 < droprate_init < 1.0:
            raise ValueError(f"need size >= 1 and 0 < droprate_init < 1, got {size}, {droprate_init}")
        init = math.log(1 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(torch.full((size,), init) + 0.01 * torch.randn(size))

    def prob_open(self) -> torch.Tensor:
        """``P(gate != 0)`` per gate, shape (size,), differentiable in ``log_alpha``."""
        shift = TEMPERATURE * math.log(-LIMIT_LOW / LIMIT_HIGH)
        return torch.sigmoid(self.log_alpha - shift)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A training sample of the gates, shape (size,), values in [0, 1] (reparameterised)."""
        u = torch.rand(self.log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / TEMPERATURE)
        return (s * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """Inference gates, shape (size,): the expected number of closed gates,
        ``round(sum(1 - prob_open))``, are set to exactly 0 (lowest ``log_alpha`` first);
        the others take the clamped stretched mean ``clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)``."""
        closed = round(float((1 - self.prob_open()).sum()))
        values = (torch.sigmoid(self.log_alpha) * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW).clamp(0.0, 1.0)
        if closed > 0:
            values[torch.argsort(self.log_alpha)[:closed]] = 0.0
        return values


class Lagrangian(nn.Module):
    """``lambda_1 * (s - t) + lambda_2 * (s - t) ** 2`` for a measured quantity ``s`` and target ``t``.

    The multipliers are trained to *maximise* the penalty (give them to an optimizer
    with a negative learning rate, or flip their gradients with :meth:`flip_gradients`),
    so the model is pushed towards ``s == t`` ever harder while it stays away.

    Parameters
    ----------
    anti_windup : bool
        Reset ``lambda_1`` (and its optimizer state) to 0 whenever the gap ``s - t``
        changes sign (:meth:`reset_on_crossing`). While ``s`` lags a rising target,
        ``lambda_1`` integrates the gap; without the reset it keeps pushing after ``s``
        has crossed ``t`` until it has unwound, and a short training ends far past the
        target (measured on SST-2 MiniLM, 200 steps: targets 0.3 / 0.5 ended at 0.495 /
        0.675 without the reset; see ``docs/infor_coef.md``). Integrator anti-windup, as in
        PI control.
    """

    def __init__(self, anti_windup: bool = True) -> None:
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))
        self.anti_windup = anti_windup
        self._sign = 0.0
        self._previous_sign = 0.0

    def forward(self, value: torch.Tensor, target: float) -> torch.Tensor:
        gap = value - target
        self._previous_sign, self._sign = self._sign, math.copysign(1.0, float(gap.detach()))
        return self.lambda_1 * gap + self.lambda_2 * gap * gap

    def flip_gradients(self) -> None:
        """Negate the multipliers' gradients (after ``backward``), so a minimising step ascends."""
        for p in (self.lambda_1, self.lambda_2):
            if p.grad is not None:
                p.grad.neg_()

    @torch.no_grad()
    def reset_on_crossing(self, optimizers: tuple[torch.optim.Optimizer, ...] = ()) -> bool:
        """With ``anti_windup``: if the gap of the last :meth:`forward` has the other sign than
        the one before, set ``lambda_1`` to 0 and drop its state from ``optimizers``
        (Adam's moments). Returns whether it reset."""
        if not self.anti_windup or not self._previous_sign or self._sign == self._previous_sign:
            return False
        self.lambda_1.zero_()
        for optimizer in optimizers:
            optimizer.state.pop(self.lambda_1, None)
        return True

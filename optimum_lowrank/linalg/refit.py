"""Truncation-aware refit: the best rank-r layer for the inputs it will actually see.

Torch-only math (no ``nn.Module``, no pass). Used by sequential calibration
(:mod:`optimum_lowrank.passes.linear.sequential`), where a layer of block ``i`` is fed
``X_s`` (N x in, tokens as rows): its inputs *through the already compressed blocks
before it*, while the original model fed it ``X_o``. The layer should reproduce the
original's output, so the objective is

    E(M) = ||W X_o^T - M X_s^T||_F^2 / N + lam * ||W - M||_F^2,     rank(M) <= r.

With ``G = X_s^T X_s / N``, ``C = X_o^T X_s / N`` (the cross-Gram matrix) and
``L L^T = G + lam I`` (Cholesky), the unconstrained minimiser is the *corrected weight*

    W' = W (C + lam I) (G + lam I)^{-1},

and, since the residual of a least-squares fit is orthogonal to the fitted space,
``E(M) = E(W') + ||(W' - M) L||_F^2``. The best rank-r ``M`` is therefore SVD-LLM's
whitened truncation *of W'* (not of ``W``): ``W' L = U S V^T``,
``M = U_r S_r V_r^T L^{-1}`` — closed form and optimal, no iteration. When
``X_s = X_o`` and ``lam = 0`` it is SVD-LLM itself (``W' = W``): the refit only
helps where the inputs moved. Keeping SVD-LLM's left factor ``U_r`` and solving for the
right factor only (``B = U_r^T W'``, SVD-LLM's parameter update [1]_) is a special
case, never better than this.

Damping (``lam``): a ridge towards the original weight, ``damping * mean(diag G)``
(default 0.01, GPTQ's 1% of the mean diagonal [2]_). It keeps ``G + lam I``
invertible when there are fewer calibration tokens than input channels or dead
channels, and keeps ``W'`` from over-fitting the calibration tokens. If the Cholesky
still fails, ``damping`` is multiplied by 10, up to 6 times, then
:class:`~optimum_lowrank.errors.PassError`. The pass compares ``E`` (without the
ridge term) of the refit against plain truncation and keeps the better one
(:func:`output_error`), so the refit never increases the calibration output error.

References
----------
.. [1] Wang, Zheng, Wan, Zhang, "SVD-LLM: Truncation-aware Singular Value
   Decomposition for Large Language Model Compression", arXiv 2403.07378 (2024).
.. [2] Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
   Quantization for Generative Pre-trained Transformers", arXiv 2210.17323 (2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optimum_lowrank.errors import PassError
from optimum_lowrank.linalg.whitening import DAMPING_TRIES

__all__ = ["CrossStatistics", "Refit", "output_error", "refit_weight"]


@dataclass(eq=False)
class CrossStatistics:
    """Sums over calibration tokens of one layer's sequential and original inputs.

    Attributes
    ----------
    in_features : int
    count : int
        Token vectors accumulated.
    gram : Tensor, shape (in, in), float64
        ``X_s^T X_s`` (sequential inputs).
    cross : Tensor, shape (in, in), float64
        ``X_o^T X_s`` (original inputs times sequential inputs).
    gram_original : Tensor, shape (in, in), float64
        ``X_o^T X_o``; only for the error's scale (:func:`output_error`).
    """

    in_features: int
    count: int = 0
    gram: Tensor | None = None
    cross: Tensor | None = None
    gram_original: Tensor | None = None

    def update(self, sequential: Tensor, original: Tensor) -> None:
        """Add one batch: ``sequential`` and ``original`` of shape (..., in_features), the same tokens in the same order.

        Raises
        ------
        PassError
            If the two inputs hold different numbers of tokens.
        """
        xs = sequential.detach().reshape(-1, self.in_features).float()
        xo = original.detach().reshape(-1, self.in_features).float()
        if xs.shape != xo.shape:
            raise PassError(f"sequential and original inputs differ in shape: {tuple(xs.shape)} vs {tuple(xo.shape)}")
        parts = ((xs.t() @ xs).double(), (xo.t() @ xs).double(), (xo.t() @ xo).double())  # float32 per batch, float64 sums
        if self.gram is None:
            self.gram, self.cross, self.gram_original = parts
        else:
            self.gram.add_(parts[0])
            self.cross.add_(parts[1])
            self.gram_original.add_(parts[2])
        self.count += xs.shape[0]

    def normalized(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(G, C, G_o)`` divided by the token count, float64.

        Raises
        ------
        PassError
            If nothing was accumulated.
        """
        if self.gram is None or self.count == 0:
            raise PassError("no sequential statistics were collected for this layer")
        return self.gram / self.count, self.cross / self.count, self.gram_original / self.count


@dataclass
class Refit:
    """The corrected weight and the whitening it is truncated in.

    Attributes
    ----------
    weight : Tensor, shape (out, in), float64
        ``W' = W (C + lam I)(G + lam I)^{-1}``.
    lower : Tensor, shape (in, in), float64
        Lower Cholesky factor of ``G + lam I``.
    damping : float
        The relative damping used (``lam / mean(diag G)``).
    """

    weight: Tensor
    lower: Tensor
    damping: float


def refit_weight(weight: Tensor, gram: Tensor, cross: Tensor, damping: float = 0.01) -> Refit:
    """The corrected weight ``W'`` minimising the (ridge-damped) output error against the original inputs.

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        The original layer's weight ``W``.
    gram : Tensor, shape (in, in)
        ``G = X_s^T X_s / N``.
    cross : Tensor, shape (in, in)
        ``C = X_o^T X_s / N``.
    damping : float, > 0
        Relative ridge: ``lam = damping * mean(diag G)``; x10 on each failed Cholesky (6 tries).

    Returns
    -------
    Refit

    Raises
    ------
    PassError
        If an input holds NaN/inf, ``G`` is zero, or no damping up to ``damping * 10^5``
        makes ``G + lam I`` positive definite.
    ValueError
        If ``damping <= 0`` or the shapes disagree.
    """
    if damping <= 0:
        raise ValueError(f"refit damping must be > 0, got {damping}")
    n = weight.shape[1]
    if gram.shape != (n, n) or cross.shape != (n, n):
        raise ValueError(f"gram {tuple(gram.shape)} and cross {tuple(cross.shape)} must both be ({n}, {n}) for a weight of shape {tuple(weight.shape)}")
    w, g, c = weight.detach().double(), gram.double(), cross.double()
    if not (torch.isfinite(w).all() and torch.isfinite(g).all() and torch.isfinite(c).all()):
        raise PassError("the weight or the sequential calibration statistics hold NaN or inf; cannot refit")
    level = float(g.diagonal().mean())
    if level <= 0:
        raise PassError("the layer's sequential inputs were all zero; cannot refit")
    eye = torch.eye(n, dtype=torch.float64)
    eps = damping
    for _ in range(DAMPING_TRIES):
        lam = eps * level
        lower, info = torch.linalg.cholesky_ex(g + lam * eye)
        if int(info) == 0:
            # W' = W (C + lam I) (G + lam I)^{-1}:  W'^T = (G + lam I)^{-1} (C + lam I)^T W^T  (G symmetric)
            corrected = torch.cholesky_solve((c + lam * eye).t() @ w.t(), lower).t()
            return Refit(corrected, lower, eps)
        eps *= 10
    raise PassError(f"cannot refit: the Gram matrix of the sequential inputs is not positive definite even with damping {eps / 10:g} * mean(diag)")


def output_error(weight: Tensor, approx: Tensor, gram: Tensor, cross: Tensor, gram_original: Tensor) -> float:
    """Relative output error ``||W X_o^T - M X_s^T||_F / ||W X_o^T||_F`` from the normalised Gram matrices.

    Parameters
    ----------
    weight : Tensor, shape (out, in)
        ``W``, the original weight.
    approx : Tensor, shape (out, in)
        ``M``, e.g. the product of the factors.
    gram, cross, gram_original : Tensor, shape (in, in)
        ``G = X_s^T X_s / N``, ``C = X_o^T X_s / N``, ``G_o = X_o^T X_o / N``.

    Returns
    -------
    float, >= 0 (0 when the original output is zero)
    """
    w, m = weight.detach().double(), approx.detach().double()
    target = float((w @ gram_original.double() * w).sum())
    error = target - 2 * float((w @ cross.double() * m).sum()) + float((m @ gram.double() * m).sum())
    return (max(error, 0.0) / target) ** 0.5 if target > 0 else 0.0

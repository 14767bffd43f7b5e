"""Activation-aware input transforms for SVD: ASVD scaling and SVD-LLM whitening.

Torch-only math (no ``nn.Module``, no pass). :class:`InputStatistics` holds the
sums over calibration tokens that one linear layer saw (``sum |x|`` and
``X^T X``, float64); :func:`asvd_transform` and :func:`cholesky_transform` turn
them into an invertible input transform ``T`` (in x in); :func:`whitened_svd`
factors ``W T`` and folds ``T^{-1}`` back into the right factor. The method
description and references are in
:mod:`optimum_lowrank.passes.linear.activation_svd`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from optimum_lowrank.errors import PassError
from optimum_lowrank.linalg.svd import split_factors

__all__ = [
    "InputStatistics",
    "InputTransform",
    "WhitenedSVD",
    "asvd_transform",
    "cholesky_transform",
    "thin_svd",
    "whitened_svd",
]


def whitened_svd(weight: Tensor, transform: InputTransform) -> WhitenedSVD:
    """Thin SVD of ``W T`` (float64) with ``T^{-1}`` folded into the right singular vectors.

    Parameters
    ----------
    weight : Tensor, shape (out, in)
    transform : InputTransform

    Returns
    -------
    WhitenedSVD
        At full rank, ``u @ diag(s) @ v`` reconstructs ``weight`` (up to float error).

    Raises
    ------
    PassError
        If ``weight`` contains NaN or inf.
    """
    if not torch.isfinite(weight).all():
        raise PassError("weight contains NaN or inf; cannot factorize")
    u, s, vh = thin_svd(transform.right(weight.detach().double()))
    return WhitenedSVD(u.float(), s, transform.undo(vh).float(), transform)


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)``, computed on the tall orientation.

    A wide matrix (rows < columns) is factored as its transpose, ``M^T = U' S V'^T``, and
    returned as ``(V', S, U'^T)``: the same thin SVD up to rounding and the sign of each
    singular pair. The LAPACK ``gesdd`` behind ``torch.linalg.svd`` on the CPU is several
    times slower on the wide orientation (measured, torch 2.13 / MKL, 2 threads, float64:
    1024 x 3072 in 74.5 s, its transpose in 27.4 s; see docs/scale.md), and the wide
    shapes are common here (``k_proj``/``v_proj`` with grouped-query attention,
    ``down_proj``).
    """
    rows, cols = matrix.shape[-2:]
    if rows >= cols:
        return torch.linalg.svd(matrix, full_matrices=False)
    u, s, vh = torch.linalg.svd(matrix.mT, full_matrices=False)
    return vh.mT, s, u.mT


@dataclass
class WhitenedSVD:
    """``W = U diag(s) V`` where ``U, s`` are the SVD of ``W T`` and ``V = V_T^T T^{-1}``.

    Attributes
    ----------
    u : Tensor, shape (out, k), float32
    s : Tensor, shape (k,), float64, descending: singular values of ``W T``
    v : Tensor, shape (k, in), float32: rows of ``V^T T^{-1}`` (not orthonormal unless T = I)
    transform : InputTransform
    """

    u: Tensor
    s: Tensor
    v: Tensor
    transform: InputTransform

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """``A`` (out, rank) and ``B`` (rank, in) with ``A B = U_r diag(s_r) V_r``; see :func:`split_factors`."""
        return split_factors(self.u, self.s.float(), self.v, rank)

    def relative_error(self, rank: int) -> float:
        """``sqrt(sum_{i > rank} s_i^2 / sum s_i^2)``: the relative output error on the calibration data (svd_llm)."""
        energy = self.s.square()
        total = float(energy.sum())
        return float((energy[rank:].sum() / total).sqrt()) if total > 0 else 0.0


def cholesky_transform(stats: InputStatistics, damping: float = 1e-6) -> InputTransform:
    """SVD-LLM's whitening: the lower Cholesky factor ``L`` of ``G = X^T X / N`` (float64).

    Parameters
    ----------
    stats : InputStatistics
        With ``gram`` collected.
    damping : float, > 0
        First relative ridge tried when ``G`` is not positive definite: ``G + damping *
        mean(diag G) * I``; multiplied by 10 on each further failure (6 tries).

    Returns
    -------
    InputTransform of kind ``cholesky`` (``damping`` says what was added, 0 if nothing);
    ``identity`` if ``G`` is zero (a layer that only ever saw zeros).

    Raises
    ------
    PassError
        If ``G`` holds NaN/inf, or no damping up to ``damping * 10^5`` makes it positive definite.
    """
    gram = stats.second_moment
    if not torch.isfinite(gram).all():
        raise PassError("the Gram matrix of the calibration activations holds NaN or inf")
    lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return InputTransform("cholesky", lower=lower)
    level = float(gram.diagonal().mean())
    if level <= 0:
        return InputTransform("identity")
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    eps = damping
    for _ in range(DAMPING_TRIES):
        lower, info = torch.linalg.cholesky_ex(gram + eps * level * eye)
        if int(info) == 0:
            return InputTransform("cholesky", lower=lower, damping=eps)
        eps *= 10
    raise PassError(f"the Gram matrix is not positive definite even with damping {eps / 10:g} * mean(diag)")


def asvd_transform(stats: InputStatistics, alpha: float) -> InputTransform:
    """ASVD's channel scaling ``T = diag(mean |x|)^alpha``, floored at ``1e-6`` of the largest scale.

    Parameters
    ----------
    stats : InputStatistics
        With ``abs_sum`` collected.
    alpha : float, > 0

    Returns
    -------
    InputTransform of kind ``scale``.
    """
    scale = stats.abs_mean.clamp_min(0).pow(alpha)
    top = float(scale.max())
    if top <= 0 or not torch.isfinite(scale).all():
        return InputTransform("identity")
    return InputTransform("scale", scale=scale.clamp_min(ASVD_SCALE_FLOOR * top))


@dataclass
class InputTransform:
    """An invertible input transform ``T`` (in x in) applied as ``W T``; undone as ``B T^{-1}``.

    Attributes
    ----------
    kind : {"identity", "scale", "cholesky"}
    scale : Tensor of shape (in,), float64, for ``scale`` (T = diag(scale))
    lower : Tensor of shape (in, in), float64, lower triangular, for ``cholesky``
    damping : float
        Relative ridge added to the Gram diagonal before the Cholesky (0 if none was needed).
    """

    kind: Literal["identity", "scale", "cholesky"]
    scale: Tensor | None = None
    lower: Tensor | None = None
    damping: float = 0.0

    def right(self, weight: Tensor) -> Tensor:
        """``W T`` for ``W`` of shape (out, in), float64."""
        if self.kind == "scale":
            return weight * self.scale
        if self.kind == "cholesky":
            return weight @ self.lower
        return weight

    def undo(self, rows: Tensor) -> Tensor:
        """``B T^{-1}`` for ``B`` of shape (r, in), float64."""
        if self.kind == "scale":
            return rows / self.scale
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.lower, rows, upper=False, left=False)
        return rows


DAMPING_TRIES = 6


ASVD_SCALE_FLOOR = 1e-6


@dataclass(eq=False)
class InputStatistics:
    """Sums over the calibration tokens that reached one layer's input.

    Attributes
    ----------
    in_features : int
    count : int
        Number of token vectors accumulated (batch x sequence positions).
    abs_sum : Tensor of shape (in_features,), float64, or None
        ``sum_t |x_t|`` per input channel.
    gram : Tensor of shape (in_features, in_features), float64, or None
        ``sum_t x_t x_t^T`` (``X^T X`` with tokens as the rows of ``X``).
    shared_with : list of str
        Names of the other modules whose input was the same tensor (they hold this object too).
    """

    in_features: int
    count: int = 0
    abs_sum: Tensor | None = None
    gram: Tensor | None = None
    shared_with: list[str] = field(default_factory=list)

    def update(self, x: Tensor, *, gram: bool, abs_mean: bool) -> None:
        """Add the token vectors of ``x`` (..., in_features) to the sums."""
        rows = x.detach().reshape(-1, self.in_features).float()
        if abs_mean:
            part = rows.abs().sum(0, dtype=torch.float64)
            self.abs_sum = part if self.abs_sum is None else self.abs_sum.add_(part)
        if gram:
            # the batch's X^T X in float32 (one batch: sums of at most batch*seq_len products),
            # accumulated over batches in float64; add_ widens each float32 entry exactly (the same
            # sums as adding part.double()) without a float64 temporary of in_features^2 per batch
            part = rows.t() @ rows
            if self.gram is None:
                self.gram = part.double()
            else:
                self.gram.add_(part)
        self.count += rows.shape[0]

    def reduce(self, all_reduce: Callable[[Tensor], None]) -> None:
        """Sum these statistics with other processes' in place: ``all_reduce(t)`` must replace
        ``t`` by the element-wise sum of every process's ``t`` (``torch.distributed.all_reduce``).

        Every process must hold the same kinds of sums (all with ``gram``, or none ...). The
        sums are exact up to float64 rounding: Gram matrices, ``sum |x|`` and the token count
        are sums over tokens, so splitting the tokens over processes changes nothing else.
        """
        device = self.gram.device if self.gram is not None else self.abs_sum.device if self.abs_sum is not None else "cpu"
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        all_reduce(count)
        self.count = int(count.item())
        for name in ("abs_sum", "gram"):
            value = getattr(self, name)
            if value is not None:
                all_reduce(value)

    @property
    def abs_mean(self) -> Tensor:
        """``mean_t |x_t|`` per channel, shape (in_features,), float64."""
        if self.abs_sum is None or self.count == 0:
            raise PassError("no mean |x| was collected for this layer")
        return self.abs_sum / self.count

    @property
    def second_moment(self) -> Tensor:
        """``G / count``, shape (in_features, in_features), float64."""
        if self.gram is None or self.count == 0:
            raise PassError("no Gram matrix was collected for this layer")
        return self.gram / self.count

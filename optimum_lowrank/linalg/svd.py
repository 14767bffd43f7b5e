"""Truncated and row-weighted SVD: the factorizations every low-rank layer starts from.

Torch-only math (no ``nn.Module``, no pass). Shapes follow the weight:
``W`` is (out, in) for a linear layer, ``E`` is (V, d) for an embedding table.

- :func:`truncated_svd`: best rank-``r`` approximation in Frobenius norm
  (Eckart-Young), returned as two factors ``A`` (out, r), ``B`` (r, in).
- :func:`split_factors`: ``U_r diag(s_r) V_r`` split as
  ``(U_r diag(s_r)^{1/2}, diag(s_r)^{1/2} V_r)`` so both factors have the same scale.
- :func:`weighted_svd` / :func:`weighted_factors`: the SVD of ``D E`` with
  ``D = diag(sqrt(w))`` for row weights ``w`` (token frequencies), minimising
  ``sum_i w_i ||e_i - a_i B||^2`` over codes ``A`` and a shared basis ``B``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from optimum_lowrank.errors import PassError

__all__ = [
    "split_factors",
    "truncated_svd",
    "weighted_factors",
    "weighted_svd",
]


def split_factors(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(U_r sqrt(S_r), sqrt(S_r) V_r^T)`` from a thin SVD ``u`` (m, k), ``s`` (k,), ``vh`` (k, n); 1 <= rank <= k."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncated_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factor ``weight`` as ``A @ B`` keeping the ``rank`` largest singular values.

    The singular values are split evenly between the factors
    (``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``), so both factors have
    similar dynamic range, which keeps per-channel int8 quantization accurate.

    Parameters
    ----------
    weight : Tensor, shape (m, n)
    rank : int, 1 <= rank <= min(m, n)

    Returns
    -------
    A : Tensor, shape (m, rank)
    B : Tensor, shape (rank, n)
        ``||weight - A @ B||_F`` equals the norm of the dropped singular values
        (Eckart-Young).

    Raises
    ------
    PassError
        If ``rank`` is out of range.

    References
    ----------
    .. [1] Eckart, Young, "The approximation of one matrix by another of lower
       rank", Psychometrika, 1936.
    """
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise PassError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} weight, got {rank}")
    return split_factors(*torch.linalg.svd(weight.detach().float(), full_matrices=False), rank)


def weighted_factors(rows: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``A = E V_r^T S_r^-1/2`` (V, r) and ``B = S_r^1/2 V_r`` (r, d) from :func:`weighted_svd`.

    ``A B = E V_r^T V_r`` (every row projected on the weighted basis). With uniform
    weights of mean 1 this is :func:`~optimum_lowrank.layers.lowrank.split_factors`:
    the singular values are split between the factors, which keeps both in a
    similar range for int8.
    """
    root = s[:rank].clamp_min(torch.finfo(s.dtype).tiny).sqrt()
    return (rows.float() @ vh[:rank].t()) / root, root[:, None] * vh[:rank]


def weighted_svd(rows: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``D E`` with ``D = diag(sqrt(weights))``: the basis of the weighted low-rank fit.

    Minimising ``sum_p w_p ||e_p - a_p B||^2`` over rank-r ``A B`` is the truncated
    SVD of ``D E``; its right singular vectors ``V_r`` give ``B = V_r`` and the rows'
    least-squares codes ``A = E V_r^T`` (= ``D^-1 U_r S_r``).

    Parameters
    ----------
    rows : Tensor, shape (V, d)
    weights : Tensor, shape (V,), positive, or None (plain SVD)

    Returns
    -------
    u (V, q), s (q,), vh (q, d) with q = min(V, d), of ``D E``.
    """
    matrix = rows.float() if weights is None else rows.float() * weights.sqrt().unsqueeze(1)
    return torch.linalg.svd(matrix, full_matrices=False)

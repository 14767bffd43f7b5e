"""Tensor-train (TT / MPS) math for embedding tables: shapes, TT-ranks and a batched TT-SVD.

Torch-only math (no ``nn.Module``, no pass). A table of ``V`` rows of ``d``
values is viewed as a tensor of shape ``(v_1 .. v_n) x (d_1 .. d_n)`` (TT-matrix)
or each row as a tensor of shape ``(d_1 .. d_n)`` (per-token TT); the TT-SVD of
Oseledets (2011) gives cores ``G_k`` of shape ``(r_{k-1}, n_k, r_k)`` whose
TT-ranks ``r_k`` are capped by ``max_rank``. :func:`batched_tt_svd` runs the
sweep for many tensors at once (the per-token TT of TensorGPT, Xu et al.,
arXiv 2307.00526): about a second for a 30k-row table, where a Python loop of
``tensorly.decomposition.tensor_train`` calls takes 7-20 s (``../shared/STACK.md``).
TensorLy stays the reference the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from optimum_lowrank.errors import PassError

__all__ = [
    "balanced_factors",
    "prime_factors",
    "batched_tt_svd",
    "tt_contract",
    "tt_params",
    "tt_ranks",
    "vocab_factors",
]


def tt_contract(cores: Sequence[Tensor], shape: Sequence[int], ranks: Sequence[int]) -> Tensor:
    """Contract gathered cores, core k of shape (M, R_{k-1} n_k R_k), into (M, prod n).

    Batched ``MatMul`` only (exports to ONNX ``MatMul``, not ``Einsum``).
    """
    out = cores[0].reshape(-1, shape[0], ranks[1])  # R_0 = 1
    for k in range(1, len(shape)):
        core = cores[k].reshape(-1, ranks[k], shape[k] * ranks[k + 1])
        out = torch.matmul(out, core)  # (M, n_1..n_{k-1}, n_k R_k)
        out = out.reshape(out.shape[0], -1, ranks[k + 1])
    return out.reshape(out.shape[0], -1)


def _left_singular(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors and singular values of a batch of small matrices, float64.

    Parameters
    ----------
    matrix : Tensor, shape (B, m, n)

    Returns
    -------
    U : Tensor, shape (B, m, k), orthonormal columns, k = min(m, n)
    s : Tensor, shape (B, k), descending

    Notes
    -----
    ``torch.linalg.svd`` on batches of many small matrices is erratically slow on
    this CPU build (20-70 s for 30,522 matrices of 24 x 16 or 3 x 128, measured
    in one run and 0.5 s in the next). The eigen-decomposition of the m x m Gram matrix
    (after a batched QR when m > n) takes 0.1-0.9 s for the same batches. In float64
    the singular values of float32 data are resolved down to ~1e-8 of the largest,
    below float32 precision.
    """
    a = matrix.double()
    q = None
    if a.shape[-2] > a.shape[-1]:
        q, a = torch.linalg.qr(a)  # a = R, (B, n, n)
    evals, evecs = torch.linalg.eigh(a @ a.mT)
    u, s = evecs.flip(-1), evals.flip(-1).clamp_min(0).sqrt()
    if q is not None:
        u = q @ u
    return u, s


def batched_tt_svd(
    tensor: Tensor,
    max_rank: int | Sequence[int] | None = None,
    tolerance: float | None = None,
) -> list[Tensor]:
    """TT-SVD of every slice ``tensor[b]`` at once, with shared TT-ranks.

    Left-to-right sweep (Oseledets' Algorithm 1): at bond k the unfolding
    ``A`` of shape ``(B, R_{k-1} n_k, n_{k+1} ... n_N)`` gets its leading left
    singular vectors ``U_r`` (batched, see :func:`_left_singular`); ``U_r``
    becomes core k and ``U_r^T A = S_r V_r^T`` is carried to the next bond. The cores are
    left-orthogonal; the last core carries the norm.

    Parameters
    ----------
    tensor : Tensor, shape (B, n_1, ..., n_N), N >= 1
        B independent tensors (the rows of an embedding table reshaped, or B = 1
        for a single tensor).
    max_rank : int or N - 1 ints, optional
        Truncate every bond at this rank (capped by :func:`tt_ranks`).
    tolerance : float in (0, 1), optional
        Relative Frobenius error allowed over the whole batch,
        ``||T - T_tt||_F <= tolerance * ||T||_F`` (norms over all B slices). Each
        bond drops at most ``tolerance**2 / (N - 1)`` of the total energy (the
        Oseledets bound), so the ranks are the smallest that meet it; they are
        shared by all B slices.

    Exactly one of ``max_rank`` and ``tolerance`` is given.

    Returns
    -------
    list of N Tensors, core k of shape (B, R_{k-1}, n_k, R_k) with R_0 = R_N = 1,
    in the dtype of ``tensor``.

    Raises
    ------
    PassError
        If both or neither of ``max_rank`` and ``tolerance`` are given, or
        ``tolerance`` is outside (0, 1).
    """
    if (max_rank is None) == (tolerance is None):
        raise PassError("batched_tt_svd: give exactly one of max_rank and tolerance")
    if tolerance is not None and not 0 < tolerance < 1:
        raise PassError(f"tolerance must be in (0, 1), got {tolerance}")
    batch, shape = tensor.shape[0], tuple(tensor.shape[1:])
    n = len(shape)
    caps = tt_ranks(shape, max_rank)[1:-1] if max_rank is not None else None
    budget = None
    if tolerance is not None:
        budget = tolerance**2 / max(n - 1, 1) * float(tensor.double().square().sum())
    cores = []
    carry = tensor.reshape(batch, 1, -1)
    r_prev = 1
    for k in range(n - 1):
        unfolding = carry.reshape(batch, r_prev * shape[k], -1)
        u, s = _left_singular(unfolding)
        full = s.shape[-1]
        if caps is not None:
            rank = min(caps[k], full)
        else:
            # tail[r] = energy dropped (summed over the batch) when keeping r singular values
            energy = s.double().square().sum(0)
            tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
            rank = max(1, int(torch.nonzero(tail <= budget)[0, 0]))
        u = u[..., :rank]
        cores.append(u.reshape(batch, r_prev, shape[k], rank).to(tensor.dtype))
        carry = u.mT @ unfolding.double()  # = S_r V_r^T, exact projection onto the kept subspace
        r_prev = rank
    cores.append(carry.reshape(batch, r_prev, shape[-1], 1).to(tensor.dtype))
    return cores


def tt_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Entries of the TT cores of a tensor of ``shape`` with ``ranks``: ``sum_k R_{k-1} n_k R_k``."""
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))


def tt_ranks(shape: Sequence[int], max_rank: int | Sequence[int]) -> tuple[int, ...]:
    """TT-ranks ``(1, R_1, ..., R_{N-1}, 1)`` of a tensor of ``shape`` truncated at ``max_rank``.

    ``R_k = min(max_rank_k, n_1 ... n_k, n_{k+1} ... n_N)``: a rank above either
    unfolding's size adds parameters and no accuracy.

    Parameters
    ----------
    shape : sequence of int, each >= 1, length N
    max_rank : int >= 1, or N - 1 ints (one per internal bond)
    """
    n = len(shape)
    caps = [max_rank] * (n - 1) if isinstance(max_rank, int) else list(max_rank)
    if len(caps) != n - 1:
        raise PassError(f"need {n - 1} internal TT-ranks for a {n}-way shape {tuple(shape)}, got {len(caps)}")
    ranks = [1]
    for k in range(1, n):
        ranks.append(max(1, min(int(caps[k - 1]), math.prod(shape[:k]), math.prod(shape[k:]))))
    ranks.append(1)
    return tuple(ranks)


def vocab_factors(num_embeddings: int, num_factors: int) -> tuple[int, ...]:
    """Factors ``v_1 >= ... `` (nearly equal) whose product is the smallest found >= ``num_embeddings``.

    Starts from ``ceil(V ** (1 / N))`` for every factor and lowers each factor in
    turn while the product still covers the vocabulary. For V = 30522 and N = 3
    this gives (32, 32, 30), product 30720 (198 padding rows).

    Parameters
    ----------
    num_embeddings : int, >= 2
    num_factors : int, >= 1

    Returns
    -------
    tuple of int, descending, product >= num_embeddings.
    """
    v = [math.ceil(num_embeddings ** (1.0 / num_factors))] * num_factors
    while math.prod(v) < num_embeddings:  # float rounding of the root
        v[0] += 1
    for i in range(num_factors):
        while v[i] > 1 and math.prod(v) // v[i] * (v[i] - 1) >= num_embeddings:
            v[i] -= 1
    return tuple(sorted(v, reverse=True))


def balanced_factors(n: int, num_factors: int) -> tuple[int, ...]:
    """Split ``n`` into ``num_factors`` integer factors >= 2 as equal as possible, largest first.

    Among all factorisations, the one with the smallest sum of factors (then the
    smallest largest factor) is returned: ``balanced_factors(384, 3) == (8, 8, 6)``,
    ``balanced_factors(576, 3) == (9, 8, 8)``. The sum is what the TT parameter
    count grows with at a fixed rank.

    Parameters
    ----------
    n : int, >= 2
    num_factors : int, 1 <= num_factors <= number of prime factors of n (with multiplicity)

    Returns
    -------
    tuple of int, product ``n``, sorted in descending order.

    Raises
    ------
    PassError
        If ``n`` has fewer than ``num_factors`` prime factors.
    """
    primes = prime_factors(n) if n > 1 else []
    if num_factors < 1 or len(primes) < num_factors:
        raise PassError(
            f"cannot split {n} into {num_factors} factors >= 2 ({n} has {len(primes)} prime factor(s): {primes}); "
            f"use 1..{len(primes)} cores or give the reshape explicitly"
        )
    best: tuple[int, ...] | None = None

    def search(rest: int, parts: int, largest: int, prefix: tuple[int, ...]) -> None:
        nonlocal best
        if parts == 1:
            if 2 <= rest <= largest:
                cand = prefix + (rest,)
                if best is None or (sum(cand), cand[0]) < (sum(best), best[0]):
                    best = cand
            return
        for f in range(min(largest, rest), 1, -1):
            if rest % f == 0 and f**parts >= rest:  # non-increasing: f is the largest remaining factor
                search(rest // f, parts - 1, f, prefix + (f,))

    search(n, num_factors, n, ())
    assert best is not None
    return best


def prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors

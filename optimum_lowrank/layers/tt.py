"""Tensor-train token embeddings: per-token MPS (TensorGPT) and TT-matrix (Hrinchuk et al.).

Both layers are plain ``nn.Module``\\ s whose lookup is ``Gather`` of 2-D core
tables followed by batched ``MatMul`` contractions (no ``Einsum``), so they
export to ONNX with Optimum's TorchScript exporter and ONNX Runtime's dynamic
int8 quantization turns the core ``Gather``\\ s into int8 tables.

The decomposition itself is :func:`batched_tt_svd`, a TT-SVD (Oseledets 2011)
vectorised over a leading batch axis (batched Gram eigen-decompositions in
float64): it decomposes every row of a 30k-row table in about a second, where a Python loop of
``tensorly.decomposition.tensor_train`` calls takes 7-20 s. TensorLy is the
reference the tests compare against (``tensor_train``, ``tensor_train_matrix``).

References
----------
.. [1] Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
.. [2] Xu et al., "TensorGPT: Efficient Compression of the Embedding Layer in
   LLMs based on the Tensor-Train Decomposition", arXiv 2307.00526.
.. [3] Hrinchuk, Khrulkov, Mirvakhabova, Orlova, Oseledets, "Tensorized
   Embedding Layers", arXiv 1901.10787 (Findings of EMNLP 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers.embeddings import runtime_zero
from optimum_lowrank.layers.lowrank import FactorizedEmbedding

__all__ = [
    "TTEmbedding",
    "TTMatrixEmbedding",
    "balanced_factors",
    "batched_tt_svd",
    "tt_params",
    "tt_ranks",
    "vocab_factors",
]


# --------------------------------------------------------------------------- shapes and ranks


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


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
    primes = _prime_factors(n) if n > 1 else []
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
            if rest % f == 0 and f ** parts >= rest:  # non-increasing: f is the largest remaining factor
                search(rest // f, parts - 1, f, prefix + (f,))

    search(n, num_factors, n, ())
    assert best is not None
    return best


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


def tt_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Entries of the TT cores of a tensor of ``shape`` with ``ranks``: ``sum_k R_{k-1} n_k R_k``."""
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))


# --------------------------------------------------------------------------- TT-SVD


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


def _contract(cores: Sequence[Tensor], shape: Sequence[int], ranks: Sequence[int]) -> Tensor:
    """Contract gathered cores, core k of shape (M, R_{k-1} n_k R_k), into (M, prod n).

    Batched ``MatMul`` only (exports to ONNX ``MatMul``, not ``Einsum``).
    """
    out = cores[0].reshape(-1, shape[0], ranks[1])  # R_0 = 1
    for k in range(1, len(shape)):
        core = cores[k].reshape(-1, ranks[k], shape[k] * ranks[k + 1])
        out = torch.matmul(out, core)  # (M, n_1..n_{k-1}, n_k R_k)
        out = out.reshape(out.shape[0], -1, ranks[k + 1])
    return out.reshape(out.shape[0], -1)


def _check_table(weight: Tensor, what: str) -> None:
    if weight.dim() != 2:
        raise PassError(f"{what}: expected a 2-D table (num_embeddings, embedding_dim), got shape {tuple(weight.shape)}")
    if weight.shape[0] < 2:
        raise PassError(f"{what}: a vocabulary of {weight.shape[0]} token(s) cannot be compressed")
    if not torch.isfinite(weight).all():
        raise PassError(f"{what}: weight contains NaN or inf; cannot decompose")


# --------------------------------------------------------------------------- per-token MPS


class TTEmbedding(FactorizedEmbedding):
    """Per-token tensor-train (MPS) embedding (TensorGPT).

    Row ``p`` of the table, reshaped to ``n_1 x ... x n_N`` (``prod n_k = d``),
    is ``G_1[p] G_2[p] ... G_N[p]`` with per-token cores
    ``G_k[p]`` of shape (R_{k-1}, n_k, R_k). Core k is stored as the 2-D
    parameter ``cores[k]`` of shape (V, R_{k-1} n_k R_k), so a lookup is one
    ``Gather`` per core followed by N - 1 batched ``MatMul``\\ s.

    Parameters
    ----------
    num_embeddings : int
        Vocabulary size V.
    embedding_dim : int
        Hidden size d = prod(shape).
    shape : sequence of int
        The reshape ``(n_1, ..., n_N)`` of a row.
    ranks : sequence of int
        TT-ranks ``(1, R_1, ..., R_{N-1}, 1)``.
    padding_idx : int or None
        Recorded for API compatibility; its row is approximated like the others.

    Shapes
    ------
    input: integer ids (...,) in [0, V) -> output (..., d). Holds
    ``V * sum_k R_{k-1} n_k R_k`` parameters instead of ``V * d``.

    References
    ----------
    .. [1] Xu et al., "TensorGPT", arXiv 2307.00526.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        shape: Sequence[int],
        ranks: Sequence[int],
        padding_idx: int | None = None,
    ):
        super().__init__()
        shape, ranks = tuple(int(n) for n in shape), tuple(int(r) for r in ranks)
        if math.prod(shape) != embedding_dim:
            raise PassError(f"reshape {shape} has product {math.prod(shape)}, not embedding_dim {embedding_dim}")
        if len(ranks) != len(shape) + 1 or ranks[0] != 1 or ranks[-1] != 1:
            raise PassError(f"TT-ranks must be (1, R_1, ..., R_{{N-1}}, 1) for {len(shape)} cores, got {ranks}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.shape, self.ranks, self.padding_idx = shape, ranks, padding_idx
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(num_embeddings, ranks[k] * n * ranks[k + 1])) for k, n in enumerate(shape)
        )

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        shape: Sequence[int],
        max_rank: int | Sequence[int] | None = None,
        tolerance: float | None = None,
        padding_idx: int | None = None,
    ) -> TTEmbedding:
        """TT-SVD of every row of ``weight`` (V, d) at once; see :func:`batched_tt_svd`.

        Raises
        ------
        PassError
            If ``prod(shape) != d``, V < 2, the table has NaN/inf, or the rank options are invalid.
        """
        _check_table(weight, "TTEmbedding")
        vocab, dim = weight.shape
        shape = tuple(shape)
        if math.prod(shape) != dim:
            raise PassError(f"reshape {shape} has product {math.prod(shape)}, not embedding_dim {dim}")
        cores = batched_tt_svd(weight.detach().float().reshape(vocab, *shape), max_rank, tolerance)
        ranks = (1,) + tuple(c.shape[-1] for c in cores)
        layer = cls(vocab, dim, shape, ranks, padding_idx)
        layer.load_cores(cores)
        return layer

    def load_cores(self, cores: Sequence[Tensor]) -> TTEmbedding:
        """Copy cores of shape (V, R_{k-1}, n_k, R_k) into the 2-D parameters; returns self."""
        with torch.no_grad():
            for param, core in zip(self.cores, cores):
                param.copy_(core.reshape(param.shape))
        return self

    def core(self, k: int) -> Tensor:
        """Core k as a view of shape (V, R_{k-1}, n_k, R_k)."""
        return self.cores[k].view(self.num_embeddings, self.ranks[k], self.shape[k], self.ranks[k + 1])

    def forward(self, input_ids: Tensor) -> Tensor:
        flat = input_ids.reshape(-1)
        gathered = [nn.functional.embedding(flat, core) for core in self.cores]
        return _contract(gathered, self.shape, self.ranks).reshape(*input_ids.shape, self.embedding_dim)

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` (M,) of the table, shape (M, d); differentiable (training)."""
        return _contract([core[index] for core in self.cores], self.shape, self.ranks)

    @property
    def weight(self) -> Tensor:
        """The reconstructed table, shape (V, d), contracted from the full core tables (no gather)."""
        return _contract(list(self.cores), self.shape, self.ranks)

    def materialize(self, like: Tensor) -> Tensor:
        """:attr:`weight` computed at run time, for a head; see :func:`~optimum_lowrank.layers.embeddings.runtime_zero`."""
        zero = runtime_zero(like, self.cores[0].dtype)
        return _contract([core + zero for core in self.cores], self.shape, self.ranks)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, shape={self.shape}, ranks={self.ranks}"


# --------------------------------------------------------------------------- TT-matrix


class TTMatrixEmbedding(FactorizedEmbedding):
    """TT-matrix embedding: the (padded) table ``W (prod v) x (prod d)`` as a tensor train.

    With token id ``p = (i_1, ..., i_N)`` in mixed radix ``v_1 x ... x v_N``
    (``i_k = (p // (v_{k+1} ... v_N)) % v_k``), row p reshaped to ``d_1 x ... x d_N``
    is ``G_1[i_1] G_2[i_2] ... G_N[i_N]`` with ``G_k[i]`` of shape
    (R_{k-1}, d_k, R_k). Core k is the 2-D parameter ``cores[k]`` of shape
    (v_k, R_{k-1} d_k R_k), shared by all tokens with the same k-th digit. A lookup
    is integer ``//`` and ``%`` on the ids, one ``Gather`` per core and N - 1
    batched ``MatMul``\\ s. Rows ``V .. prod(v) - 1`` are padding, never looked up.

    Parameters
    ----------
    num_embeddings : int
        Vocabulary size V <= prod(vocab_shape).
    embedding_dim : int
        d = prod(dim_shape).
    vocab_shape, dim_shape : sequences of N ints
    ranks : sequence of int
        ``(1, R_1, ..., R_{N-1}, 1)``.
    padding_idx : int or None
        Recorded for API compatibility.

    Shapes
    ------
    input: integer ids (...,) in [0, V) -> output (..., d). Holds
    ``sum_k v_k R_{k-1} d_k R_k`` parameters.

    References
    ----------
    .. [1] Hrinchuk et al., "Tensorized Embedding Layers", arXiv 1901.10787.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        vocab_shape: Sequence[int],
        dim_shape: Sequence[int],
        ranks: Sequence[int],
        padding_idx: int | None = None,
    ):
        super().__init__()
        vocab_shape, dim_shape = tuple(int(v) for v in vocab_shape), tuple(int(n) for n in dim_shape)
        ranks = tuple(int(r) for r in ranks)
        if len(vocab_shape) != len(dim_shape):
            raise PassError(f"vocab_shape {vocab_shape} and reshape {dim_shape} need the same number of factors")
        if math.prod(dim_shape) != embedding_dim:
            raise PassError(f"reshape {dim_shape} has product {math.prod(dim_shape)}, not embedding_dim {embedding_dim}")
        if math.prod(vocab_shape) < num_embeddings:
            raise PassError(f"vocab_shape {vocab_shape} covers {math.prod(vocab_shape)} ids, fewer than num_embeddings {num_embeddings}")
        if len(ranks) != len(dim_shape) + 1 or ranks[0] != 1 or ranks[-1] != 1:
            raise PassError(f"TT-ranks must be (1, R_1, ..., R_{{N-1}}, 1) for {len(dim_shape)} cores, got {ranks}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.vocab_shape, self.shape, self.ranks = vocab_shape, dim_shape, ranks
        self.strides = tuple(math.prod(vocab_shape[k + 1 :]) for k in range(len(vocab_shape)))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(v, ranks[k] * n * ranks[k + 1])) for k, (v, n) in enumerate(zip(vocab_shape, dim_shape))
        )

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        vocab_shape: Sequence[int],
        dim_shape: Sequence[int],
        max_rank: int | Sequence[int] | None = None,
        tolerance: float | None = None,
        padding_idx: int | None = None,
    ) -> TTMatrixEmbedding:
        """TT-matrix SVD of ``weight`` (V, d), zero-padded to ``prod(vocab_shape)`` rows.

        The padded table is reshaped to ``(v_1, ..., v_N, d_1, ..., d_N)``, permuted
        to ``(v_1, d_1, ..., v_N, d_N)`` and merged to ``(v_1 d_1, ..., v_N d_N)``
        before :func:`batched_tt_svd` (B = 1); the result equals TensorLy's
        ``tensor_train_matrix`` up to the sign of singular vectors. ``tolerance``
        bounds the error relative to the (padded) table's norm.
        """
        _check_table(weight, "TTMatrixEmbedding")
        vocab, dim = weight.shape
        layer_shape = tuple(vocab_shape), tuple(dim_shape)
        probe = cls(vocab, dim, *layer_shape, (1,) + (1,) * len(dim_shape), padding_idx)  # validates shapes
        n = len(dim_shape)
        padded = weight.detach().float().new_zeros(math.prod(vocab_shape), dim)
        padded[:vocab] = weight.detach().float()
        t = padded.reshape(*vocab_shape, *dim_shape)
        t = t.permute(*[i for k in range(n) for i in (k, n + k)])
        t = t.reshape(1, *[v * d for v, d in zip(vocab_shape, dim_shape)])
        cores = batched_tt_svd(t, max_rank, tolerance)
        ranks = (1,) + tuple(c.shape[-1] for c in cores)
        layer = cls(vocab, dim, *layer_shape, ranks, probe.padding_idx)
        layer.load_cores([c[0].reshape(c.shape[1], v, d, c.shape[-1]) for c, v, d in zip(cores, vocab_shape, dim_shape)])
        return layer

    def load_cores(self, cores: Sequence[Tensor]) -> TTMatrixEmbedding:
        """Copy cores of shape (R_{k-1}, v_k, d_k, R_k) (TensorLy's layout); returns self."""
        with torch.no_grad():
            for param, core in zip(self.cores, cores):
                param.copy_(core.permute(1, 0, 2, 3).reshape(param.shape))
        return self

    def core(self, k: int) -> Tensor:
        """Core k in TensorLy's layout, shape (R_{k-1}, v_k, d_k, R_k)."""
        v, r0, d, r1 = self.vocab_shape[k], self.ranks[k], self.shape[k], self.ranks[k + 1]
        return self.cores[k].view(v, r0, d, r1).permute(1, 0, 2, 3)

    def _digits(self, ids: Tensor) -> list[Tensor]:
        digits = []
        for k, (v, stride) in enumerate(zip(self.vocab_shape, self.strides)):
            digit = ids // stride if stride > 1 else ids
            digits.append(digit % v if k > 0 else digit)
        return digits

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` (M,) of the table, shape (M, d); differentiable (training)."""
        gathered = [nn.functional.embedding(digit, core) for digit, core in zip(self._digits(index), self.cores)]
        return _contract(gathered, self.shape, self.ranks)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.rows(input_ids.reshape(-1)).reshape(*input_ids.shape, self.embedding_dim)

    def full_table(self, offset: Tensor | None = None) -> Tensor:
        """The padded table, shape (prod v, d), by a Kronecker-ordered contraction (no gather).

        ``offset`` (a zero from :func:`~optimum_lowrank.layers.embeddings.runtime_zero`) is added to every core first.
        """
        cores = list(self.cores) if offset is None else [core + offset for core in self.cores]
        v0, d0, r1 = self.vocab_shape[0], self.shape[0], self.ranks[1]
        out = cores[0].reshape(v0, d0, r1)  # (A, B, R) with A = rows so far, B = columns so far
        for k in range(1, len(self.shape)):
            v, r0, d, r1 = self.vocab_shape[k], self.ranks[k], self.shape[k], self.ranks[k + 1]
            core = cores[k].reshape(v, r0, d * r1).transpose(0, 1).reshape(r0, v * d * r1)
            a, b = out.shape[0], out.shape[1]
            out = torch.matmul(out.reshape(a * b, r0), core).reshape(a, b, v, d, r1)
            out = out.permute(0, 2, 1, 3, 4).reshape(a * v, b * d, r1)
        return out.reshape(out.shape[0], -1)

    @property
    def weight(self) -> Tensor:
        """The reconstructed table, shape (V, d) (padding rows dropped)."""
        return self.full_table()[: self.num_embeddings]

    def materialize(self, like: Tensor) -> Tensor:
        """:attr:`weight` computed at run time, for a head; see :func:`~optimum_lowrank.layers.embeddings.runtime_zero`."""
        return self.full_table(runtime_zero(like, self.cores[0].dtype))[: self.num_embeddings]

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"vocab_shape={self.vocab_shape}, shape={self.shape}, ranks={self.ranks}"
        )

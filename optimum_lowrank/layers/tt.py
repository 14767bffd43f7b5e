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
from optimum_lowrank.layers.base import FactorizedEmbedding, runtime_zero
from optimum_lowrank.linalg.tt import batched_tt_svd, tt_contract

__all__ = [
    "TTEmbedding",
    "TTMatrixEmbedding",
    "batched_tt_svd",
]


# --------------------------------------------------------------------------- shapes and ranks












# --------------------------------------------------------------------------- TT-SVD








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
        return tt_contract(gathered, self.shape, self.ranks).reshape(*input_ids.shape, self.embedding_dim)

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` (M,) of the table, shape (M, d); differentiable (training)."""
        return tt_contract([core[index] for core in self.cores], self.shape, self.ranks)

    @property
    def weight(self) -> Tensor:
        """The reconstructed table, shape (V, d), contracted from the full core tables (no gather)."""
        return tt_contract(list(self.cores), self.shape, self.ranks)

    def materialize(self, like: Tensor) -> Tensor:
        """:attr:`weight` computed at run time, for a head; see :func:`~optimum_lowrank.layers.autoencoder.runtime_zero`."""
        zero = runtime_zero(like, self.cores[0].dtype)
        return tt_contract([core + zero for core in self.cores], self.shape, self.ranks)

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {
            "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "shape": list(self.shape),
            "ranks": list(self.ranks), "padding_idx": self.padding_idx,
        }

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
        return tt_contract(gathered, self.shape, self.ranks)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.rows(input_ids.reshape(-1)).reshape(*input_ids.shape, self.embedding_dim)

    def full_table(self, offset: Tensor | None = None) -> Tensor:
        """The padded table, shape (prod v, d), by a Kronecker-ordered contraction (no gather).

        ``offset`` (a zero from :func:`~optimum_lowrank.layers.autoencoder.runtime_zero`) is added to every core first.
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
        """:attr:`weight` computed at run time, for a head; see :func:`~optimum_lowrank.layers.autoencoder.runtime_zero`."""
        return self.full_table(runtime_zero(like, self.cores[0].dtype))[: self.num_embeddings]

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {
            "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "vocab_shape": list(self.vocab_shape),
            "dim_shape": list(self.shape), "ranks": list(self.ranks), "padding_idx": self.padding_idx,
        }

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"vocab_shape={self.vocab_shape}, shape={self.shape}, ranks={self.ranks}"
        )

"""Low-rank replacements for ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding``.

Each layer is a plain ``nn.Module`` built from two dense factors, so that it
exports to ONNX as ``MatMul``/``Gemm`` and ``Gather`` nodes that ONNX Runtime
quantizes to int8 (no ``Einsum``). Every layer offers ``to_dense()`` to rebuild
the layer it replaced, which the tests use to check exact identities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers.base import FactorizedEmbedding, runtime_zero
from optimum_lowrank.linalg.svd import truncated_svd

__all__ = [
    "FactorizedEmbedding",
    "LowRankEmbedding",
    "LowRankHead",
    "LowRankLinear",
    "linear_weight",
    "truncated_svd",
]


def linear_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Return ``(weight, bias)`` of a linear map in ``nn.Linear`` layout.

    Parameters
    ----------
    module : nn.Linear or transformers.pytorch_utils.Conv1D
        GPT-2's ``Conv1D`` stores its weight transposed, shape (in_features, out_features).

    Returns
    -------
    weight : Tensor, shape (out_features, in_features)
    bias : Tensor of shape (out_features,), or None

    Raises
    ------
    PassError
        If ``module`` is neither ``nn.Linear`` nor ``Conv1D``.
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t(), module.bias
    raise PassError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")








class LowRankLinear(nn.Module):
    """``y = x B^T A^T + bias``: a linear layer stored as two thin factors.

    Parameters
    ----------
    in_features, out_features : int
    rank : int, 1 <= rank <= min(in_features, out_features)
    bias : bool

    Shapes
    ------
    input (..., in_features) -> output (..., out_features). Holds
    ``rank * (in_features + out_features)`` weights, fewer than the dense
    ``in_features * out_features`` only when
    ``rank < in_features * out_features / (in_features + out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int) -> LowRankLinear:
        """Truncated SVD of an ``nn.Linear`` or ``Conv1D`` at ``rank``; see :func:`truncated_svd`."""
        weight, bias = linear_weight(module)
        a, b = truncated_svd(weight, rank)
        layer = cls(weight.shape[1], weight.shape[0], rank, bias=bias is not None)
        return layer.load_factors(a, b, bias)

    def load_factors(self, a: Tensor, b: Tensor, bias: Tensor | None = None) -> LowRankLinear:
        """Set ``A`` (out_features, rank), ``B`` (rank, in_features) and the bias; returns self."""
        with torch.no_grad():
            self.up.weight.copy_(a)
            self.down.weight.copy_(b)
            if bias is not None:
                self.up.bias.copy_(bias)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def to_dense(self) -> nn.Linear:
        """The ``nn.Linear`` this layer computes, shape (out_features, in_features)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(self.up.weight @ self.down.weight)
            if self.up.bias is not None:
                dense.bias.copy_(self.up.bias)
        return dense

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank, "bias": self.up.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankEmbedding(FactorizedEmbedding):
    """Token embedding ``E ~= A P^T`` stored as ``nn.Embedding(V, r)`` then ``nn.Linear(r, d)``.

    Parameters
    ----------
    num_embeddings : int
        Vocabulary size V.
    embedding_dim : int
        Hidden size d.
    rank : int, 1 <= rank <= min(V, d)
    padding_idx : int or None
        Kept on the inner ``nn.Embedding`` for API compatibility.

    Shapes
    ------
    input: integer ids (...,) in [0, V) -> output (..., d).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.codes = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.proj = nn.Linear(rank, embedding_dim, bias=False)

    @classmethod
    def from_embedding(cls, module: nn.Embedding, rank: int) -> LowRankEmbedding:
        """Truncated SVD of the table ``module.weight`` (V, d) at ``rank``."""
        a, b = truncated_svd(module.weight, rank)
        layer = cls(module.num_embeddings, module.embedding_dim, rank, padding_idx=module.padding_idx)
        with torch.no_grad():
            layer.codes.weight.copy_(a)
            layer.proj.weight.copy_(b.t())
        return layer

    @property
    def weight(self) -> Tensor:
        """The reconstructed table, shape (V, d). Computed on access; not a parameter."""
        return self.codes.weight @ self.proj.weight.t()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.proj(self.codes(input_ids))

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {
            "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "rank": self.rank, "padding_idx": self.padding_idx,
        }

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}"


class LowRankHead(nn.Module):
    """Output head tied to a :class:`LowRankEmbedding`: ``logits = (h P) A^T``.

    Shares the embedding's parameters (no copy), so tying the head costs no
    memory, and the exported ONNX graph stores each factor once.

    The exporter constant-folds every expression of parameters alone, so a head
    that multiplied by ``A^T`` and by ``P`` while the embedding gathers from ``A``
    and multiplies by ``P^T`` would store a transposed copy of both factors
    (+5.6 MB fp32 on SmolLM2 at rank 28). Instead the head adds a run-time zero
    (:func:`~optimum_lowrank.layers.autoencoder.runtime_zero`) to ``A`` and to
    ``P^T`` and transposes at run time: ``A`` stays the embedding's ``Gather``
    table, and ``P^T`` is the constant the embedding's ``Linear`` folds to (the
    exporter deduplicates equal constants). ORT's dynamic int8 then stores ``A``
    once, in int8 (``Gather``), and dequantizes it for the head, whose two
    MatMuls (both inputs computed at run time) stay fp32; ``P^T`` (d x r) is kept
    in int8 for the embedding and in fp32 for the head.

    Parameters
    ----------
    embedding : LowRankEmbedding
        Holds ``A`` (V, r) and ``P`` (d, r).
    bias : Tensor of shape (V,), or None

    Shapes
    ------
    input (..., d) -> logits (..., V).
    """

    def __init__(self, embedding: LowRankEmbedding, bias: Tensor | None = None):
        super().__init__()
        self.embedding = embedding
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"embedding": self.embedding, "bias": self.bias}

    def forward(self, hidden: Tensor) -> Tensor:
        # deferred: layers.embeddings imports this module

        proj_t = self.embedding.proj.weight.t()  # (r, d): the embedding Linear's folded constant
        codes = torch.matmul(hidden, (proj_t + runtime_zero(hidden, proj_t.dtype)).t())  # h P, (..., r)
        table = self.embedding.codes.weight  # (V, r): the embedding's Gather table
        return F.linear(codes, table + runtime_zero(hidden, table.dtype), self.bias)

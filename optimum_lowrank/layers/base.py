"""What every factorized embedding layer shares.

- :class:`FactorizedEmbedding`: the base class of compressed token-embedding
  tables (``forward(input_ids) -> (..., d)``), with ``rows(ids)`` and ``table()``.
- :func:`runtime_zero`: a zero that ONNX export keeps as a runtime value, so
  constant folding does not bake a compressed table back into a dense one.
- :class:`MaterializedHead`: a tied output head that computes ``h E^T`` from a
  compressed embedding's reconstructed table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FactorizedEmbedding",
    "MaterializedHead",
    "runtime_zero",
]


class FactorizedEmbedding(nn.Module):
    """Base of the compressed token embeddings: subclasses set ``num_embeddings`` (V),
    ``embedding_dim`` (d), ``padding_idx`` and define ``weight``, the reconstructed
    (V, d) table, which :meth:`to_dense` turns back into an ``nn.Embedding``."""

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None

    @property
    def weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dense(self) -> nn.Embedding:
        """The ``nn.Embedding`` this layer computes, shape (V, d)."""
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            dense.weight.copy_(self.weight)
        return dense


class MaterializedHead(nn.Module):
    """Output head tied to a compressed embedding: rebuilds the table each call, ``logits = h @ table^T``.

    For embeddings without a cheap factored head (tensor-train, TT-matrix,
    Fourier). The table ``embedding.weight`` (V, d) is computed from the compressed
    parameters in every forward, so nothing is stored twice; the price is the
    reconstruction time per call (also in the ONNX graph).

    Parameters
    ----------
    embedding : nn.Module
        Has ``weight`` (property, shape (V, d)), ``embedding_dim`` and ``num_embeddings``;
        when it has ``materialize(hidden)``, that is used instead of ``weight`` (to keep
        the ONNX exporter from constant-folding the table, see :func:`runtime_zero`).
    bias : Tensor of shape (V,), or None

    Shapes
    ------
    input (..., d) -> logits (..., V).
    """

    def __init__(self, embedding: nn.Module, bias: Tensor | None = None):
        super().__init__()
        self.embedding = embedding
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"embedding": self.embedding, "bias": self.bias}

    def forward(self, hidden: Tensor) -> Tensor:
        materialize = getattr(self.embedding, "materialize", None)
        table = materialize(hidden) if callable(materialize) else self.embedding.weight
        return F.linear(hidden, table, self.bias)


def runtime_zero(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero of shape (1,) computed from ``like`` (a tensor of the forward pass).

    The ONNX exporter constant-folds every expression of parameters alone: a
    transposed or reshaped copy of a table that a tied head reuses, or a whole
    rebuilt (V, d) table, would become a new initializer and store the compressed
    parameters twice (measured: Fourier head on SmolLM2 +226 MB in the int8 graph;
    per-token TT head: every core twice). Adding this zero to the parameters
    first makes those expressions run-time values, so the graph keeps one copy.

    Parameters
    ----------
    like : Tensor
        Any tensor of the forward pass (e.g. the hidden states); only its shape is used.
    dtype : torch.dtype

    Returns
    -------
    Tensor of shape (1,), all zeros.
    """
    return torch.zeros_like(like.reshape(-1)[:1], dtype=dtype)

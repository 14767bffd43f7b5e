"""Hybrid token embedding: the most frequent tokens' rows kept exact, the rest compressed.

Most of a 30k-50k vocabulary is rare: on WikiText-2 the 2,000 most frequent of
MiniLM's 30,522 WordPiece tokens cover most of the running text. A
:class:`HybridEmbedding` stores those ``k`` rows as a small dense table and the
other ``V - k`` rows in any compressed embedding (low-rank, autoencoder,
tensor-train, Fourier). One int32 index ``slot`` (V,) maps a token id to its
place: ``slot[p] < k`` is a row of the exact table, ``slot[p] >= k`` is row
``slot[p] - k`` of the compressed one. The lookup computes both and selects, so
the ONNX graph is Gather / Gather / Where (plus the compressed layer's own nodes),
which ORT quantizes like any table. :class:`HybridHead` is the tied output head:
logits of both parts, concatenated and put back into token order by one Gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers.base import FactorizedEmbedding, runtime_zero

__all__ = ["HybridEmbedding", "HybridHead", "frequency_slots"]


def frequency_slots(counts: Tensor, keep_top_k: int) -> tuple[Tensor, Tensor]:
    """Split the vocabulary by frequency: the ``keep_top_k`` most frequent ids and the rest.

    Ties (e.g. the many tokens never seen) keep id order, so the split is deterministic.

    Parameters
    ----------
    counts : Tensor, shape (V,)
        Occurrences of every token id in the calibration text (>= 0).
    keep_top_k : int, 0 <= keep_top_k < V

    Returns
    -------
    kept : LongTensor, shape (keep_top_k,)
        Ids of the exact rows, most frequent first.
    rest : LongTensor, shape (V - keep_top_k,)
        The other ids, most frequent first.

    Raises
    ------
    PassError
        If ``keep_top_k`` is outside [0, V - 1].
    """
    vocab = counts.shape[0]
    if not 0 <= keep_top_k < vocab:
        raise PassError(f"keep_top_k must be in [0, {vocab - 1}] for a vocabulary of {vocab} tokens, got {keep_top_k}")
    order = torch.sort(counts.double(), descending=True, stable=True).indices
    return order[:keep_top_k], order[keep_top_k:]


class HybridEmbedding(FactorizedEmbedding):
    """Exact rows for ``k`` frequent tokens, a compressed embedding for the other ``V - k``.

    Parameters
    ----------
    exact : Tensor, shape (k, d), k >= 1
        The kept rows, in slot order.
    rest : nn.Module
        A compressed embedding over ``V - k`` rows (``num_embeddings == V - k``,
        ``embedding_dim == d``), indexed in slot order minus ``k``.
    slot : LongTensor, shape (V,)
        A permutation of ``0..V-1``: token id -> slot.
    padding_idx : int or None
        Recorded for API compatibility (the padding row is a row like the others).

    Shapes
    ------
    input: integer ids (...,) in [0, V) -> output (..., d). Holds ``k d`` plus the
    compressed layer's parameters, and an int32 buffer of V ids (4 bytes each, the
    size of ``V`` float32 parameters; counted in the pass's compression ratio).

    Raises
    ------
    PassError
        If the shapes disagree or ``slot`` is not a permutation of ``0..V-1``.
    """

    def __init__(self, exact: Tensor, rest: nn.Module, slot: Tensor, padding_idx: int | None = None):
        super().__init__()
        keep, dim = exact.shape
        vocab = slot.shape[0]
        if keep < 1 or rest.num_embeddings != vocab - keep or rest.embedding_dim != dim:
            raise PassError(
                f"hybrid embedding: {keep} exact rows + a compressed layer of {rest.num_embeddings}x{rest.embedding_dim} "
                f"do not make a {vocab}x{dim} table"
            )
        if not torch.equal(torch.sort(slot.long()).values, torch.arange(vocab)):
            raise PassError("hybrid embedding: slot must be a permutation of the token ids 0..V-1")
        self.num_embeddings, self.embedding_dim, self.keep_top_k = vocab, dim, keep
        self.padding_idx = padding_idx
        self.exact = nn.Parameter(exact.detach().clone())
        self.rest = rest
        self.register_buffer("slot", slot.to(torch.int32))

    @classmethod
    def from_ids(cls, exact: Tensor, kept: Tensor, rest_ids: Tensor, rest: nn.Module, padding_idx: int | None = None) -> HybridEmbedding:
        """``exact`` rows of ids ``kept`` (k,), ``rest`` layer rows of ids ``rest_ids`` (V - k,), in that order."""
        order = torch.cat([kept, rest_ids])
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.numel())
        return cls(exact, rest, slot, padding_idx)

    def _split(self, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        slot = F.embedding(input_ids, self.slot.unsqueeze(1)).squeeze(-1).long()
        is_exact = slot < self.keep_top_k
        return is_exact, slot.clamp(max=self.keep_top_k - 1), (slot - self.keep_top_k).clamp(min=0)

    def forward(self, input_ids: Tensor) -> Tensor:
        is_exact, exact_index, rest_index = self._split(input_ids)
        exact = F.embedding(exact_index, self.exact)
        return torch.where(is_exact.unsqueeze(-1), exact, self.rest(rest_index))

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` (M,) of the table, shape (M, d); differentiable."""
        return self(index)

    @property
    def weight(self) -> Tensor:
        """The table (V, d) in token order, rebuilt from both parts. Not a parameter."""
        return torch.cat([self.exact, self.rest.weight])[self.slot.long()]

    def materialize(self, like: Tensor) -> Tensor:
        """:attr:`weight` computed at run time (see :func:`~optimum_lowrank.layers.autoencoder.runtime_zero`)."""
        inner = getattr(self.rest, "materialize", None)
        rest = inner(like) if callable(inner) else self.rest.weight
        exact = self.exact + runtime_zero(like, self.exact.dtype)
        return torch.cat([exact, rest])[self.slot.long()]

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"exact": self.exact, "rest": self.rest, "slot": self.slot, "padding_idx": self.padding_idx}

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, keep_top_k={self.keep_top_k}"


class HybridHead(nn.Module):
    """Output head tied to a :class:`HybridEmbedding`.

    ``logits = cat(h E_exact^T, rest_head(h))[..., slot] (+ bias)``: the exact rows'
    logits by one MatMul, the compressed rows' logits by the head the compressed
    layer's pass uses (e.g. ``(h P) A^T`` for a low-rank table), then one Gather
    along the vocabulary axis puts them back in token order. Shares every parameter
    with the embedding.

    Parameters
    ----------
    embedding : HybridEmbedding
    rest_head : nn.Module
        Head over the ``V - k`` compressed rows (input (..., d) -> (..., V - k)), without bias.
    bias : Tensor of shape (V,), or None
        The original head's bias, in token order.

    Shapes
    ------
    input (..., d) -> logits (..., V).
    """

    def __init__(self, embedding: HybridEmbedding, rest_head: nn.Module, bias: Tensor | None = None):
        super().__init__()
        self.embedding, self.rest_head = embedding, rest_head
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"embedding": self.embedding, "rest_head": self.rest_head, "bias": self.bias}

    def forward(self, hidden: Tensor) -> Tensor:
        exact = self.embedding.exact + runtime_zero(hidden, self.embedding.exact.dtype)  # one copy in ONNX
        logits = torch.cat([torch.matmul(hidden, exact.t()), self.rest_head(hidden)], dim=-1)
        logits = torch.index_select(logits, -1, self.embedding.slot.long())
        return logits if self.bias is None else logits + self.bias

"""Compressed token embeddings with a bias term, and output heads tied to compressed embeddings.

- :class:`AutoencoderEmbedding`: ``E ~= A P^T + 1 b^T``, the deployed form of a
  linear autoencoder (latents ``A = encoder(E)`` stored as ``nn.Embedding(V, k)``,
  the decoder ``Linear(k, d)`` with bias; the encoder is dropped).
- :class:`AffineFactorHead`: logits of a head tied to an
  :class:`AutoencoderEmbedding`, ``logits = (h P) A^T + (h . b)``, computed from the
  factors (no (V, d) table is stored or built).
- :class:`MaterializedHead`: logits of a head tied to any compressed embedding that
  has a ``weight`` property (tensor-train, TT-matrix, Fourier): the table is
  rebuilt from the compressed parameters in every forward and
  ``logits = h @ table^T``. Saves the parameters, costs time per call.

All are plain ``nn.Module``\\ s exporting to ONNX as ``Gather``/``MatMul``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers.base import FactorizedEmbedding, runtime_zero

__all__ = ["AffineFactorHead", "AutoencoderEmbedding", "runtime_zero"]




class AutoencoderEmbedding(FactorizedEmbedding):
    """Token embedding ``E ~= A P^T + 1 b^T``: ``nn.Embedding(V, k)`` latents, then ``Linear(k, d)`` with bias.

    Parameters
    ----------
    num_embeddings : int
        Vocabulary size V.
    embedding_dim : int
        Hidden size d.
    latent_dim : int, 1 <= latent_dim < embedding_dim
        Latent size k.
    padding_idx : int or None
        Kept on the latent ``nn.Embedding`` for API compatibility.

    Shapes
    ------
    input: integer ids (...,) in [0, V) -> output (..., d). Holds ``V k + k d + d``
    parameters instead of ``V d``.

    References
    ----------
    .. [1] Balazy et al., "Direction is what you need: Improving Word Embedding
       Compression in Large Language Models", arXiv 2106.08181.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, latent_dim: int, padding_idx: int | None = None):
        super().__init__()
        if not 1 <= latent_dim < embedding_dim:
            raise PassError(f"latent_dim must be in [1, {embedding_dim - 1}] for embedding_dim {embedding_dim}, got {latent_dim}")
        self.num_embeddings, self.embedding_dim, self.latent_dim = num_embeddings, embedding_dim, latent_dim
        self.padding_idx = padding_idx
        self.latents = nn.Embedding(num_embeddings, latent_dim, padding_idx=padding_idx)
        self.decoder = nn.Linear(latent_dim, embedding_dim, bias=True)

    @classmethod
    def from_autoencoder(cls, weight: Tensor, encoder: nn.Linear, decoder: nn.Linear, padding_idx: int | None = None) -> AutoencoderEmbedding:
        """Deploy a trained autoencoder: latents ``encoder(weight)`` (computed once), decoder copied.

        Parameters
        ----------
        weight : Tensor, shape (V, d)
            The original table.
        encoder : nn.Linear(d, k), decoder : nn.Linear(k, d) with bias
        """
        layer = cls(weight.shape[0], weight.shape[1], encoder.out_features, padding_idx)
        with torch.no_grad():
            layer.latents.weight.copy_(encoder(weight.float()))
            layer.decoder.weight.copy_(decoder.weight)
            layer.decoder.bias.copy_(decoder.bias)
        return layer

    @property
    def weight(self) -> Tensor:
        """The reconstructed table, shape (V, d). Computed on access; not a parameter."""
        return self.decoder(self.latents.weight)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.decoder(self.latents(input_ids))

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {
            "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "latent_dim": self.latent_dim,
            "padding_idx": self.padding_idx,
        }

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, latent_dim={self.latent_dim}"


class AffineFactorHead(nn.Module):
    """Output head tied to an :class:`AutoencoderEmbedding`: ``logits = (h P) A^T + (h . b) [+ bias]``.

    With ``E = A P^T + 1 b^T`` (``A`` the latents (V, k), ``P`` the decoder weight
    (d, k), ``b`` the decoder bias (d,)), ``h E^T = (h P) A^T + (h . b) 1^T``.
    Shares the embedding's parameters (no copy).

    Parameters
    ----------
    embedding : AutoencoderEmbedding
    bias : Tensor of shape (V,), or None
        The original head's own bias, if it had one.

    Shapes
    ------
    input (..., d) -> logits (..., V).
    """

    def __init__(self, embedding: AutoencoderEmbedding, bias: Tensor | None = None):
        super().__init__()
        self.embedding = embedding
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"embedding": self.embedding, "bias": self.bias}

    def forward(self, hidden: Tensor) -> Tensor:
        decoder = self.embedding.decoder
        codes = torch.matmul(hidden, decoder.weight)  # (..., k)
        offset = torch.matmul(hidden, decoder.bias.unsqueeze(-1))  # (..., 1)
        latents = self.embedding.latents.weight
        latents = latents + runtime_zero(hidden, latents.dtype)  # one copy of A in ONNX, see runtime_zero
        return F.linear(codes, latents, self.bias) + offset



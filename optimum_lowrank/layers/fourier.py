"""PETE: a token embedding with no table, computed from the token id by Fourier features and a small MLP.

References
----------
.. [1] Ndubuaku, Talhi, "Parameter-Efficient Transformer Embeddings", arXiv 2505.02266 (2025).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers.base import FactorizedEmbedding, runtime_zero

__all__ = ["FourierEmbedding", "fourier_mlp_params"]

MLPKind = Literal["linear", "gelu", "geglu"]


def fourier_mlp_params(embedding_dim: int, hidden_dim: int, mlp: MLPKind) -> int:
    """Parameters of a :class:`FourierEmbedding` (MLP and RMSNorm weight).

    ``linear``: ``d^2 + 2d``; ``gelu``: ``2 d h + h + 2d``; ``geglu``: ``3 d h + 2h + 2d``.
    """
    d, h = embedding_dim, hidden_dim
    if mlp == "linear":
        return d * d + d + d
    if mlp == "gelu":
        return 2 * d * h + h + d + d
    return 3 * d * h + 2 * h + d + d


class FourierEmbedding(FactorizedEmbedding):
    """``E(p) = RMSNorm(MLP(T(p)) + T(p))`` with deterministic Fourier features ``T(p)``.

    ``x = 2 p / (V - 1) - 1`` maps token id p in [0, V) to [-1, 1]; feature i of
    ``T(p)`` (d features) is ``sin((floor(i/2) + 1) pi x)`` for even i and
    ``cos((floor(i/2) + 1) pi x)`` for odd i (computed as ``sin(f_i pi x + phase_i)``
    with phase pi/2 on odd i). The MLP is a residual correction; RMSNorm has a
    learned weight (eps 1e-6).

    Parameters
    ----------
    num_embeddings : int, >= 2
        Vocabulary size V.
    embedding_dim : int
        d.
    hidden_dim : int, >= 1
        Width of the MLP (ignored for ``mlp="linear"``).
    mlp : {"linear", "gelu", "geglu"}
        ``linear``: one ``Linear(d, d)``; ``gelu``: ``Linear(d, h) -> GELU -> Linear(h, d)``;
        ``geglu``: ``Linear(d, 2h) -> a * GELU(g) -> Linear(h, d)`` (the paper's FFN).
    eps : float
        RMSNorm epsilon.
    padding_idx : int or None
        Recorded for API compatibility.

    Shapes
    ------
    input: integer ids (...,) in [0, V) -> output (..., d). Holds
    :func:`fourier_mlp_params` parameters; nothing grows with V.

    Raises
    ------
    PassError
        If V < 2 (x is undefined) or ``hidden_dim < 1``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        hidden_dim: int,
        mlp: MLPKind = "geglu",
        eps: float = 1e-6,
        padding_idx: int | None = None,
    ):
        super().__init__()
        if num_embeddings < 2:
            raise PassError(f"FourierEmbedding needs a vocabulary of at least 2 tokens, got {num_embeddings}")
        if hidden_dim < 1:
            raise PassError(f"hidden_dim must be >= 1, got {hidden_dim}")
        self.num_embeddings, self.embedding_dim, self.hidden_dim = num_embeddings, embedding_dim, hidden_dim
        self.mlp_kind, self.eps, self.padding_idx = mlp, eps, padding_idx
        i = torch.arange(embedding_dim)
        self.register_buffer("frequencies", (torch.div(i, 2, rounding_mode="floor") + 1).float() * math.pi, persistent=False)
        self.register_buffer("phases", (i % 2).float() * (math.pi / 2), persistent=False)
        if mlp == "linear":
            self.fc_in, self.fc_out = nn.Linear(embedding_dim, embedding_dim), None
        elif mlp == "gelu":
            self.fc_in, self.fc_out = nn.Linear(embedding_dim, hidden_dim), nn.Linear(hidden_dim, embedding_dim)
        elif mlp == "geglu":
            self.fc_in, self.fc_out = nn.Linear(embedding_dim, 2 * hidden_dim), nn.Linear(hidden_dim, embedding_dim)
        else:
            raise PassError(f"mlp must be one of linear, gelu, geglu; got {mlp!r}")
        self.norm_weight = nn.Parameter(torch.ones(embedding_dim))

    def features(self, input_ids: Tensor) -> Tensor:
        """Fourier features ``T(p)``, shape (..., d), values in [-1, 1]."""
        x = input_ids.to(self.frequencies.dtype) * (2.0 / (self.num_embeddings - 1)) - 1.0
        return torch.sin(x.unsqueeze(-1) * self.frequencies + self.phases)

    def _mlp(self, t: Tensor) -> Tensor:
        if self.mlp_kind == "linear":
            return self.fc_in(t)
        hidden = self.fc_in(t)
        if self.mlp_kind == "gelu":
            hidden = F.gelu(hidden)
        else:
            a, g = hidden.chunk(2, dim=-1)
            hidden = a * F.gelu(g)
        return self.fc_out(hidden)

    def forward(self, input_ids: Tensor) -> Tensor:
        # (1, N) inside: the lookup and a tied head's table then use the same MatMul weights in
        # ONNX (a 2-D input exports as Gemm, which ORT 1.31's dynamic int8 turns into a broken MatMulInteger)
        t = self.features(input_ids.reshape(1, -1))
        e = self._mlp(t) + t
        out = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` (M,) of the implied table, shape (M, d) (training)."""
        return self(index)

    @property
    def weight(self) -> Tensor:
        """The implied table, shape (V, d), computed for every id (costs V MLP evaluations)."""
        return self(torch.arange(self.num_embeddings, device=self.norm_weight.device))

    def materialize(self, like: Tensor) -> Tensor:
        """The table (V, d) for a head, computed at run time.

        ``like`` (any tensor of the forward pass, e.g. the hidden states) only anchors
        the ids to run-time data (:func:`~optimum_lowrank.layers.autoencoder.runtime_zero`):
        a table computed from constants alone is constant-folded by the ONNX exporter
        into a (V, d) initializer (measured on SmolLM2: +226 MB in the int8 graph).
        """
        anchor = runtime_zero(like, torch.long)  # 0, but not a constant
        return self(torch.arange(self.num_embeddings, device=like.device) + anchor)

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {
            "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "hidden_dim": self.hidden_dim,
            "mlp": self.mlp_kind, "eps": self.eps, "padding_idx": self.padding_idx,
        }

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"hidden_dim={self.hidden_dim}, mlp={self.mlp_kind!r}"
        )

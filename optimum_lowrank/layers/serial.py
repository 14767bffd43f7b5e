"""The layer classes a saved compressed model may hold, registered through ``lowrank_register_layers``.

Every layer of this package defines ``layer_config()`` (its constructor arguments); the
``torch.nn`` classes that passes create or resize (``Linear``, ``Embedding``, ``LayerNorm``,
``Identity``, ``ModuleList``) are registered with functions that read and apply theirs.
:mod:`optimum_lowrank.saving` writes and rebuilds models from these; a third-party plugin
registers its own layers through the same hook.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.layers.autoencoder import AffineFactorHead, AutoencoderEmbedding
from optimum_lowrank.layers.base import MaterializedHead
from optimum_lowrank.layers.fourier import FourierEmbedding
from optimum_lowrank.layers.hybrid import HybridEmbedding, HybridHead
from optimum_lowrank.layers.lowrank import LowRankEmbedding, LowRankHead, LowRankLinear
from optimum_lowrank.layers.pruned import BiasOnlyAttention, BiasOnlyMLP, BiasOnlyOutput, PassThrough
from optimum_lowrank.layers.token_dropping import TokenDroppingEncoder, TokenKeepPredictor
from optimum_lowrank.layers.tt import TTEmbedding, TTMatrixEmbedding

__all__ = ["LAYER_CLASSES", "TORCH_LAYERS", "lowrank_register_layers"]

#: This package's layers; each has ``layer_config()`` and is rebuilt by ``cls(**config)``.
LAYER_CLASSES: tuple[type[nn.Module], ...] = (
    AffineFactorHead,
    AutoencoderEmbedding,
    BiasOnlyAttention,
    BiasOnlyMLP,
    BiasOnlyOutput,
    FourierEmbedding,
    HybridEmbedding,
    HybridHead,
    LowRankEmbedding,
    LowRankHead,
    LowRankLinear,
    MaterializedHead,
    PassThrough,
    TTEmbedding,
    TTMatrixEmbedding,
    TokenDroppingEncoder,
    TokenKeepPredictor,
)


def _linear(m: nn.Linear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _embedding(m: nn.Embedding) -> dict[str, Any]:
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "padding_idx": m.padding_idx}


def _layer_norm(m: nn.LayerNorm) -> dict[str, Any]:
    return {"normalized_shape": list(m.normalized_shape), "eps": m.eps, "elementwise_affine": m.elementwise_affine,
            "bias": m.bias is not None}


#: ``torch.nn`` classes: name -> (class, to_config, from_config).
TORCH_LAYERS: dict[str, tuple[type[nn.Module], Any, Any]] = {
    "torch.nn.Linear": (nn.Linear, _linear, lambda c: nn.Linear(**c)),
    "torch.nn.Embedding": (nn.Embedding, _embedding, lambda c: nn.Embedding(**c)),
    "torch.nn.LayerNorm": (nn.LayerNorm, _layer_norm, lambda c: nn.LayerNorm(**c)),
    "torch.nn.Identity": (nn.Identity, lambda m: {}, lambda c: nn.Identity()),
    "torch.nn.ModuleList": (nn.ModuleList, lambda m: {"modules": list(m)}, lambda c: nn.ModuleList(c["modules"])),
}


@hookimpl
def lowrank_register_layers(register) -> None:
    for cls in LAYER_CLASSES:
        register(cls)
    for name, (cls, to_config, from_config) in TORCH_LAYERS.items():
        register(cls, name=name, to_config=to_config, from_config=from_config)

"""Plain ``nn.Module`` layers that replace dense ones; each exports to ONNX as Gather/MatMul.

The factorizations they are built from live in :mod:`optimum_lowrank.linalg`.
"""

from optimum_lowrank.layers.autoencoder import AffineFactorHead, AutoencoderEmbedding
from optimum_lowrank.layers.base import FactorizedEmbedding, MaterializedHead, runtime_zero
from optimum_lowrank.layers.fourier import FourierEmbedding
from optimum_lowrank.layers.hybrid import HybridEmbedding, HybridHead
from optimum_lowrank.layers.lowrank import LowRankEmbedding, LowRankHead, LowRankLinear, linear_weight
from optimum_lowrank.layers.tt import TTEmbedding, TTMatrixEmbedding

__all__ = [
    "AffineFactorHead",
    "AutoencoderEmbedding",
    "FactorizedEmbedding",
    "FourierEmbedding",
    "HybridEmbedding",
    "HybridHead",
    "LowRankEmbedding",
    "LowRankHead",
    "LowRankLinear",
    "MaterializedHead",
    "TTEmbedding",
    "TTMatrixEmbedding",
    "linear_weight",
    "runtime_zero",
]

"""Plain ``nn.Module`` layers that replace dense ones; each exports to ONNX as Gather/MatMul."""

from optimum_lowrank.layers.lowrank import (
    FactorizedEmbedding,
    LowRankEmbedding,
    LowRankHead,
    LowRankLinear,
    linear_weight,
    split_factors,
    truncated_svd,
)

__all__ = ["FactorizedEmbedding", "LowRankEmbedding", "LowRankHead", "LowRankLinear", "linear_weight", "split_factors", "truncated_svd"]

from optimum_lowrank.layers.embeddings import AffineFactorHead, AutoencoderEmbedding, MaterializedHead  # noqa: E402
from optimum_lowrank.layers.fourier import FourierEmbedding  # noqa: E402
from optimum_lowrank.layers.tt import TTEmbedding, TTMatrixEmbedding, batched_tt_svd  # noqa: E402

__all__ += [
    "AffineFactorHead",
    "AutoencoderEmbedding",
    "FourierEmbedding",
    "MaterializedHead",
    "TTEmbedding",
    "TTMatrixEmbedding",
    "batched_tt_svd",
]

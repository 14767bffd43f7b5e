"""Plain ``nn.Module`` layers that replace dense ones; each exports to ONNX as Gather/MatMul."""

from optimum_lowrank.layers.lowrank import LowRankEmbedding, LowRankHead, LowRankLinear, linear_weight, split_factors, truncated_svd

__all__ = ["LowRankEmbedding", "LowRankHead", "LowRankLinear", "linear_weight", "split_factors", "truncated_svd"]

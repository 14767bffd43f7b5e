"""Low-rank layers against the dense layers they replace, with exact SVD identities."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers import LowRankEmbedding, LowRankHead, LowRankLinear
from optimum_lowrank.linalg.svd import truncated_svd


def test_full_rank_svd_reconstructs_weight():
    weight = torch.randn(24, 16, dtype=torch.float64).float()
    a, b = truncated_svd(weight, 16)
    assert_close(a @ b, weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 4, 11])
def test_rank_k_frobenius_error_equals_dropped_singular_values(rank):
    weight = torch.randn(20, 30)
    a, b = truncated_svd(weight, rank)
    s = torch.linalg.svdvals(weight)
    assert_close(torch.linalg.norm(weight - a @ b), s[rank:].square().sum().sqrt(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [0, 17])
def test_rank_out_of_range_raises(rank):
    with pytest.raises(PassError, match=r"rank must be in \[1, 16\]"):
        truncated_svd(torch.randn(16, 40), rank)


def test_lowrank_linear_matches_dense_at_full_rank():
    dense = nn.Linear(12, 8)
    layer = LowRankLinear.from_linear(dense, 8)
    x = torch.randn(3, 5, 12)
    assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
    assert_close(layer.to_dense().weight, dense.weight, atol=1e-5, rtol=1e-5)
    assert layer.to_dense().bias is not None


def test_lowrank_embedding_and_tied_head_match_dense_at_full_rank():
    table = nn.Embedding(50, 8)
    layer = LowRankEmbedding.from_embedding(table, 8)
    ids = torch.randint(0, 50, (2, 7))
    assert_close(layer(ids), table(ids), atol=1e-5, rtol=1e-5)
    head = LowRankHead(layer)
    hidden = torch.randn(2, 7, 8)
    assert_close(head(hidden), hidden @ table.weight.t(), atol=1e-4, rtol=1e-4)
    # the head shares the embedding's parameters: no extra storage
    assert sum(p.numel() for p in nn.ModuleList([layer, head]).parameters()) == 50 * 8 + 8 * 8


def test_tied_svd_head_stores_each_factor_once_in_onnx(tiny_llama, tmp_path):
    # The head multiplies by A^T and P where the embedding gathers from A and multiplies by P^T;
    # constant folding used to store a transposed copy of both (LowRankHead docstring).
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from optimum_lowrank.api import count_parameters
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
    from optimum_lowrank.exporters.parity import check_parity
    from optimum_lowrank.exporters.quantize import quantize_onnx
    from optimum_lowrank.passes.svd import SVDConfig, SVDPass

    torch.manual_seed(0)
    with torch.no_grad():  # distinct norm weights: the exporter merges equal initializers
        for name, param in tiny_llama.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    SVDPass(SVDConfig(targets=("model.embed_tokens",), rank=8)).run(tiny_llama)
    emb = tiny_llama.model.embed_tokens
    assert isinstance(tiny_llama.lm_head, LowRankHead) and tiny_llama.lm_head.embedding is emb
    fp32 = export_onnx(tiny_llama, tmp_path / "onnx", onnx_task(tiny_llama))
    assert check_parity(tiny_llama, fp32, atol=1e-4, seq_lengths=(8, 16)).passed

    initializers = [numpy_helper.to_array(t) for t in onnx.load(str(fp32)).graph.initializer]
    table, proj = emb.codes.weight.detach().numpy(), emb.proj.weight.detach().numpy()  # (128, 8), (32, 8)
    for factor in (table, proj):
        copies = [a for a in initializers if a.shape in (factor.shape, factor.T.shape)
                  and (np.array_equal(a, factor) or np.array_equal(a, factor.T))]
        assert len(copies) == 1, [a.shape for a in copies]
    assert sum(a.size for a in initializers) == count_parameters(tiny_llama)

    # int8: the table is stored once (int8, shared by the Gather and the head), no (r, V) copy
    quantized = quantize_onnx(fp32, tmp_path / "onnx" / "model_quantized.onnx", "dynamic_int8")
    shapes = [tuple(t.dims) for t in onnx.load(str(quantized)).graph.initializer]
    assert sum(s in ((128, 8), (8, 128)) for s in shapes) == 1, shapes
    assert check_parity(tiny_llama, quantized, atol=1.0, seq_lengths=(8,)).passed

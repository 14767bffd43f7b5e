"""Low-rank layers against the dense layers they replace, with exact SVD identities."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers import LowRankEmbedding, LowRankHead, LowRankLinear, truncated_svd


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

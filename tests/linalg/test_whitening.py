"""ASVD scaling and SVD-LLM whitening: the transforms and the whitened SVD.

Tiny random models and random calibration ids (seconds, no real data).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from optimum_lowrank.linalg.whitening import InputStatistics, InputTransform, asvd_transform, cholesky_transform, thin_svd, whitened_svd
from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
from tests.helpers import correlated_inputs, decoder_context

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_and_stats():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 24, generator=g)
    x = correlated_inputs()
    stats = InputStatistics(24)
    for chunk in x.split(500):  # streamed in 4 batches
        stats.update(chunk, gram=True, abs_mean=True)
    return weight, x, stats


def _output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - approx).double() @ x.double().t()).norm())


@pytest.mark.parametrize("rank", [2, 6, 10])
def test_whitening_reduces_the_activation_weighted_error(rank):
    weight, x, stats = _layer_and_stats()
    plain = whitened_svd(weight, InputTransform("identity"))
    white = whitened_svd(weight, cholesky_transform(stats))
    asvd = whitened_svd(weight, asvd_transform(stats, 0.5))
    errors = {}
    for label, d in (("plain", plain), ("svd_llm", white), ("asvd", asvd)):
        a, b = d.factors(rank)
        errors[label] = _output_error(weight, a @ b, x)
    assert errors["svd_llm"] < 0.8 * errors["plain"]
    assert errors["asvd"] < errors["plain"]
    assert errors["svd_llm"] <= errors["asvd"] * (1 + 1e-6)  # SVD-LLM's truncation is optimal for this error
    # the dropped whitened singular values give that error exactly, relative to ||W X^T||
    reference = float((weight.double() @ x.double().t()).norm())
    assert white.relative_error(rank) == pytest.approx(errors["svd_llm"] / reference, rel=1e-3)


def test_full_rank_whitened_factors_reconstruct_the_weight():
    weight, _, stats = _layer_and_stats()
    for transform in (cholesky_transform(stats), asvd_transform(stats, 0.5)):
        d = whitened_svd(weight, transform)
        a, b = d.factors(16)
        assert_close(a @ b, weight, atol=1e-4, rtol=1e-4)


def test_singular_gram_matrix_gets_damping_and_reports_it(tiny_llama):
    ids = torch.randint(0, 128, (1, 8))  # 8 tokens < 64 input channels of down_proj: singular Gram matrix
    config = ActivationSVDConfig(targets=["model.layers.0.mlp.down_proj"], rank=4)
    reports = ActivationSVDPass(config).run(tiny_llama, decoder_context(ids))
    assert reports[0].action == "factorized" and reports[0].metrics["damping"] > 0
    assert "not positive definite: added damping" in reports[0].note


def test_statistics_summed_over_shards_equal_one_pass():
    """InputStatistics.reduce with an all-reduce that sums two shards gives the unsharded sums (float64 rounding)."""
    x = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 6)
    whole = InputStatistics(6)
    whole.update(x[:1], gram=True, abs_mean=True)
    whole.update(x[1:], gram=True, abs_mean=True)
    shards = [InputStatistics(6), InputStatistics(6)]
    for shard, part in zip(shards, (x[:1], x[1:])):
        shard.update(part, gram=True, abs_mean=True)
    # rank 1's tensors in the order every rank reduces them: count, sum |x|, Gram matrix
    partner = iter([torch.tensor([float(shards[1].count)], dtype=torch.float64), shards[1].abs_sum, shards[1].gram])
    shards[0].reduce(lambda tensor: tensor.add_(next(partner)))  # torch.distributed.all_reduce(SUM) seen from rank 0
    assert shards[0].count == whole.count == 20
    assert_close(shards[0].gram, whole.gram, rtol=1e-15, atol=0)
    assert_close(shards[0].abs_sum, whole.abs_sum, rtol=1e-15, atol=0)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (20, 20)])
def test_thin_svd_of_either_orientation_is_the_thin_svd(shape):
    """thin_svd factors a wide matrix as its transpose: the same spectrum and rank-r products as torch.linalg.svd."""
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, s, vh = thin_svd(matrix)
    ref_u, ref_s, ref_vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(shape)
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    assert_close(s, ref_s, rtol=1e-12, atol=1e-12)
    assert_close(u.mT @ u, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    assert_close(vh @ vh.mT, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    for r in (1, k // 2, k):
        assert_close((u[:, :r] * s[:r]) @ vh[:r], (ref_u[:, :r] * ref_s[:r]) @ ref_vh[:r], rtol=1e-10, atol=1e-10)


def test_whitened_svd_of_a_wide_layer_matches_the_direct_svd():
    """A wide weight (out < in, e.g. k_proj, down_proj) gives the factors' product and error of the direct SVD."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 24, generator=g)
    _, _, stats = _layer_and_stats()
    transform = cholesky_transform(stats)
    got = whitened_svd(weight, transform)
    u, s, vh = torch.linalg.svd(transform.right(weight.double()), full_matrices=False)
    for rank in (2, 5, 8):
        a, b = got.factors(rank)
        ref = ((u[:, :rank] * s[:rank]) @ transform.undo(vh[:rank])).float()
        assert_close(a @ b, ref, rtol=1e-5, atol=1e-5)
        assert got.relative_error(rank) == pytest.approx(float((s[rank:].square().sum() / s.square().sum()).sqrt()), rel=1e-10)


def test_gram_accumulates_float32_batch_products_in_float64_exactly():
    """The running Gram sum equals the sum of each batch's float32 X^T X widened to float64, bit for bit."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 40, generator=g) * torch.logspace(-3, 3, 40) for _ in range(4)]
    stats = InputStatistics(40)
    for x in batches:
        stats.update(x, gram=True, abs_mean=False)
    expected = sum((x.t() @ x).double() for x in batches[1:]) + (batches[0].t() @ batches[0]).double()
    reference = (batches[0].t() @ batches[0]).double()
    for x in batches[1:]:
        reference = reference + (x.t() @ x).double()
    assert stats.gram.dtype == torch.float64 and torch.equal(stats.gram, reference)
    assert_close(stats.gram, expected, rtol=1e-15, atol=0)

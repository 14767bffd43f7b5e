"""svd / activation_svd / softlm under target_params_ratio and min_layer_saving.

Tiny random models and random calibration ids (seconds, no real data).
"""

from __future__ import annotations

import copy

import pytest
from torch import nn

from optimum_lowrank.errors import PassError, RecipeError
from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
from optimum_lowrank.passes.svd import SVDConfig, SVDPass
from optimum_lowrank.recipe import load_recipe
from tests.helpers import LLAMA_TARGETS, SAVING_RANK, ZONE_RANK, decoder_context, params_ratio

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_budgeted_svd_meets_the_budget(tiny_llama, ratio):
    reports = SVDPass(SVDConfig(targets=LLAMA_TARGETS, target_params_ratio=ratio)).run(tiny_llama)
    tolerance = max(a + b for a, b in [(32, 32), (32, 64)]) / sum(r.params_before for r in reports)
    assert ratio - tolerance <= params_ratio(reports) <= ratio
    assert all(r.rank is not None for r in reports)
    ranks = {r.rank for r in reports if r.action == "factorized"}
    assert len(ranks) > 1  # not one uniform rank


@pytest.mark.parametrize("allocation", ["fisher", "relative", "absolute"])
def test_budgeted_activation_svd_meets_the_budget(tiny_llama, llama_ids, allocation):
    config = ActivationSVDConfig(targets=LLAMA_TARGETS, target_params_ratio=0.5, allocation=allocation, sensitivity_samples=2)
    reports = ActivationSVDPass(config).run(tiny_llama, decoder_context(llama_ids))
    assert 0.5 - 96 / sum(r.params_before for r in reports) <= params_ratio(reports) <= 0.5
    dense = [r for r in reports if r.action == "skipped"]
    assert all("kept dense by the budget allocation" in r.note for r in dense)


@pytest.mark.parametrize(
    ("pass_id", "extra"),
    [("svd", {}), ("activation_svd", {}), ("activation_svd", {"method": "asvd"}), ("softlm", {})],
)
@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2])
def test_budget_outside_unit_interval_is_rejected_by_the_recipe(pass_id, extra, ratio):
    recipe = {"version": 1, "passes": [{"pass": pass_id, "targets": ["x"], "target_params_ratio": ratio, **extra}]}
    with pytest.raises(RecipeError, match="target_params_ratio"):
        load_recipe(recipe)


def test_budget_is_mutually_exclusive_with_other_rank_options():
    with pytest.raises(RecipeError, match="exactly one"):
        load_recipe({"version": 1, "passes": [{"pass": "svd", "targets": ["x"], "target_params_ratio": 0.5, "rank": 4}]})
    with pytest.raises(RecipeError, match="alpha applies to method 'asvd'"):
        load_recipe({"version": 1, "passes": [{"pass": "activation_svd", "targets": ["x"], "rank": 4, "alpha": 0.5}]})


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.85])
def test_budgeted_passes_never_factorize_a_layer_saving_less_than_the_minimum(tiny_llama, llama_ids, ratio):
    svd_reports = SVDPass(SVDConfig(targets=LLAMA_TARGETS, target_params_ratio=ratio)).run(copy.deepcopy(tiny_llama))
    config = ActivationSVDConfig(targets=LLAMA_TARGETS, target_params_ratio=ratio, sensitivity_samples=2)
    asvd_reports = ActivationSVDPass(config).run(copy.deepcopy(tiny_llama), decoder_context(llama_ids))
    for reports in (svd_reports, asvd_reports):
        tolerance = max(a + b for a, b in [(32, 32), (32, 64)]) / sum(r.params_before for r in reports)
        assert ratio - tolerance <= params_ratio(reports) <= ratio
        for r in reports:
            if r.action == "factorized":
                assert r.params_after <= 0.9 * r.params_before
            else:
                assert r.action == "skipped" and "kept dense by the budget allocation" in r.note
                assert "min_layer_saving" in r.note and "ONNX Runtime" in r.note


def test_explicit_rank_saving_too_little_stays_dense_with_a_note(tiny_llama, llama_ids):
    target = ["model.layers.0.self_attn.q_proj"]
    for reports in (
        SVDPass(SVDConfig(targets=target, rank=ZONE_RANK)).run(copy.deepcopy(tiny_llama)),
        ActivationSVDPass(ActivationSVDConfig(targets=target, rank=ZONE_RANK)).run(copy.deepcopy(tiny_llama), decoder_context(llama_ids)),
    ):
        (report,) = reports
        assert report.action == "skipped" and report.params_after == report.params_before
        assert "rank 15 would keep 93.8% of the 32x32 weights" in report.note
        assert "min_layer_saving" in report.note and "slower than the dense one" in report.note and "0.97x" in report.note
    model = copy.deepcopy(tiny_llama)
    (report,) = SVDPass(SVDConfig(targets=target, rank=ZONE_RANK)).run(model)
    assert type(model.get_submodule(target[0])) is nn.Linear
    # a rank that saves enough is factorised; min_layer_saving 0 restores the plain break-even rule
    (report,) = SVDPass(SVDConfig(targets=target, rank=SAVING_RANK)).run(copy.deepcopy(tiny_llama))
    assert report.action == "factorized"
    (report,) = SVDPass(SVDConfig(targets=target, rank=ZONE_RANK, min_layer_saving=0)).run(copy.deepcopy(tiny_llama))
    assert report.action == "factorized" and report.rank == ZONE_RANK
    # a rank that does not reduce the layer at all is still refused
    with pytest.raises(PassError, match="rank 16 would not reduce"):
        SVDPass(SVDConfig(targets=target, rank=16)).run(copy.deepcopy(tiny_llama))


def test_rank_ratio_in_the_slow_zone_is_skipped_per_layer(tiny_llama):
    # rank_ratio 0.47: q/o (32x32) get rank 15, 6% saved -> dense; k/v (16x32) rank 8, 25% saved; MLP (32x64) rank 15, 30% saved
    reports = SVDPass(SVDConfig(targets=LLAMA_TARGETS, rank_ratio=0.47)).run(copy.deepcopy(tiny_llama))
    by_shape = {}
    for r in reports:
        by_shape.setdefault(r.params_before, set()).add(r.action)
    assert by_shape[32 * 32] == {"skipped"}
    assert by_shape[16 * 32] == by_shape[32 * 64] == {"factorized"}
    assert all("min_layer_saving" in r.note for r in reports if r.action == "skipped")


@pytest.mark.parametrize("pass_id", ["svd", "activation_svd", "softlm"])
@pytest.mark.parametrize("value", [1, 1.5, -0.1])
def test_min_layer_saving_outside_0_1_is_rejected(pass_id, value):
    options = {"target_params_ratio": 0.5, "min_layer_saving": value}
    with pytest.raises(RecipeError, match="min_layer_saving"):
        load_recipe({"version": 1, "passes": [{"pass": pass_id, "targets": ["x"], **options}]})

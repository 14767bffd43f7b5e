"""SoftLMs: the soft-threshold layer and the pass.

Tiny random models and random calibration ids (seconds, no real data).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.errors import PassError
from optimum_lowrank.layers import LowRankLinear
from optimum_lowrank.passes.linear.soft_threshold import SoftThresholdLinear
from optimum_lowrank.passes.linear.softlm import SoftLMConfig, SoftLMPass
from optimum_lowrank.pipeline import apply_passes
from optimum_lowrank.recipe import load_recipe
from tests.helpers import LLAMA_TARGETS, SOFTLM_TOLERANCE, ZONE_RANK, decoder_context, params_ratio

pytestmark = pytest.mark.usefixtures("one_thread")


def test_soft_threshold_layer_equals_the_dense_layer_at_tau_zero():
    dense = nn.Linear(24, 16)
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    layer = SoftThresholdLinear(u, s, vh, dense.bias, tau=0.0)
    x = torch.randn(3, 5, 24)
    assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
    assert layer.hard_rank() == 16
    assert_close(layer.weight(), dense.weight.detach(), atol=1e-5, rtol=1e-5)


def test_soft_threshold_layer_truncates_exactly():
    dense = nn.Linear(40, 30)
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    layer = SoftThresholdLinear(u, s, vh, dense.bias, tau=float(s[8]))
    x = torch.randn(7, 40)
    truncated = layer.to_lowrank()
    assert isinstance(truncated, LowRankLinear) and truncated.rank == 8
    assert_close(truncated(x), layer(x), atol=1e-5, rtol=1e-5)
    # surviving rank at/above break-even (40*30/70 = 17.1): a dense layer with the thresholded weight
    wide = SoftThresholdLinear(u, s, vh, dense.bias, tau=float(s[25]))
    kept = wide.to_lowrank()
    assert type(kept) is nn.Linear
    assert_close(kept(x), wide(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("basis", ["svd_llm", "svd"])
def test_softlm_truncated_model_equals_the_trained_soft_model(tiny_llama, llama_ids, basis):
    config = SoftLMConfig(targets=LLAMA_TARGETS, target_params_ratio=0.6, steps=6, lr=2e-2, basis=basis, sensitivity_samples=2)
    softlm = SoftLMPass(config)
    context = decoder_context(llama_ids)
    targets = softlm.select(tiny_llama)
    state = softlm.train_soft(tiny_llama, targets, context)
    assert all(isinstance(tiny_llama.get_submodule(n), SoftThresholdLinear) for n in targets)
    assert any(float(layer.tau.detach()) > 0 for layer in state.soft.values())
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        soft_logits = tiny_llama(ids).logits
    reports = softlm.truncate(tiny_llama, state)
    with torch.no_grad():
        assert_close(tiny_llama(ids).logits, soft_logits, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, SoftThresholdLinear) for m in tiny_llama.modules())
    # budget met: never above (projection), at most SOFTLM_TOLERANCE below (soft vs hard count)
    assert 0.6 - SOFTLM_TOLERANCE <= params_ratio(reports) <= 0.6
    assert {r.action for r in reports} <= {"factorized", "replaced"}
    assert all("kept dense" in r.note for r in reports if r.action == "replaced")


def test_softlm_from_tau_zero_reaches_the_budget(tiny_bert):
    ids = torch.randint(0, 120, (4, 16))
    context = PassContext(kind="encoder", calibration_loader=lambda: ids)
    config = SoftLMConfig(
        targets=["re:.*intermediate\\.dense", "re:.*output\\.dense"],
        target_params_ratio=0.5,
        tau_init="zero",
        basis="svd",
        steps=40,
        lr=5e-2,
        penalty_weight=50.0,
        penalty_warmup=0.2,
        loss="hidden",
    )
    before = count_parameters(tiny_bert)
    reports = SoftLMPass(config).run(tiny_bert, context)
    assert params_ratio(reports) <= 0.5
    assert count_parameters(tiny_bert) < before
    assert sum(r.metrics["projected_out"] for r in reports) >= 0
    assert "softlm: 40 steps, hidden loss" in context.notes[0]


def test_softlm_non_finite_loss_restores_the_layers_and_raises(tiny_llama, llama_ids):
    originals = {n: m for n, m in tiny_llama.named_modules() if n.endswith("_proj")}
    with torch.no_grad():
        tiny_llama.model.norm.weight.fill_(float("nan"))  # the final norm: the loss is NaN, the targets' inputs are finite
    config = SoftLMConfig(targets=LLAMA_TARGETS, target_params_ratio=0.6, steps=3, basis="svd", allocation="relative")
    with pytest.raises(PassError, match="loss became nan .* original layers were restored"):
        SoftLMPass(config).run(tiny_llama, decoder_context(llama_ids))
    for name, module in originals.items():
        assert tiny_llama.get_submodule(name) is module
    assert not any(isinstance(m, SoftThresholdLinear) for m in tiny_llama.modules())


def test_softlm_in_a_recipe_pipeline_leaves_the_callers_model_untouched(tiny_llama, llama_ids):
    recipe = load_recipe(
        {
            "version": 1,
            "passes": [{"pass": "softlm", "targets": LLAMA_TARGETS, "target_params_ratio": 0.7, "steps": 2, "allocation": "relative"}],
        }
    )
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    _, reports = apply_passes(tiny_llama, recipe, decoder_context(llama_ids))
    assert reports[0].model_params_after < reports[0].model_params_before
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value, state[key])


def test_soft_threshold_layer_in_the_slow_zone_becomes_dense_and_equal():
    dense = nn.Linear(32, 32)
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    layer = SoftThresholdLinear(u, s, vh, dense.bias, tau=float(s[ZONE_RANK]))
    assert layer.hard_rank() == ZONE_RANK
    x = torch.randn(5, 32)
    assert isinstance(layer.to_lowrank(0.0), LowRankLinear)
    kept = layer.to_lowrank(0.1)
    assert type(kept) is nn.Linear
    assert_close(kept(x), layer(x), atol=1e-5, rtol=1e-5)


def test_softlm_respects_the_minimum_saving_and_the_budget(tiny_llama, llama_ids):
    config = SoftLMConfig(targets=LLAMA_TARGETS, target_params_ratio=0.8, steps=6, lr=2e-2, sensitivity_samples=2)
    reports = SoftLMPass(config).run(copy.deepcopy(tiny_llama), decoder_context(llama_ids))
    assert 0.8 - SOFTLM_TOLERANCE <= params_ratio(reports) <= 0.8
    for r in reports:
        if r.action == "factorized":
            assert r.params_after <= 0.9 * r.params_before
        else:
            assert r.action == "replaced" and "kept dense" in r.note

    # a layer whose surviving rank saves too little: charged as dense by the hard count, truncated to a dense layer
    softlm = SoftLMPass(config)
    state = softlm.train_soft(tiny_llama, softlm.select(tiny_llama), decoder_context(llama_ids))
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        layer = state.soft[name]
        layer.s.copy_(torch.linspace(2, 1, layer.s.numel()))
        layer.tau.fill_(float(layer.s[ZONE_RANK]))
    hard = SoftLMPass._hard_params(state.soft, state.shapes, state.extras, 0.1)
    assert hard - SoftLMPass._hard_params(state.soft, state.shapes, state.extras, 0.0) == 32 * 32 - ZONE_RANK * 64
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        soft_logits = tiny_llama(ids).logits
    reports = softlm.truncate(tiny_llama, state)
    with torch.no_grad():
        assert_close(tiny_llama(ids).logits, soft_logits, atol=1e-4, rtol=1e-4)
    assert sum(r.params_after for r in reports) == hard
    q = next(r for r in reports if r.name == name)
    assert q.action == "replaced" and q.rank == ZONE_RANK and type(tiny_llama.get_submodule(name)) is nn.Linear
    assert "min_layer_saving" in q.note and "ONNX Runtime" in q.note

"""Sequential (error-aware) calibration and the truncation-aware refit of activation_svd, on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers import LowRankLinear
from optimum_lowrank.linalg.refit import CrossStatistics, output_error, refit_weight
from optimum_lowrank.linalg.whitening import InputStatistics, InputTransform, cholesky_transform, whitened_svd
from optimum_lowrank.passes.linear import sequential as sequential_module
from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
from optimum_lowrank.passes.linear.calibration import collect_input_statistics
from optimum_lowrank.report import LayerReport
from tests.helpers import LLAMA_TARGETS, correlated_inputs, decoder_context

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sequential_without_compression_reproduces_the_original_activations(tiny_llama, llama_ids):
    """Nothing compressed: every layer's sequential inputs are its original inputs (Gram = cross = original Gram)."""
    targets = ActivationSVDPass(ActivationSVDConfig(targets=LLAMA_TARGETS, rank=4)).select(tiny_llama)
    reference = collect_input_statistics(tiny_llama, targets, llama_ids, kind="decoder", batch_size=2)
    seen: dict[str, CrossStatistics] = {}

    def keep(model, name, module, decomp, rank):  # records, compresses nothing
        return LayerReport(name=name, module_type="Linear", action="skipped", params_before=1, params_after=1, rank=rank)

    original = sequential_module.group_statistics

    def spy(block, orig, relative, seq, origs):
        stats = original(block, orig, relative, seq, origs)
        seen[relative] = stats
        seen.setdefault("_all", []).append(stats)
        return stats

    sequential_module.group_statistics = spy
    try:
        reports = sequential_module.sequential_factorize(
            tiny_llama, targets, llama_ids, dict.fromkeys(targets, 4), kind="decoder", transform=cholesky_transform,
            replace=keep, factorizes=lambda shape, rank: True, batch_size=2,
        )
    finally:
        sequential_module.group_statistics = original
    assert len(reports) == len(targets)
    groups = seen["_all"]
    assert len(groups) == 8  # 2 blocks x (q/k/v, o, gate/up, down)
    for stats in groups:
        torch.testing.assert_close(stats.gram, stats.cross, rtol=0, atol=0)
        torch.testing.assert_close(stats.gram, stats.gram_original, rtol=0, atol=0)
    # and they are the Gram matrices of the whole model's forward (block-by-block execution is exact)
    distinct = {id(s): s for s in reference.values()}
    assert sorted(float(s.gram.trace()) for s in distinct.values()) == pytest.approx(sorted(float(s.gram.trace()) for s in groups), rel=1e-5)


@pytest.mark.parametrize("shift", [0.0, 0.3, 1.0])
def test_refit_never_increases_the_output_error_over_truncation(shift):
    x_orig = correlated_inputs(800, 24, seed=1).double()
    x_seq = x_orig + shift * correlated_inputs(800, 24, seed=2).double() * 0.1
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    stats = CrossStatistics(24)
    stats.update(x_seq, x_orig)
    gram, cross, gram_original = stats.normalized()
    plain = whitened_svd(weight, cholesky_transform(InputStatistics(24, count=stats.count, gram=stats.gram)))
    fit = refit_weight(weight, gram, cross, damping=1e-9)
    refitted = whitened_svd(fit.weight, InputTransform("cholesky", lower=fit.lower))
    for rank in range(1, 16):
        a, b = plain.factors(rank)
        c, d = refitted.factors(rank)
        e_plain = output_error(weight, a @ b, gram, cross, gram_original)
        e_refit = output_error(weight, c @ d, gram, cross, gram_original)
        assert e_refit <= e_plain + 1e-6
        direct = (weight.float() @ x_orig.float().T - (c @ d) @ x_seq.float().T).norm() / (weight.float() @ x_orig.float().T).norm()
        assert e_refit == pytest.approx(float(direct), rel=1e-2, abs=1e-4)  # float32 factors, Gram-based formula
        if shift == 0.0:
            assert e_refit == pytest.approx(e_plain, rel=1e-4, abs=1e-7)  # same inputs: SVD-LLM is already optimal
        elif rank <= 12:
            assert e_refit < e_plain


def test_refit_singular_system_damps_or_fails():
    weight = torch.randn(4, 6, dtype=torch.float64)
    rank_deficient = torch.zeros(6, 6, dtype=torch.float64)
    rank_deficient[:3, :3] = torch.eye(3)
    fit = refit_weight(weight, rank_deficient, rank_deficient, damping=1e-3)
    assert fit.damping == 1e-3 and torch.isfinite(fit.weight).all()
    torch.testing.assert_close(fit.weight, weight)  # C = G: nothing to correct
    with pytest.raises(PassError, match="all zero"):
        refit_weight(weight, torch.zeros(6, 6, dtype=torch.float64), rank_deficient)
    with pytest.raises(PassError, match="not positive definite"):
        refit_weight(weight, torch.diag(torch.tensor([1.0, 1, 1, 1, 1, -4.9], dtype=torch.float64)), rank_deficient, damping=1e-9)
    with pytest.raises(PassError, match="NaN"):
        refit_weight(weight, torch.full((6, 6), float("nan"), dtype=torch.float64), rank_deficient)
    with pytest.raises(ValueError, match="damping"):
        refit_weight(weight, rank_deficient, rank_deficient, damping=0)


@pytest.mark.parametrize("refit", [False, True])
def test_sequential_pass_on_llama(tiny_llama, llama_ids, refit):
    config = ActivationSVDConfig(targets=LLAMA_TARGETS, target_params_ratio=0.6, allocation="relative", sequential=True, refit=refit)
    reports = ActivationSVDPass(config).run(tiny_llama, decoder_context(llama_ids))
    factorized = [r for r in reports if r.action == "factorized"]
    assert factorized and len(reports) == 14
    for r in factorized:
        assert isinstance(tiny_llama.get_submodule(r.name), LowRankLinear)
        assert r.metrics["relative_output_error"] <= r.metrics["truncation_output_error"] + 1e-9
        assert r.metrics["refit"] == (1.0 if refit else 0.0) or (refit and "kept the truncation" in r.note)
    if refit:  # after the first compressed layer, the inputs have moved: the refit helps somewhere
        assert any(r.metrics["relative_output_error"] < r.metrics["truncation_output_error"] - 1e-6 for r in factorized)


def test_sequential_needs_blocks_and_restores_on_error(tiny_llama, llama_ids, monkeypatch):
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    wrapped = Wrapper(copy.deepcopy(tiny_llama))
    before = _state(wrapped)
    config = ActivationSVDConfig(targets=["re:inner\\.model\\.layers\\.\\d+\\..*_proj"], rank=4, sequential=True)
    with pytest.raises(PassError, match="cannot run Wrapper block by block"):
        ActivationSVDPass(config).run(wrapped, decoder_context(llama_ids))
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())

    calls = {"n": 0}
    real = sequential_module.refit_weight

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise PassError("singular on purpose")
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential_module, "refit_weight", failing)
    before = _state(tiny_llama)
    config = ActivationSVDConfig(targets=LLAMA_TARGETS, rank=4, sequential=True)
    with pytest.raises(PassError, match="singular on purpose"):
        ActivationSVDPass(config).run(tiny_llama, decoder_context(llama_ids))
    assert not any(isinstance(m, LowRankLinear) for m in tiny_llama.modules())
    assert set(tiny_llama.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())


def test_sequential_options_are_validated():
    with pytest.raises(ValueError, match="refit needs sequential"):
        ActivationSVDConfig(targets=["x"], rank=2, refit=True)
    with pytest.raises(ValueError, match="sequential applies to method 'svd_llm'"):
        ActivationSVDConfig(targets=["x"], rank=2, method="asvd", sequential=True)
    with pytest.raises(ValueError):
        ActivationSVDConfig(targets=["x"], rank=2, sequential=True, refit_damping=0)


def test_pipeline_sequential_recipe_with_distillation_in_a_time_budget(tiny_llama, tmp_path):
    """The shape of recipes/smollm2-lowrank-*.yaml on a tiny Llama: sequential + refit, logits healing by max_minutes."""
    from optimum_lowrank import optimize
    from tests.helpers import WordTokenizer

    text_file = tmp_path / "cal.txt"
    text_file.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(400)))
    recipe = {
        "version": 1,
        "passes": [{"pass": "activation_svd", "targets": LLAMA_TARGETS, "target_params_ratio": 0.7, "allocation": "relative", "sequential": True}],
        "calibration": {"data": str(text_file), "num_samples": 8, "seq_len": 16},
        "finetune": {"max_minutes": 0.01, "loss": "logits", "num_samples": 8, "lr": 1e-3},
    }
    original = _state(tiny_llama)
    report = optimize(tiny_llama, recipe, tokenizer=WordTokenizer(), progress=False)
    assert report.params_after < report.params_before
    assert report.finetune["loss"] == "logits" and report.finetune["stopped_by"] == "max_minutes"
    factorized = [r for p in report.passes for r in p.layers if r.action == "factorized"]
    assert factorized and all(r.metrics["relative_output_error"] <= r.metrics["truncation_output_error"] + 1e-9 for r in factorized)
    assert all(torch.equal(original[k], v) for k, v in tiny_llama.state_dict().items())  # the caller's model is untouched

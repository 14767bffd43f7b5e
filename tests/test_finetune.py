"""The short fine-tune after the passes.

Tiny random models and random calibration ids (seconds, no real data).
"""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.finetune import finetune, lowrank_parameters, make_loss
from optimum_lowrank.passes.svd import SVDConfig, SVDPass
from tests.helpers import LLAMA_TARGETS, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_finetune_trains_only_the_factors_and_lowers_the_loss(tiny_llama, llama_ids):
    SVDPass(SVDConfig(targets=LLAMA_TARGETS, rank=4)).run(tiny_llama)
    frozen = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if "embed" in n or "norm" in n}
    result = finetune(tiny_llama, llama_ids, kind="decoder", steps=15, lr=1e-2, progress=False, eval_samples=6)
    assert result["loss_after"] < result["loss_before"]
    assert result["trained_parameters"] == sum(p.numel() for p in lowrank_parameters(tiny_llama))
    for name, p in tiny_llama.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name])
    assert not tiny_llama.training


def test_finetune_encoder_distils_and_needs_a_reference(tiny_bert):
    ids = torch.randint(0, 120, (4, 16))
    reference = copy.deepcopy(tiny_bert)
    SVDPass(SVDConfig(targets=["re:.*intermediate\\.dense"], rank=4)).run(tiny_bert)
    with pytest.raises(PassError, match="pass reference_model"):
        finetune(tiny_bert, ids, kind="encoder", steps=1, lr=1e-3, progress=False)
    result = finetune(tiny_bert, ids, kind="encoder", steps=10, lr=1e-2, reference_model=reference, progress=False)
    assert result["loss"] == "hidden" and result["loss_after"] < result["loss_before"]


def test_finetune_non_finite_loss_restores_parameters(tiny_llama, llama_ids):
    SVDPass(SVDConfig(targets=LLAMA_TARGETS, rank=4)).run(tiny_llama)
    before = [p.detach().clone() for p in lowrank_parameters(tiny_llama)]
    with pytest.raises(PassError, match="became inf|became nan"):
        finetune(tiny_llama, llama_ids, kind="decoder", steps=5, lr=1e30, progress=False, max_grad_norm=1e30)
    for p, saved in zip(lowrank_parameters(tiny_llama), before):
        assert torch.equal(p, saved)


def test_finetune_without_lowrank_layers_is_refused(tiny_llama, llama_ids):
    with pytest.raises(PassError, match="no low-rank layers"):
        finetune(tiny_llama, llama_ids, kind="decoder", steps=1, lr=1e-3, progress=False)


def test_pipeline_finetune_num_samples_trains_on_fresh_windows(tiny_llama, tmp_path, monkeypatch):
    import optimum_lowrank.finetune as finetune_module
    from optimum_lowrank import optimize
    from optimum_lowrank.data import token_windows

    text_file = tmp_path / "cal.txt"
    text = " ".join(f"w{i}" for i in range(56))
    text_file.write_text(text)
    seen = []
    real = finetune_module.finetune

    def spy(model, ids, **kwargs):
        seen.append(ids.clone())
        return real(model, ids, **kwargs)

    monkeypatch.setattr(finetune_module, "finetune", spy)
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": LLAMA_TARGETS, "rank": 4}],
        "calibration": {"data": str(text_file), "num_samples": 4, "seq_len": 8},
        "finetune": {"steps": 3, "lr": 1e-3, "num_samples": 3},
    }
    report = optimize(tiny_llama, recipe, tokenizer=WordTokenizer(), progress=False)
    assert torch.equal(seen[0], token_windows(WordTokenizer(), text, 8, 7)[4:])  # windows 4..6: not the calibration ones
    assert report.finetune["tokens"] == 3 * 8 and "3 windows after the calibration windows" in report.finetune["data"]
    assert report.recipe["finetune"]["num_samples"] == 3
    # without num_samples: the calibration windows, as before
    seen.clear()
    del recipe["finetune"]["num_samples"]
    optimize(tiny_llama, recipe, tokenizer=WordTokenizer(), progress=False)
    assert torch.equal(seen[0], token_windows(WordTokenizer(), text, 8, 4))
    # more fresh windows than the text gives: a DataError naming the count, before any pass runs
    recipe["finetune"]["num_samples"] = 4
    with pytest.raises(DataError, match="num_samples=4 needs 4 windows after the 4 calibration windows: .* only 7 windows"):
        optimize(tiny_llama, recipe, tokenizer=WordTokenizer(), progress=False)


def test_logits_kl_of_the_model_against_itself_is_zero(tiny_llama, llama_ids):
    loss = make_loss(tiny_llama, "decoder", "logits", reference_model=copy.deepcopy(tiny_llama))
    with torch.no_grad():
        assert float(loss(llama_ids)) == pytest.approx(0.0, abs=1e-6)
    changed = copy.deepcopy(tiny_llama)
    SVDPass(SVDConfig(targets=LLAMA_TARGETS, rank=4)).run(changed)
    assert float(make_loss(changed, "decoder", "logits", reference_model=tiny_llama)(llama_ids)) > 1e-4


def test_finetune_distils_logits_within_a_cpu_budget(tiny_llama, llama_ids):
    reference = copy.deepcopy(tiny_llama)
    SVDPass(SVDConfig(targets=LLAMA_TARGETS, rank=4)).run(tiny_llama)
    result = finetune(tiny_llama, llama_ids, kind="decoder", max_minutes=0.02, lr=1e-2, loss="logits", reference_model=reference, progress=False)
    assert result["stopped_by"] == "max_minutes" and result["steps"] >= 1
    assert result["cpu_seconds"] < 0.02 * 60 + 5  # one step may finish after the budget
    assert result["loss"] == "logits" and result["loss_after"] < result["loss_before"]
    capped = finetune(tiny_llama, llama_ids, kind="decoder", steps=2, max_minutes=10, lr=1e-3, loss="logits", reference_model=reference, progress=False)
    assert capped["stopped_by"] == "steps" and capped["steps"] == 2


@pytest.mark.parametrize("minutes", [0, -1.0, float("nan"), float("inf")])
def test_finetune_rejects_a_non_positive_budget(tiny_llama, llama_ids, minutes):
    SVDPass(SVDConfig(targets=LLAMA_TARGETS, rank=4)).run(tiny_llama)
    with pytest.raises(ValueError, match="max_minutes must be a finite number > 0"):
        finetune(tiny_llama, llama_ids, kind="decoder", max_minutes=minutes, progress=False)
    with pytest.raises(ValueError, match="steps or max_minutes"):
        finetune(tiny_llama, llama_ids, kind="decoder", progress=False)


def test_recipe_finetune_budget_is_validated():
    from optimum_lowrank.errors import RecipeError
    from optimum_lowrank.recipe import Recipe

    base = {"version": 1, "passes": [{"pass": "svd", "targets": ["re:.*_proj"], "rank": 2}]}
    assert Recipe.from_dict({**base, "finetune": {"max_minutes": 5, "loss": "logits"}}).finetune.max_minutes == 5
    for bad in ({"max_minutes": 0}, {"max_minutes": -2, "steps": 3}, {"lr": 1e-3}):
        with pytest.raises(RecipeError):
            Recipe.from_dict({**base, "finetune": bad})

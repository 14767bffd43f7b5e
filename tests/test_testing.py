"""The pass contract, run on every registered pass: built-ins and the example plugin."""

from __future__ import annotations

import pytest
from pydantic import Field
from torch import nn

from optimum_lowrank import CompressionPass, LayerReport, LowRankEmbedding, PassConfig
from optimum_lowrank.plugins import PassRegistry, get_plugin_manager
from optimum_lowrank.testing import check_pass_contract, targets_embeddings

REGISTRY = PassRegistry().collect(get_plugin_manager())
EMBEDDING_PASSES = [name for name in REGISTRY.names() if targets_embeddings(REGISTRY.get(name))]


def test_example_plugin_is_part_of_the_contract_run():
    assert "randomized_svd" in REGISTRY.names()


def test_every_embedding_pass_runs_the_tied_llama_clauses():
    assert set(EMBEDDING_PASSES) >= {"svd", "autoencoder_embedding", "tt_embedding", "fourier_embedding"}
    assert "randomized_svd" not in EMBEDDING_PASSES


@pytest.mark.parametrize("name", REGISTRY.names())
def test_pass_contract(name, tmp_path):
    result = check_pass_contract(REGISTRY.get(name), tmp_path)
    if REGISTRY.get(name).reduces_parameters:
        assert result.params_after < result.params_before
    else:  # token_downsampling saves compute and adds its predictors
        assert result.params_before < result.params_after <= 1.25 * result.params_before
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    if name in EMBEDDING_PASSES:  # the tied Llama: the head shares the compressed table, ORT matches on logits and present.*
        assert result.tied is not None and result.tied.params_after < result.tied.params_before
        assert result.tied.max_abs_diff is not None and result.tied.max_abs_diff <= 1e-4
    else:
        assert result.tied is None


def test_untied_head_is_a_dense_copy(tmp_path):
    options = {"targets": ["embeddings.word_embeddings"], "rank": 8, "tied_head": "untie"}
    result = check_pass_contract(REGISTRY.get("svd"), tmp_path, options=options)
    assert result.tied.params_after > result.tied.params_before  # the head keeps the whole dense table


class _HeadlessConfig(PassConfig):
    rank: int = Field(ge=1)


class _HeadlessPass(CompressionPass):
    """Factorizes an embedding but leaves a tied head on the old table: the contract must refuse it."""

    name = "headless"
    config_class = _HeadlessConfig
    target_types = (nn.Embedding,)
    example_options = {"targets": ["embeddings.word_embeddings"], "rank": 8}

    def apply(self, model, targets, context):
        reports = []
        for name, module in targets.items():
            layer = LowRankEmbedding.from_embedding(module, self.config.rank)
            model.set_submodule(name, layer)
            reports.append(LayerReport(
                name=name, module_type="Embedding", action="factorized", params_before=module.weight.numel(),
                params_after=sum(p.numel() for p in layer.parameters()), rank=self.config.rank,
            ))
        return reports


def test_contract_refuses_a_head_left_on_the_old_table():
    with pytest.raises(AssertionError, match=r"tied Llama, headless on model.embed_tokens: the output head Linear does not share"):
        check_pass_contract(_HeadlessPass)

"""The ``svd`` pass on tiny random BERT, GPT-2 (Conv1D) and Llama (tied embeddings)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.errors import PassError, TargetError
from optimum_lowrank.layers import LowRankEmbedding, LowRankHead, LowRankLinear
from optimum_lowrank.passes.svd import SVDConfig, SVDPass, choose_rank
from optimum_lowrank.pipeline import apply_passes
from optimum_lowrank.recipe import load_recipe


def run(model, **options):
    return SVDPass(SVDConfig(**options)).run(model)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"rank": 5}, 5),
        ({"rank_ratio": 0.25}, 8),  # 0.25 * min(32, 64)
        ({"compression_ratio": 2.0}, 10),  # floor(32*64 / (2 * 96))
    ],
)
def test_rank_options(options, expected):
    assert choose_rank(SVDConfig(targets=("x",), **options), (32, 64)) == expected


def test_energy_rank_keeps_requested_fraction():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = float((s**2).sum())
    config = SVDConfig(targets=("x",), energy=0.9)
    rank = choose_rank(config, (4, 4), s)
    assert float((s[:rank] ** 2).sum()) / total >= 0.9
    assert float((s[: rank - 1] ** 2).sum()) / total < 0.9


def test_linear_targets_are_factorized_and_report_counts(tiny_bert):
    before = count_parameters(tiny_bert)
    reports = run(tiny_bert, targets=["re:.*intermediate\\.dense"], rank=4)
    assert len(reports) == 2 and all(r.action == "factorized" and r.rank == 4 for r in reports)
    layer = tiny_bert.encoder.layer[1].intermediate.dense
    assert isinstance(layer, LowRankLinear)
    assert reports[0].params_before == 32 * 64 + 64 and reports[0].params_after == 4 * (32 + 64) + 64
    assert before - count_parameters(tiny_bert) == sum(r.params_before - r.params_after for r in reports)


def test_rank_that_would_grow_is_skipped_with_a_report_line(tiny_bert):
    reports = run(tiny_bert, targets=["encoder.layer.*.attention.self.query"], rank_ratio=1.0)
    assert all(r.action == "skipped" and "would not reduce" in r.note for r in reports)
    assert isinstance(tiny_bert.encoder.layer[0].attention.self.query, nn.Linear)


def test_explicit_rank_that_would_grow_is_refused(tiny_bert):
    with pytest.raises(PassError, match="rank 20 would not reduce a 32x32 layer"):
        run(tiny_bert, targets=["encoder.layer.0.attention.self.query"], rank=20)


def test_rank_above_min_dimension_is_refused(tiny_bert):
    with pytest.raises(PassError, match=r"rank 40 exceeds min\(out, in\) = 32"):
        run(tiny_bert, targets=["encoder.layer.0.intermediate.dense"], rank=40)


def test_target_matching_nothing_lists_candidates(tiny_bert):
    with pytest.raises(TargetError, match="'encoder.layer.9.*' matches no module of BertModel; .*include: embeddings.word_embeddings"):
        run(tiny_bert, targets=["encoder.layer.9.*"], rank=2)


def test_target_of_wrong_type_names_the_type(tiny_bert):
    with pytest.raises(TargetError, match="matches 1 module\\(s\\) of type BertLayer .* supports Linear, Conv1D, Embedding"):
        run(tiny_bert, targets=["encoder.layer.0"], rank=2)


def test_non_finite_weights_are_refused(tiny_bert):
    with torch.no_grad():
        tiny_bert.encoder.layer[0].intermediate.dense.weight[0, 0] = float("nan")
    with pytest.raises(PassError, match="NaN or inf"):
        run(tiny_bert, targets=["encoder.layer.0.intermediate.dense"], rank=2)


def test_gpt2_conv1d_full_rank_matches(tiny_gpt2):
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        expected = tiny_gpt2(ids).logits
    # rank 31 of a 32x128 Conv1D is a real factorization; check the identity on the full-rank SVD directly
    conv = tiny_gpt2.transformer.h[0].mlp.c_fc
    layer = LowRankLinear.from_linear(conv, 32)
    x = torch.randn(3, 32)
    assert_close(layer(x), conv(x), atol=1e-4, rtol=1e-4)
    reports = run(tiny_gpt2, targets=["transformer.h.*.mlp.c_fc"], rank=8)
    assert [r.module_type for r in reports] == ["Conv1D", "Conv1D"]
    with torch.no_grad():
        assert tiny_gpt2(ids).logits.shape == expected.shape


def test_tied_embedding_shares_factors_with_head_and_saves_memory(tiny_llama):
    before = count_parameters(tiny_llama)
    ids = torch.randint(0, 128, (1, 10))
    reports = run(tiny_llama, targets=["model.embed_tokens"], rank=8)
    emb, head = tiny_llama.model.embed_tokens, tiny_llama.lm_head
    assert isinstance(emb, LowRankEmbedding) and isinstance(head, LowRankHead) and head.embedding is emb
    assert tiny_llama.config.tie_word_embeddings is False
    saved = before - count_parameters(tiny_llama)
    assert saved == 128 * 32 - 8 * (128 + 32) == reports[0].params_before - reports[0].params_after
    assert "shares the compressed parameters" in reports[0].note
    hidden = torch.randn(1, 10, 32)
    assert_close(head(hidden), hidden @ emb.weight.t(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert tiny_llama(ids).logits.shape == (1, 10, 128)


def test_untie_keeps_a_dense_head(tiny_llama):
    original = tiny_llama.lm_head.weight.detach().clone()
    reports = run(tiny_llama, targets=["model.embed_tokens"], rank=8, tied_head="untie")
    assert isinstance(tiny_llama.lm_head, nn.Linear)
    assert_close(tiny_llama.lm_head.weight, original)
    assert reports[0].params_after == 8 * (128 + 32) + 128 * 32


def test_pass_error_leaves_callers_model_untouched(tiny_bert):
    recipe = load_recipe(
        {
            "version": 1,
            "passes": [
                {"pass": "svd", "targets": ["re:.*intermediate\\.dense"], "rank": 4},
                {"pass": "svd", "targets": ["encoder.layer.0.attention.self.query"], "rank": 31},
            ],
        }
    )
    state = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    with pytest.raises(PassError):
        apply_passes(tiny_bert, recipe, PassContext())
    assert isinstance(tiny_bert.encoder.layer[0].intermediate.dense, nn.Linear)
    for key, value in tiny_bert.state_dict().items():
        assert torch.equal(value, state[key])

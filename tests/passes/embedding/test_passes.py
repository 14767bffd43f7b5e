"""Embedding passes (autoencoder, tensor-train, Fourier): layers against the dense tables
they replace, tied heads on tiny Llama, bad inputs, ONNX parity and int8 quantization."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.testing import assert_close

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.errors import PassError, RecipeError, TargetError
from optimum_lowrank.layers import (
    AffineFactorHead,
    AutoencoderEmbedding,
    FourierEmbedding,
    MaterializedHead,
    TTEmbedding,
    TTMatrixEmbedding,
)
from optimum_lowrank.layers.fourier import fourier_mlp_params
from optimum_lowrank.linalg.tt import balanced_factors, batched_tt_svd, tt_params, tt_ranks, vocab_factors
from optimum_lowrank.passes.embedding.autoencoder import AutoencoderEmbeddingConfig, AutoencoderEmbeddingPass
from optimum_lowrank.passes.embedding.fourier import FourierEmbeddingConfig, FourierEmbeddingPass
from optimum_lowrank.passes.embedding.install import reconstruction_metrics
from optimum_lowrank.passes.embedding.training import COS_WEIGHT, POW_WEIGHT, TrainingOptions, alpha_at, direction_loss
from optimum_lowrank.passes.embedding.tt import TTEmbeddingConfig, TTEmbeddingPass
from optimum_lowrank.pipeline import apply_passes
from optimum_lowrank.recipe import load_recipe

QUIET = {"progress": False}


def autoencoder(model, **options):
    return AutoencoderEmbeddingPass(AutoencoderEmbeddingConfig(**QUIET, **options)).run(model)


def tt(model, **options):
    return TTEmbeddingPass(TTEmbeddingConfig(**QUIET, **options)).run(model)


def fourier(model, **options):
    return FourierEmbeddingPass(FourierEmbeddingConfig(**QUIET, **options)).run(model)


# --------------------------------------------------------------------------- loss and schedule


def test_direction_loss_matches_the_paper_formula():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    cos = torch.tensor([1 / math.sqrt(2), 1.0])
    diff = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    alpha = 0.5
    expected = COS_WEIGHT * (1 - cos).mean() + POW_WEIGHT * (diff + 1e-10).pow(alpha).mean()
    assert COS_WEIGHT == pytest.approx(0.9975 / 5) and POW_WEIGHT == pytest.approx(0.0025)
    assert_close(direction_loss(x_hat, x, alpha), expected)


def test_alpha_is_annealed_linearly_then_held():
    options = TrainingOptions()  # the paper's schedule: 1.0 -> 0.1 over 20 epochs, then 0.1
    assert alpha_at(0, options) == pytest.approx(1.0)
    assert alpha_at(10, options) == pytest.approx(0.55)
    assert [alpha_at(e, options) for e in (20, 25, 29)] == pytest.approx([0.1, 0.1, 0.1])


# --------------------------------------------------------------------------- TT layers


def test_factorizations():
    assert balanced_factors(384, 3) == (8, 8, 6)
    assert balanced_factors(576, 3) == (9, 8, 8)
    assert vocab_factors(30522, 3) == (32, 32, 30)
    assert tt_ranks((8, 8, 6), 100) == (1, 8, 6, 1)
    assert tt_params((8, 8, 6), (1, 2, 2, 1)) == 8 * 2 + 2 * 8 * 2 + 2 * 6
    with pytest.raises(PassError, match="cannot split 7 into 2 factors"):
        balanced_factors(7, 2)


def test_full_rank_tt_reconstructs_rows_exactly():
    table = nn.Embedding(50, 24)
    layer = TTEmbedding.from_weight(table.weight, (4, 3, 2), max_rank=100)
    assert layer.ranks == (1, 4, 2, 1)
    ids = torch.randint(0, 50, (3, 7))
    assert_close(layer(ids), table(ids), atol=1e-5, rtol=1e-5)
    assert_close(layer.weight, table.weight, atol=1e-5, rtol=1e-5)
    assert_close(layer.to_dense().weight, table.weight, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in layer.parameters()) == 50 * tt_params((4, 3, 2), layer.ranks)


def test_full_rank_tt_matrix_reconstructs_rows_exactly():
    table = nn.Embedding(50, 24)
    layer = TTMatrixEmbedding.from_weight(table.weight, (4, 4, 4), (4, 3, 2), max_rank=1000)
    ids = torch.randint(0, 50, (2, 9))
    assert_close(layer(ids), table(ids), atol=1e-5, rtol=1e-5)
    assert_close(layer.weight, table.weight, atol=1e-5, rtol=1e-5)


def test_batched_tt_svd_equals_tensorly_per_row_and_tt_matrix():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train, tensor_train_matrix

    weight = torch.randn(40, 24)
    layer = TTEmbedding.from_weight(weight, (4, 3, 2), max_rank=2)
    matrix = TTMatrixEmbedding.from_weight(weight, (4, 4, 4), (4, 3, 2), max_rank=3)
    padded = torch.cat([weight, weight.new_zeros(24, 24)])
    with tl.backend_context("pytorch"):
        for row in range(4):
            reference = tl.tt_to_tensor(tensor_train(weight[row].reshape(4, 3, 2), rank=[1, 2, 2, 1]))
            assert_close(layer.weight[row].detach(), reference.reshape(-1), atol=1e-5, rtol=1e-4)
        factors = tensor_train_matrix(padded.reshape(4, 4, 4, 4, 3, 2), rank=[1, 3, 3, 1])
        reference = tl.reshape(tl.tt_matrix_to_tensor(factors), (64, 24))
    assert [tuple(f.shape) for f in factors] == [tuple(matrix.core(k).shape) for k in range(3)]
    assert_close(matrix.weight.detach(), reference[:40], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tolerance", [0.1, 0.5, 0.8])
def test_tolerance_bounds_the_table_error(tolerance):
    weight = torch.randn(60, 48)
    cores = batched_tt_svd(weight.reshape(60, 4, 4, 3), tolerance=tolerance)
    layer = TTEmbedding(60, 48, (4, 4, 3), (1,) + tuple(c.shape[-1] for c in cores)).load_cores(cores)
    error = float((layer.weight.detach() - weight).norm() / weight.norm())
    assert error <= tolerance + 1e-5


# --------------------------------------------------------------------------- autoencoder / Fourier layers and heads


def test_autoencoder_layer_is_decoder_of_latents_and_head_matches_table():
    weight = torch.randn(30, 16)
    encoder, decoder = nn.Linear(16, 4), nn.Linear(4, 16)
    layer = AutoencoderEmbedding.from_autoencoder(weight, encoder, decoder)
    ids = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        assert_close(layer(ids), decoder(encoder(weight[ids])), atol=1e-5, rtol=1e-5)
        hidden = torch.randn(2, 5, 16)
        bias = torch.randn(30)
        assert_close(AffineFactorHead(layer, bias)(hidden), hidden @ layer.weight.t() + bias, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in nn.ModuleList([layer, AffineFactorHead(layer)]).parameters()) == 30 * 4 + 4 * 16 + 16


def test_fourier_features_follow_the_paper():
    layer = FourierEmbedding(11, 6, hidden_dim=4)
    t = layer.features(torch.tensor([0, 5, 10]))
    x = torch.tensor([-1.0, 0.0, 1.0])
    for i in range(6):
        f = (i // 2 + 1) * math.pi * x
        assert_close(t[:, i], torch.sin(f) if i % 2 == 0 else torch.cos(f), atol=1e-6, rtol=0)
    out = layer(torch.tensor([3, 4]))
    e = layer._mlp(layer.features(torch.tensor([3, 4]))) + layer.features(torch.tensor([3, 4]))
    assert_close(out, e / e.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt(), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in layer.parameters()) == fourier_mlp_params(6, 4, "geglu")
    with torch.no_grad():
        hidden = torch.randn(3, 6)
        assert_close(MaterializedHead(layer)(hidden), hidden @ layer.weight.t(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- passes on tiny BERT


@pytest.mark.parametrize("init", ["svd", "pca"])
def test_autoencoder_pass_reports_the_error_its_layer_has(tiny_bert, init):
    original = tiny_bert.embeddings.word_embeddings.weight.detach().clone()
    before = count_parameters(tiny_bert)
    (report,) = autoencoder(tiny_bert, targets=["embeddings.word_embeddings"], compression_ratio=4, epochs=3, init=init)
    layer = tiny_bert.embeddings.word_embeddings
    k = math.floor(120 * 32 / (4 * (120 + 32)))
    assert isinstance(layer, AutoencoderEmbedding) and layer.latent_dim == k == report.rank
    assert report.params_after == 120 * k + k * 32 + 32 == count_parameters(layer)
    assert before - count_parameters(tiny_bert) == report.params_before - report.params_after
    recomputed = reconstruction_metrics(lambda index: layer.decoder(layer.latents(index)), original)
    for key in ("relative_error", "mean_cosine", "min_cosine"):
        assert report.metrics[key] == pytest.approx(recomputed[key], abs=1e-6)
    # the initialisation is the truncated SVD (Eckart-Young error) or the centred PCA of the rows
    s = torch.linalg.svdvals(original - original.mean(0) if init == "pca" else original)
    expected = float(s[k:].square().sum().sqrt() / original.norm())
    assert report.metrics["init_relative_error"] == pytest.approx(expected, abs=1e-4)


def test_tt_pass_without_training_keeps_the_tt_svd(tiny_bert):
    (report,) = tt(tiny_bert, targets=["embeddings.word_embeddings"], max_rank=2, epochs=0)
    layer = tiny_bert.embeddings.word_embeddings
    assert isinstance(layer, TTEmbedding) and layer.shape == (4, 4, 2) and layer.ranks == (1, 2, 2, 1)
    assert report.metrics["relative_error"] == pytest.approx(report.metrics["init_relative_error"])
    assert report.params_after == 120 * (4 * 2 + 2 * 4 * 2 + 2 * 2)


@pytest.mark.parametrize("mode", ["tt", "tt_matrix"])
def test_training_improves_the_direction_of_tt_rows(tiny_bert, mode):
    (report,) = tt(tiny_bert, targets=["embeddings.word_embeddings"], mode=mode, max_rank=1, epochs=15, batch_size=32)
    assert report.metrics["mean_cosine"] > report.metrics["init_mean_cosine"]


def test_tt_compression_ratio_reaches_the_ratio_and_refuses_the_unreachable(tiny_bert):
    with pytest.raises(PassError, match=r"out of reach .* at most 3.2x"):  # d = 32 = 2^5: at best 10 numbers per row
        tt(tiny_bert, targets=["embeddings.word_embeddings"], compression_ratio=40, epochs=0)
    (report,) = tt(tiny_bert, targets=["embeddings.word_embeddings"], compression_ratio=3, epochs=0)
    assert report.params_before / report.params_after >= 3
    assert "layout search" in report.note
    (report,) = tt(tiny_bert, targets=["embeddings.position_embeddings"], mode="tt_matrix", compression_ratio=10, epochs=0)
    assert report.params_before / report.params_after >= 10


def test_fourier_pass_replaces_the_table(tiny_bert):
    (report,) = fourier(tiny_bert, targets=["embeddings.word_embeddings"], hidden_dim=4, epochs=2)
    layer = tiny_bert.embeddings.word_embeddings
    assert isinstance(layer, FourierEmbedding)
    assert report.params_after == fourier_mlp_params(32, 4, "geglu") == count_parameters(layer)
    assert -1 <= report.metrics["mean_cosine"] <= 1


# --------------------------------------------------------------------------- tied heads on tiny Llama


@pytest.mark.parametrize(
    ("run", "options", "head_type"),
    [
        (autoencoder, {"latent_dim": 8}, AffineFactorHead),
        (tt, {"mode": "tt_matrix", "max_rank": 4}, MaterializedHead),
        (tt, {"max_rank": 2}, MaterializedHead),
        (fourier, {"hidden_dim": 8}, MaterializedHead),
    ],
)
def test_tied_head_shares_the_compressed_parameters(tiny_llama, run, options, head_type):
    before = count_parameters(tiny_llama)
    (report,) = run(tiny_llama, targets=["model.embed_tokens"], epochs=2, **options)
    emb, head = tiny_llama.model.embed_tokens, tiny_llama.lm_head
    assert isinstance(head, head_type) and head.embedding is emb
    assert tiny_llama.config.tie_word_embeddings is False
    assert before - count_parameters(tiny_llama) == report.params_before - report.params_after > 0
    assert "shares the compressed parameters" in report.note
    with torch.no_grad():
        hidden = torch.randn(1, 6, 32)
        assert_close(head(hidden), hidden @ emb.weight.t(), atol=1e-4, rtol=1e-4)
        assert tiny_llama(torch.randint(0, 128, (1, 6))).logits.shape == (1, 6, 128)


def test_untie_keeps_a_dense_head(tiny_llama):
    original = tiny_llama.lm_head.weight.detach().clone()
    (report,) = tt(tiny_llama, targets=["model.embed_tokens"], max_rank=2, epochs=0, tied_head="untie")
    assert type(tiny_llama.lm_head) is nn.Linear
    assert_close(tiny_llama.lm_head.weight, original)
    assert report.params_after == count_parameters(tiny_llama.model.embed_tokens) + 128 * 32
    assert "untied" in report.note


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("run", "options", "error", "match"),
    [
        (autoencoder, {"latent_dim": 32}, PassError, "latent_dim 32 must be smaller than embedding_dim 32"),
        (autoencoder, {"latent_dim": 40}, PassError, "must be smaller than embedding_dim"),
        (tt, {"max_rank": 2, "reshape": [4, 4, 3]}, PassError, r"reshape \[4, 4, 3\] has product 48, not embedding_dim 32"),
        (tt, {"mode": "tt_matrix", "max_rank": 2, "vocab_shape": [4, 4, 4]}, PassError, "covers 64 ids, fewer than the vocabulary 120"),
        (tt, {"max_rank": 2, "num_cores": 6}, PassError, "cannot split 32 into 6 factors"),
    ],
)
def test_bad_options_are_refused_and_nothing_changes(tiny_bert, run, options, error, match):
    table = tiny_bert.embeddings.word_embeddings
    with pytest.raises(error, match=match):
        run(tiny_bert, targets=["embeddings.word_embeddings"], **options)
    assert tiny_bert.embeddings.word_embeddings is table


@pytest.mark.parametrize(
    ("config_class", "options"),
    [
        (AutoencoderEmbeddingConfig, {"latent_dim": 0}),
        (AutoencoderEmbeddingConfig, {"latent_dim": 4, "compression_ratio": 2}),
        (TTEmbeddingConfig, {"tolerance": 0.0}),
        (TTEmbeddingConfig, {"tolerance": 1.0}),
        (TTEmbeddingConfig, {"max_rank": 2, "tolerance": 0.5}),
        (TTEmbeddingConfig, {"max_rank": 2, "vocab_shape": [4, 4]}),  # vocab_shape needs tt_matrix
        (FourierEmbeddingConfig, {}),
        (FourierEmbeddingConfig, {"mlp": "linear", "hidden_dim": 4}),
    ],
)
def test_invalid_configs_are_rejected(config_class, options):
    with pytest.raises(ValidationError):
        config_class(targets=["x"], **options)


def test_recipe_errors_name_the_field():
    with pytest.raises(RecipeError, match="tolerance"):
        load_recipe({"version": 1, "passes": [{"pass": "tt_embedding", "targets": ["x"], "tolerance": 1.5}]})
    with pytest.raises(RecipeError, match="unknown key 'rank'"):
        load_recipe({"version": 1, "passes": [{"pass": "autoencoder_embedding", "targets": ["x"], "rank": 4}]})


@pytest.mark.parametrize("run", [autoencoder, tt, fourier])
def test_target_that_is_not_an_embedding(tiny_bert, run):
    with pytest.raises(TargetError, match="supports Embedding"):
        run(tiny_bert, targets=["encoder.layer.0.intermediate.dense"], compression_ratio=2)


@pytest.mark.parametrize("run", [autoencoder, tt, fourier])
def test_one_token_vocabulary_and_non_finite_tables_are_refused(run):
    model = nn.Module()
    model.emb = nn.Embedding(1, 16)
    with pytest.raises(PassError, match="vocabulary of 1 token"):
        run(model, targets=["emb"], compression_ratio=2)
    model.emb = nn.Embedding(40, 16)
    with torch.no_grad():
        model.emb.weight[3, 2] = float("inf")
    with pytest.raises(PassError, match="NaN or inf"):
        run(model, targets=["emb"], compression_ratio=2)
    assert isinstance(model.emb, nn.Embedding)


def test_pipeline_error_leaves_the_callers_model_untouched(tiny_bert):
    recipe = load_recipe(
        {
            "version": 1,
            "passes": [
                {"pass": "tt_embedding", "targets": ["embeddings.word_embeddings"], "max_rank": 2, "epochs": 0, "progress": False},
                {"pass": "autoencoder_embedding", "targets": ["embeddings.position_embeddings"], "latent_dim": 64},
            ],
        }
    )
    state = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    with pytest.raises(PassError):
        apply_passes(tiny_bert, recipe, PassContext())
    assert type(tiny_bert.embeddings.word_embeddings) is nn.Embedding
    for key, value in tiny_bert.state_dict().items():
        assert torch.equal(value, state[key])


# --------------------------------------------------------------------------- ONNX export, parity, int8


def _export_and_quantize(model, tmp_path):
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
    from optimum_lowrank.exporters.parity import check_parity
    from optimum_lowrank.exporters.quantize import quantize_onnx

    fp32 = export_onnx(model, tmp_path / "onnx", onnx_task(model))
    parity = check_parity(model, fp32, atol=1e-4, seq_lengths=(8, 16))
    assert parity.passed, parity
    quantized = quantize_onnx(fp32, tmp_path / "onnx" / "model_quantized.onnx", "dynamic_int8")
    return fp32, quantized


def _op_types(path):
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def test_encoder_export_parity_and_int8(tiny_bert, tmp_path):
    from optimum_lowrank.exporters.parity import check_parity

    tt(tiny_bert, targets=["embeddings.word_embeddings"], mode="tt_matrix", max_rank=4, epochs=1)
    tt(tiny_bert, targets=["embeddings.position_embeddings"], max_rank=2, epochs=1)
    fp32, quantized = _export_and_quantize(tiny_bert, tmp_path)
    ops = _op_types(fp32)
    assert "Einsum" not in ops and {"Gather", "MatMul", "Mod", "Div"} <= ops
    assert "DequantizeLinear" in _op_types(quantized)  # the core tables became int8
    assert check_parity(tiny_bert, quantized, atol=0.5, seq_lengths=(8,)).max_abs_diff < 0.5


def test_autoencoder_and_fourier_encoder_export(tiny_bert, tmp_path):
    autoencoder(tiny_bert, targets=["embeddings.word_embeddings"], latent_dim=8, epochs=1)
    fourier(tiny_bert, targets=["embeddings.position_embeddings"], hidden_dim=8, epochs=1)
    _, quantized = _export_and_quantize(tiny_bert, tmp_path)
    assert "Sin" in _op_types(quantized)


@pytest.mark.parametrize(
    ("run", "options"),
    [(autoencoder, {"latent_dim": 8}), (tt, {"mode": "tt_matrix", "max_rank": 4}), (fourier, {"hidden_dim": 8})],
    ids=["autoencoder", "tt_matrix", "fourier"],
)
def test_tied_decoder_export_parity_and_int8(tiny_llama, tmp_path, run, options):
    import onnx

    from optimum_lowrank.exporters.parity import check_parity

    run(tiny_llama, targets=["model.embed_tokens"], epochs=1, **options)
    fp32, quantized = _export_and_quantize(tiny_llama, tmp_path)
    assert check_parity(tiny_llama, quantized, atol=1.0, seq_lengths=(8,)).passed
    # the head shares the compressed parameters in the graph too: no constant-folded copy of the
    # table or of its factors/cores (only the small decoder weight of the autoencoder, d x k)
    stored = sum(math.prod(t.dims) for t in onnx.load(str(fp32), load_external_data=False).graph.initializer)
    assert stored - count_parameters(tiny_llama) <= 32 * 8

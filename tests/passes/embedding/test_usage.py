"""Usage-aware embedding compression: token counts, row weights, hybrid tables, refinement, vocabulary report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.layers.autoencoder import AffineFactorHead
from optimum_lowrank.layers.hybrid import HybridEmbedding, HybridHead, frequency_slots
from optimum_lowrank.layers.lowrank import LowRankEmbedding, LowRankHead
from optimum_lowrank.linalg.svd import split_factors, weighted_factors, weighted_svd
from optimum_lowrank.passes.embedding.autoencoder import AutoencoderEmbeddingPass
from optimum_lowrank.passes.embedding.fourier import FourierEmbeddingPass
from optimum_lowrank.passes.embedding.tt import TTEmbeddingPass
from optimum_lowrank.passes.svd import SVDPass
from optimum_lowrank.plugins import PassRegistry
from optimum_lowrank.recipe import load_recipe
from optimum_lowrank.testing import check_pass_contract, tiny_context
from optimum_lowrank.vocab import check_vocabulary, count_ids, row_weights, token_counts, usage_report

EMBEDDING_PASSES = {
    "svd": (SVDPass, {"compression_ratio": 4}),
    "autoencoder_embedding": (AutoencoderEmbeddingPass, {"compression_ratio": 4, "epochs": 2}),
    "tt_embedding": (TTEmbeddingPass, {"mode": "tt_matrix", "max_rank": 8, "epochs": 2}),
    "fourier_embedding": (FourierEmbeddingPass, {"compression_ratio": 4, "epochs": 2}),
}


def zipf_context(vocab: int, num_samples: int = 8, seq_len: int = 32, kind: str = "encoder", seed: int = 0) -> PassContext:
    """Calibration windows whose ids follow a Zipf law (id 0 most frequent), like real text."""
    generator = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1).double()
    ids = torch.multinomial(probs / probs.sum(), num_samples * seq_len, replacement=True, generator=generator)
    ids = ids.reshape(num_samples, seq_len)
    return PassContext(kind=kind, calibration_loader=lambda: ids, calibration_description="zipf ids", seed=seed)


# --------------------------------------------------------------------------- statistics


def test_count_ids_and_row_weights():
    counts = count_ids(torch.tensor([[0, 0, 3], [3, 3, 1]]), 5).counts
    assert counts.tolist() == [2, 1, 0, 3, 0]
    weights = row_weights(counts, 1.0)
    assert weights.mean().item() == pytest.approx(1.0)
    assert torch.allclose(weights / weights[2], (counts + 1).float())
    assert torch.allclose(row_weights(counts, 0.0), torch.ones(5))
    with pytest.raises(DataError, match="outside a vocabulary"):
        count_ids(torch.tensor([0, 7]), 5)
    with pytest.raises(DataError, match="no tokens"):
        count_ids(torch.zeros(0, dtype=torch.long), 5)


def test_check_vocabulary_names_both_sizes():
    check_vocabulary(30522, 30522)
    check_vocabulary(49100, 49152)  # a table padded to a multiple of 64 is fine
    with pytest.raises(DataError, match=r"30,522 ids.*49,152 rows"):
        check_vocabulary(30522, 49152)
    with pytest.raises(DataError, match="does not match"):
        check_vocabulary(1001, 1000)


def test_token_counts_of_real_tokenizer_are_cached(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from optimum_lowrank.models import resolve_alias

    monkeypatch.setenv("OPTIMUM_LOWRANK_CACHE", str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(resolve_alias("minilm"))
    text = "the cat sat on the mat . the end"
    first = token_counts(tokenizer, text, "toy text")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    the = tokenizer.convert_tokens_to_ids("the")
    assert first.counts.shape == (len(tokenizer),) and first.counts[the] == 3
    assert first.counts[tokenizer.cls_token_id] == first.counts[tokenizer.sep_token_id] == 3  # special: most frequent
    assert first.total == len(ids) + 3 * len(tokenizer.all_special_ids)
    cached = list((tmp_path / "token_counts").glob("*.pt"))
    assert len(cached) == 1
    from optimum_lowrank.vocab import _write_cached_counts

    raw = torch.load(cached[0], weights_only=True)["counts"]
    _write_cached_counts(cached[0], raw * 2)  # a valid entry: the second call must read the cache, not re-tokenize
    assert token_counts(tokenizer, text, "toy text").counts[the] == 6
    with pytest.raises(DataError, match="produces no tokens"):
        token_counts(tokenizer, "   \n ", "blank text", cache=False)


def test_usage_report_groups_and_exact_share():
    table = torch.randn(6, 4)
    approx = table.clone()
    approx[4:] = -approx[4:]  # unseen rows wrong, the rest exact
    counts = torch.tensor([10.0, 5, 3, 1, 0, 0])
    exact = torch.tensor([True, True, False, False, False, False])
    report = usage_report(table, approx, counts, exact, coverage=0.7)
    assert report["calibration_tokens"] == 19 and report["seen_rows"] == 4
    assert report["exact_token_share"] == pytest.approx(15 / 19)
    assert report["frequent_rows"] == 2  # 10 + 5 of 19 tokens >= 70%
    assert report["frequent_cosine"] == pytest.approx(1.0) and report["unseen_cosine"] == pytest.approx(-1.0)
    assert report["token_weighted_cosine"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- weighted SVD


def test_weighted_svd_with_uniform_weights_is_plain_svd():
    table = torch.randn(50, 12)
    a, b = weighted_factors(table, *weighted_svd(table, torch.ones(50))[1:], 5)
    a0, b0 = split_factors(*torch.linalg.svd(table, full_matrices=False), 5)
    assert torch.allclose(a @ b, a0 @ b0, atol=1e-5)


def test_weighted_svd_lowers_the_weighted_error():
    table = torch.randn(200, 16)
    weights = row_weights((1000 / torch.arange(1, 201)).floor().double(), 1.0)  # Zipf-like counts

    def weighted_error(a, b):
        return float((weights[:, None] * (table - a @ b).square()).sum())

    weighted = weighted_factors(table, *weighted_svd(table, weights)[1:], 4)
    plain = split_factors(*torch.linalg.svd(table, full_matrices=False), 4)
    assert weighted_error(*weighted) < 0.9 * weighted_error(*plain)  # the optimum of the weighted problem


# --------------------------------------------------------------------------- hybrid layer


def _hybrid(vocab: int = 40, dim: int = 8, keep: int = 6) -> tuple[HybridEmbedding, torch.Tensor, torch.Tensor]:
    table = torch.randn(vocab, dim)
    counts = torch.randint(0, 50, (vocab,)).double()
    kept, rest = frequency_slots(counts, keep)
    inner = LowRankEmbedding(vocab - keep, dim, 3)
    return HybridEmbedding.from_ids(table[kept], kept, rest, inner), table, kept


def test_hybrid_lookup_exact_rows_and_compressed_rows():
    layer, table, kept = _hybrid()
    ids = torch.arange(40)
    out = layer(ids)
    assert torch.equal(out[kept], table[kept])
    slot = layer.slot.long()
    rest_ids = torch.tensor([p for p in range(40) if p not in set(kept.tolist())])
    assert torch.allclose(out[rest_ids], layer.rest(slot[rest_ids] - 6), atol=1e-6)
    assert torch.allclose(layer.weight, out, atol=1e-6)
    assert torch.allclose(layer(ids.reshape(5, 8)), out.reshape(5, 8, -1), atol=1e-6)


def test_hybrid_head_matches_the_table():
    layer, _, _ = _hybrid()
    bias = torch.randn(40)
    head = HybridHead(layer, LowRankHead(layer.rest), bias)
    hidden = torch.randn(2, 3, 8)
    assert torch.allclose(head(hidden), hidden @ layer.weight.t() + bias, atol=1e-5)


def test_frequency_slots_and_bad_slot():
    kept, rest = frequency_slots(torch.tensor([1.0, 5, 5, 0]), 2)
    assert kept.tolist() == [1, 2] and rest.tolist() == [0, 3]  # ties keep id order
    with pytest.raises(PassError, match=r"keep_top_k must be in \[0, 3\]"):
        frequency_slots(torch.ones(4), 4)
    with pytest.raises(PassError, match="permutation"):
        HybridEmbedding(torch.zeros(1, 4), LowRankEmbedding(3, 4, 2), torch.tensor([0, 0, 1, 2]))


# --------------------------------------------------------------------------- the passes


@pytest.mark.parametrize("name", list(EMBEDDING_PASSES))
def test_hybrid_contract_and_export_parity(name, tmp_path):
    pass_class, options = EMBEDDING_PASSES[name]
    result = check_pass_contract(
        pass_class, tmp_path, options={"targets": ["embeddings.word_embeddings"], **options, "keep_top_k": 50}
    )
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4


@pytest.mark.parametrize("name", list(EMBEDDING_PASSES))
def test_hybrid_keeps_frequent_rows_exact_and_meets_the_ratio(name, tiny_bert):
    pass_class, options = EMBEDDING_PASSES[name]
    context = zipf_context(120)
    original = tiny_bert.embeddings.word_embeddings.weight.detach().clone()
    options = {"targets": ["embeddings.word_embeddings"], **options, "keep_top_k": 10}
    if "compression_ratio" in options:
        options["compression_ratio"] = 2.5
    [report] = pass_class(options).run(tiny_bert, context)
    layer = tiny_bert.embeddings.word_embeddings
    assert isinstance(layer, HybridEmbedding) and layer.keep_top_k == 10
    counts = context.token_counts(120).counts
    top = torch.sort(counts, descending=True, stable=True).indices[:10]
    with torch.no_grad():
        assert torch.equal(layer(top), original[top])
    assert report.metrics["exact_rows"] == 10
    assert report.metrics["exact_token_share"] == pytest.approx(float(counts[top].sum() / counts.sum()))
    assert report.params_after == count_parameters(layer) + 120  # the int32 index counts as V
    if name != "tt_embedding":  # given a ratio, the whole layer (exact rows + index included) meets it
        assert report.params_before / report.params_after >= 2.5


def test_frequency_weighting_favours_frequent_rows(tiny_bert):
    context = zipf_context(120, num_samples=32)
    reports = {}
    for weighting in ("none", "frequency"):
        model = copy.deepcopy(tiny_bert)
        [reports[weighting]] = SVDPass(
            {"targets": ["embeddings.word_embeddings"], "rank": 4, "row_weighting": weighting}
        ).run(model, context)
        top = torch.sort(context.token_counts(120).counts, descending=True, stable=True).indices[:10]
        with torch.no_grad():
            table, approx = tiny_bert.embeddings.word_embeddings.weight[top], model.embeddings.word_embeddings(top)
        reports[weighting].metrics["top10_error"] = float((approx - table).norm() / table.norm())
    assert reports["frequency"].metrics["top10_error"] < 0.8 * reports["none"].metrics["top10_error"]
    assert reports["frequency"].metrics["token_weighted_cosine"] > reports["none"].metrics["token_weighted_cosine"]
    assert "weighted by (count + 1)^1" in reports["frequency"].note


def test_weighting_without_calibration_is_uniform_and_says_so(tiny_bert):
    [report] = SVDPass({"targets": ["embeddings.word_embeddings"], "rank": 4}).run(copy.deepcopy(tiny_bert), PassContext())
    assert "no calibration data: rows weighted uniformly" in report.note
    with pytest.raises(PassError, match="keep_top_k needs calibration text"):
        SVDPass({"targets": ["embeddings.word_embeddings"], "rank": 4, "keep_top_k": 3}).run(tiny_bert, PassContext())


def test_tied_decoder_hybrid_head_shares_parameters(tiny_llama, tmp_path):
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
    from optimum_lowrank.exporters.parity import check_parity

    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        before = tiny_llama(input_ids=ids).logits
    [report] = SVDPass({"targets": ["model.embed_tokens"], "rank": 12, "keep_top_k": 16}).run(
        tiny_llama, zipf_context(128, kind="decoder")
    )
    emb, head = tiny_llama.model.embed_tokens, tiny_llama.lm_head
    assert isinstance(head, HybridHead) and head.embedding is emb and isinstance(head.rest_head, LowRankHead)
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids).logits
        hidden = tiny_llama.model(input_ids=ids).last_hidden_state
    assert torch.allclose(logits, hidden @ emb.weight.t(), atol=1e-5)
    assert not torch.allclose(logits, before, atol=1e-3)
    path = export_onnx(tiny_llama, tmp_path / "llama", onnx_task(tiny_llama))
    parity = check_parity(tiny_llama, path, atol=1e-4, seq_lengths=(8,), vocab_size=128)
    assert parity.passed, parity.max_abs_diff


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"rank": 4, "keep_top_k": 120}, PassError, r"keep_top_k 120 must be below the vocabulary size 120 \(valid: 0..119\)"),
        ({"compression_ratio": 4, "keep_top_k": 40}, PassError, r"use keep_top_k <= \d+"),
    ],
)
def test_bad_keep_top_k_is_refused_and_nothing_is_lost(options, error, match, tiny_bert):
    from optimum_lowrank.pipeline import apply_passes

    registry = PassRegistry()
    registry(SVDPass)
    recipe = load_recipe({"version": 1, "passes": [{"pass": "svd", "targets": ["embeddings.word_embeddings"], **options}]}, registry)
    state = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    with pytest.raises(error, match=match):
        apply_passes(tiny_bert, recipe, zipf_context(120), registry)
    assert all(torch.equal(v, state[k]) for k, v in tiny_bert.state_dict().items())
    assert isinstance(tiny_bert.embeddings.word_embeddings, nn.Embedding)


def test_negative_keep_top_k_and_budget_combination_are_recipe_errors():
    from optimum_lowrank.errors import RecipeError

    registry = PassRegistry()
    registry(SVDPass)
    for entry, match in (
        ({"rank": 4, "keep_top_k": -1}, "keep_top_k"),
        ({"target_params_ratio": 0.5, "keep_top_k": 3}, "cannot be combined with target_params_ratio"),
        ({"rank": 4, "weight_exponent": 3}, "weight_exponent"),
    ):
        with pytest.raises(RecipeError, match=match):
            load_recipe({"version": 1, "passes": [{"pass": "svd", "targets": ["x"], **entry}]}, registry)


def test_calibration_with_no_tokens_and_mismatched_tokenizer(tiny_bert):
    from optimum_lowrank.vocab import TokenCounts

    empty = PassContext(token_counts_loader=lambda: (_ for _ in ()).throw(DataError("calibration text: the text produces no tokens")))
    with pytest.raises(DataError, match="produces no tokens"):
        SVDPass({"targets": ["embeddings.word_embeddings"], "rank": 4}).run(tiny_bert, empty)
    wrong = PassContext(token_counts_loader=lambda: TokenCounts(torch.ones(30522, dtype=torch.float64), "MiniLM tokenizer"))
    with pytest.raises(DataError, match=r"30,522 ids\) does not match embeddings.word_embeddings \(120x32\) with 120 rows"):
        SVDPass({"targets": ["embeddings.word_embeddings"], "rank": 4}).run(tiny_bert, wrong)
    assert isinstance(tiny_bert.embeddings.word_embeddings, nn.Embedding)
    # unweighted, without keep_top_k, the counts only feed the report: the pass runs and says why there is none
    [report] = SVDPass({"targets": ["embeddings.word_embeddings"], "rank": 4, "row_weighting": "none"}).run(tiny_bert, wrong)
    assert "no vocabulary report" in report.note and "exact_rows" not in report.metrics


# --------------------------------------------------------------------------- refinement


def test_refinement_lowers_the_held_out_loss_and_trains_only_the_embedding(tiny_bert):
    context = zipf_context(120, num_samples=16, seq_len=16)
    reference = type(tiny_bert)(tiny_bert.config).eval()
    reference.load_state_dict(tiny_bert.state_dict())
    frozen = {k: v.clone() for k, v in tiny_bert.state_dict().items() if "word_embeddings" not in k}
    # a random autoencoder (no row training) leaves the refinement room to improve
    options = {
        "targets": ["embeddings.word_embeddings"], "latent_dim": 8, "init": "random", "epochs": 0,
        "refine": {"steps": 40, "lr": 1e-2, "eval_every": 10, "progress": False},
    }
    [report] = AutoencoderEmbeddingPass(options).run(tiny_bert, context)
    m = report.metrics
    assert m["refine_loss_after"] < 0.8 * m["refine_loss_before"]
    assert m["refine_holdout_windows"] == 2 and m["refine_train_windows"] == 14
    assert all(torch.equal(v, frozen[k]) for k, v in tiny_bert.state_dict().items() if k in frozen)
    assert all(p.requires_grad for p in tiny_bert.parameters())
    held = context.calibration_ids[-2:]
    with torch.no_grad():
        ref, out = reference(input_ids=held).last_hidden_state, tiny_bert(input_ids=held).last_hidden_state
    relative = float((out - ref).square().mean() / ref.square().mean())
    assert relative == pytest.approx(m["refine_loss_after"], rel=1e-3)


def test_refinement_of_a_tied_decoder_uses_logits(tiny_llama):
    options = {
        "targets": ["model.embed_tokens"], "compression_ratio": 3, "init": "random", "epochs": 0,
        "refine": {"steps": 20, "lr": 1e-2, "eval_every": 5, "progress": False},
    }
    [report] = AutoencoderEmbeddingPass(options).run(tiny_llama, zipf_context(128, num_samples=8, seq_len=16, kind="decoder"))
    assert report.metrics["refine_loss_after"] < 0.9 * report.metrics["refine_loss_before"]
    assert isinstance(tiny_llama.lm_head, AffineFactorHead) and tiny_llama.lm_head.embedding is tiny_llama.model.embed_tokens


def test_non_finite_refinement_loss_restores_and_raises(tiny_bert, monkeypatch):
    import optimum_lowrank.finetune as finetune

    real = finetune.make_loss

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls = {"n": 0}

        def wrapped(ids):
            calls["n"] += 1
            value = loss(ids)
            return value * float("nan") if calls["n"] > 2 else value

        return wrapped

    monkeypatch.setattr(finetune, "make_loss", poisoned)
    options = {"targets": ["embeddings.word_embeddings"], "rank": 4, "refine": {"steps": 5, "progress": False}}
    with pytest.raises(PassError, match="non-finite loss"):
        SVDPass(options).run(tiny_bert, zipf_context(120))


def test_refinement_needs_two_windows(tiny_bert):
    options = {"targets": ["embeddings.word_embeddings"], "rank": 4, "refine": {"steps": 5, "progress": False}}
    with pytest.raises(DataError, match="at least 2 calibration windows"):
        SVDPass(options).run(tiny_bert, tiny_context(120, num_samples=1))


def test_refinement_windows_are_cut_and_framed():
    from types import SimpleNamespace

    from optimum_lowrank.passes.embedding.refine import RefineConfig, refinement_windows

    ids = torch.arange(2 * 12).reshape(2, 12) + 10
    bert = SimpleNamespace(cls_token_id=1, sep_token_id=2, bos_token_id=None)
    out = refinement_windows(ids, bert, "encoder", RefineConfig(seq_len=6))
    assert out.shape == (4, 6)
    assert out[:, 0].tolist() == [1] * 4 and out[:, -1].tolist() == [2] * 4
    assert out[1, 1:-1].tolist() == [16, 17, 18, 19]
    llama = SimpleNamespace(cls_token_id=None, sep_token_id=None, bos_token_id=0)
    out = refinement_windows(ids, llama, "decoder", RefineConfig())
    assert out[:, 0].tolist() == [0, 0] and out[0, 1:].tolist() == list(range(10, 21))
    assert torch.equal(refinement_windows(ids, bert, "encoder", RefineConfig(frame=False)), ids)
    assert torch.equal(refinement_windows(ids, None, "encoder", RefineConfig()), ids)


def test_tsv_columns_as_calibration_text(tmp_path):
    from optimum_lowrank.data import load_text

    table = tmp_path / "pairs.tsv"
    table.write_text("genre\tid\tfirst\tsecond\nnews\t1\tA cat sat.\tThe cat sat.\nshort\trow\nforum\t2\tHello there.\t\n")
    text, description = load_text(f"tsv:{table}:2,3:header")
    assert text.splitlines() == ["A cat sat.", "The cat sat.", "Hello there."]
    assert "columns 2,3 of pairs.tsv" in description
    with pytest.raises(DataError, match="0-based integers"):
        load_text(f"tsv:{table}:x")
    with pytest.raises(DataError, match="hold no text"):
        load_text(f"tsv:{table}:9")
    with pytest.raises(DataError, match="does not exist"):
        load_text(f"tsv:{tmp_path / 'missing.tsv'}:1")

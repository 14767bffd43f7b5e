"""The optimize() pipeline: bad input stops before anything is written; the gate; the real MiniLM end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from optimum_lowrank import optimize
from optimum_lowrank.cli import main
from optimum_lowrank.errors import AccuracyError, DataError, ModelLoadError, OutputExistsError, TargetError
from optimum_lowrank.models import load_model
from tests.helpers import LLAMA_TARGETS, WordTokenizer


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


@pytest.fixture
def small_bert(minilm):
    """A random 2-layer BERT with MiniLM's vocabulary, so MiniLM's tokenizer fits it."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    return BertModel(config).eval()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


def test_gate_failure_raises_with_report_and_writes_nothing(small_bert, minilm, tmp_path):
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": ["re:.*(intermediate|output|query|key|value)\\.dense|.*(query|key|value)"], "rank": 1}],
        "accuracy": {"metric": "cosine_agreement", "min_cosine": 0.999, "num_samples": 4},
        "export": {"quantize": "dynamic_int8"},
    }
    state = state_of(small_bert)
    with pytest.raises(AccuracyError, match="accuracy gate failed before export: compressed torch cosine_agreement") as caught:
        optimize(small_bert, recipe, tmp_path / "out", tokenizer=minilm.tokenizer, progress=False)
    report = caught.value.report
    assert report.accuracy.original == pytest.approx(1.0, abs=1e-6)
    assert report.accuracy.compressed_torch < 0.999 and report.accuracy.passed is False
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == [], "no temporary folder may be left behind"
    assert_unchanged(small_bert, state)


def test_export_without_gate_writes_atomically_and_overwrite_is_explicit(small_bert, minilm, tmp_path):
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": ["re:.*intermediate\\.dense"], "rank_ratio": 0.25}],
        "export": {"quantize": "dynamic_int8", "latency": {"repeats": 2, "seq_len": 32}, "baseline_latency": False},
    }
    out = tmp_path / "out"
    report = optimize(small_bert, recipe, out, tokenizer=minilm.tokenizer, progress=False)
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "model_quantized.onnx").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["params_after"] == report.params_after < report.params_before == saved["params_before"]
    assert saved["export"]["parity"]["passed"] is True
    assert report.export.sizes_mb["onnx/model_quantized.onnx"] < report.export.sizes_mb["onnx/model.onnx"]
    assert set(report.export.latency) == {"output fp32", "output quantized"}
    with pytest.raises(OutputExistsError, match="exists and is not empty; pass --overwrite"):
        optimize(small_bert, recipe, out, tokenizer=minilm.tokenizer, progress=False)
    optimize(small_bert, {"version": 1, "passes": []}, out, tokenizer=minilm.tokenizer, overwrite=True, progress=False)
    assert not (out / "onnx").exists(), "overwrite replaces the whole folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_optimization_level_keeps_parity(small_bert, minilm, tmp_path):
    recipe = {"version": 1, "export": {"optimization_level": 1, "quantize": "dynamic_int8", "latency": None}}
    report = optimize(small_bert, recipe, tmp_path / "o", tokenizer=minilm.tokenizer, progress=False)
    assert report.export.parity["passed"] is True
    assert not (tmp_path / "o" / "onnx" / "model_optimized.onnx").exists()
    assert report.export.latency == {}


def test_finetune_section_runs_after_the_passes(small_bert, minilm):
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": ["re:.*intermediate\\.dense"], "rank": 8}],
        "calibration": {"num_samples": 8, "seq_len": 32},
        "finetune": {"steps": 4, "lr": 1e-3},
    }
    state = state_of(small_bert)
    report = optimize(small_bert, recipe, tokenizer=minilm.tokenizer, progress=False)
    assert report.finetune["steps"] == 4 and report.finetune["loss_after"] <= report.finetune["loss_before"]
    assert report.recipe["finetune"] == {"steps": 4, "lr": 1e-3}
    assert_unchanged(small_bert, state)


def test_target_matching_nothing_fails_before_writing(small_bert, minilm, tmp_path):
    recipe = {"version": 1, "passes": [{"pass": "svd", "targets": ["decoder.*"], "rank": 2}], "export": {}}
    state = state_of(small_bert)
    with pytest.raises(TargetError, match="'decoder.\\*' matches no module"):
        optimize(small_bert, recipe, tmp_path / "out", tokenizer=minilm.tokenizer, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert_unchanged(small_bert, state)


def test_missing_eval_data_fails_before_passes(small_bert, minilm, tmp_path):
    recipe = {"version": 1, "accuracy": {"metric": "stsb_spearman", "data": str(tmp_path / "nope.tsv"), "max_drop": 1}}
    with pytest.raises(DataError, match="nope.tsv"):
        optimize(small_bert, recipe, tokenizer=minilm.tokenizer, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        optimize(small_bert, {"version": 1, "accuracy": {"metric": "cosine_agreement", "data": str(empty), "min_cosine": 0.5}}, tokenizer=minilm.tokenizer, progress=False)


def test_cli_errors_are_one_line_and_nonzero(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\npasses: []\n")
    assert main(["optimize", "--model", str(tmp_path / "missing"), "--recipe", str(recipe), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if not line.startswith("[optimum-lowrank]")] == err[-1:], "one error line, no traceback"
    assert err[-1].startswith("error: ") and "missing" in err[-1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npasses: [{pass: nope, targets: [x]}]\n")
    assert main(["validate", str(bad)]) == 2
    assert "unknown pass 'nope'; registered passes:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_path_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        optimize(tmp_path, {"version": 1}, progress=False)


@pytest.mark.integration
def test_real_minilm_end_to_end_with_int8(data_dir, tmp_path):
    """The real MiniLM through optimize(): SVD, STS-B gate, ONNX export, parity, dynamic int8, latency."""
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": ["re:.*intermediate\\.dense"], "rank_ratio": 0.5}],
        "accuracy": {"metric": "stsb_spearman", "data": str(data_dir / "stsb" / "sts-dev.tsv"), "max_drop": 5.0, "max_pairs": 300},
        "export": {"quantize": "dynamic_int8", "latency": {"repeats": 5}},
    }
    out = tmp_path / "minilm"
    report = optimize("minilm", recipe, out, progress=False)
    acc = report.accuracy
    assert acc.passed is True
    assert 80 < acc.original < 95, "MiniLM's STS-B Spearman x100 is about 86-87 on dev"
    assert acc.original - 5 <= acc.compressed_torch < acc.original + 1
    assert abs(acc.onnx_fp32 - acc.compressed_torch) < 0.05, "ONNX fp32 must reproduce PyTorch"
    assert abs(acc.onnx_quantized - acc.onnx_fp32) < 2.0
    assert report.export.parity["passed"] and report.export.parity["max_abs_diff"] < 1e-3
    sizes = report.export.sizes_mb
    assert sizes["onnx/model_quantized.onnx"] < 0.35 * sizes["onnx/model.onnx"] < 0.35 * sizes["original fp32 (not kept)"]
    assert {"original fp32", "output fp32", "output quantized"} <= set(report.export.latency)
    assert report.params_after < report.params_before
    assert json.loads((out / "report.json").read_text())["accuracy"]["passed"] is True
    assert Path(report.export.files["onnx_quantized"]).parent == out / "onnx"


def test_calibration_text_too_short_for_the_samples_is_an_error(small_bert, minilm, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("a short calibration text with a few dozen tokens, far fewer than asked for. " * 4)
    recipe = {
        "version": 1,
        "passes": [{"pass": "activation_svd", "targets": ["re:.*intermediate\\.dense"], "rank": 8}],
        "calibration": {"data": str(text), "num_samples": 64, "seq_len": 32},
        "export": {},
    }
    state = state_of(small_bert)
    with pytest.raises(DataError, match="64"):
        optimize(small_bert, recipe, tmp_path / "out", tokenizer=minilm.tokenizer, progress=False)
    assert not (tmp_path / "out").exists()
    assert_unchanged(small_bert, state)


def test_usage_aware_embedding_recipe_end_to_end(small_bert, minilm, tmp_path):
    """keep_top_k + frequency weighting through the pipeline: counts from the calibration text, export parity."""
    text = tmp_path / "cal.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 40)
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": ["embeddings.word_embeddings"], "compression_ratio": 4, "keep_top_k": 8}],
        "calibration": {"data": str(text), "num_samples": 4, "seq_len": 32},
        "export": {"quantize": "dynamic_int8", "latency": None},
    }
    report = optimize(small_bert, recipe, tmp_path / "o", tokenizer=minilm.tokenizer, progress=False)
    [layer] = report.passes[0].layers
    assert layer.metrics["exact_rows"] == 8 and layer.metrics["exact_token_share"] > 0.5
    assert "exact rows cover" in layer.note and report.export.parity["passed"] is True


def test_token_counts_from_a_short_text_are_reported(small_bert, minilm, tmp_path):
    """Issue 15, finding 8: a 16-token text was accepted while the report claimed '8 windows of 128 tokens'."""
    text = tmp_path / "cal.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log.")
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": ["embeddings.word_embeddings"], "compression_ratio": 4, "keep_top_k": 8}],
        "calibration": {"data": str(text), "num_samples": 8, "seq_len": 128},
    }
    report = optimize(small_bert, recipe, tokenizer=minilm.tokenizer, progress=False)
    assert any("token counts come from the whole calibration text, 14 tokens" in note and "8 x 128 = 1,024" in note for note in report.notes), report.notes


def _flush_denormal() -> bool:
    """Torch has no getter: a float32 denormal times one is zero only when denormals are flushed."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


@pytest.mark.parametrize("flush", [False, True])
def test_optimize_gives_back_flush_denormal_and_the_global_rng(tiny_llama, tmp_path, monkeypatch, flush):
    import optimum_lowrank.finetune as finetune_module

    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"w{i}" for i in range(64)))
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": LLAMA_TARGETS, "rank": 4}],
        "calibration": {"data": str(text), "num_samples": 4, "seq_len": 8},
        "finetune": {"steps": 2, "lr": 1e-3},
    }
    during = []
    real = finetune_module.finetune

    def spy(*args, **kwargs):
        during.append(_flush_denormal())
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "finetune", spy)
    try:
        if not torch.set_flush_denormal(flush):
            pytest.skip("this CPU cannot flush denormals")
        rng = torch.get_rng_state()
        optimize(tiny_llama, recipe, tokenizer=WordTokenizer(), progress=False)
        assert during == [True], "a decoder run flushes denormals"
        assert _flush_denormal() is flush
        assert torch.equal(torch.get_rng_state(), rng), "module constructors drew from the global generator"
        bad = {**recipe, "passes": [{"pass": "svd", "targets": ["nothing.*"], "rank": 4}]}
        with pytest.raises(TargetError):
            optimize(tiny_llama, bad, tokenizer=WordTokenizer(), progress=False)
        assert _flush_denormal() is flush and torch.equal(torch.get_rng_state(), rng), "given back after an error too"
    finally:
        torch.set_flush_denormal(False)

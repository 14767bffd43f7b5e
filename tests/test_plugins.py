"""Plugin discovery through pluggy: built-ins, the example third-party plugin (a pass and a metric), blocking, errors."""

from __future__ import annotations

import importlib.metadata
import inspect

import onnx
import pluggy
import pytest
import torch
from torch import nn

from optimum_lowrank import hookimpl, hookspecs, optimize
from optimum_lowrank.api import PassContext
from optimum_lowrank.errors import (
    AccuracyError,
    DuplicateMetricError,
    DuplicatePassError,
    DuplicateQuantizerError,
    LowRankError,
    RecipeError,
)
from optimum_lowrank.evaluation import METRICS, PerplexityEvaluator
from optimum_lowrank.layers import LowRankLinear
from optimum_lowrank.passes.svd import SVDPass
from optimum_lowrank.pipeline import apply_passes
from optimum_lowrank.plugins import (
    BLOCK_PLUGINS_ENV,
    DISABLE_AUTOLOAD_ENV,
    MetricRegistry,
    PassRegistry,
    QuantizerRegistry,
    get_metric_registry,
    get_plugin_manager,
    get_quantizer_registry,
)
from optimum_lowrank.recipe import load_recipe


def test_example_plugin_is_installed_through_its_entry_point():
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="optimum_lowrank")}
    assert points.get("rsvd") == "optimum_lowrank_rsvd", "pip install -e examples/plugins/optimum-lowrank-rsvd (make setup does)"
    registry = PassRegistry().collect(get_plugin_manager())
    assert dict(registry.entries())["randomized_svd"].plugin == "rsvd"
    assert dict(registry.entries())["svd"].plugin == "optimum_lowrank.passes.svd"


def test_example_plugin_pass_runs_through_a_recipe(tiny_bert):
    registry = PassRegistry().collect(get_plugin_manager())
    recipe = load_recipe(
        {"version": 1, "passes": [{"pass": "randomized_svd", "targets": ["re:.*intermediate\\.dense"], "rank": 4}]}, registry
    )
    compressed, reports = apply_passes(tiny_bert, recipe, PassContext(), registry)
    assert isinstance(compressed.encoder.layer[0].intermediate.dense, LowRankLinear)
    assert isinstance(tiny_bert.encoder.layer[0].intermediate.dense, nn.Linear), "caller's model must stay untouched"
    assert reports[0].model_params_after < reports[0].model_params_before
    assert [layer.rank for layer in reports[0].layers] == [4, 4]


def test_disable_autoload_keeps_only_builtins(monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    registry = PassRegistry().collect(get_plugin_manager())
    assert "svd" in registry.names() and "randomized_svd" not in registry.names()


def test_blocked_plugin_is_not_loaded(monkeypatch):
    monkeypatch.setenv(BLOCK_PLUGINS_ENV, "rsvd, other")
    pm = get_plugin_manager()
    assert pm.is_blocked("rsvd")
    assert "randomized_svd" not in PassRegistry().collect(pm).names()


def test_duplicate_pass_id_names_both_plugins():
    class Again:
        @hookimpl
        def lowrank_register_passes(self, register):
            register(SVDPass)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Again(), name="again")
    with pytest.raises(DuplicatePassError, match="'svd' registered twice: by plugin 'optimum_lowrank.passes.svd'.*by plugin 'again'"):
        PassRegistry().collect(pm)


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def lowrank_register_pases(self, register):  # misspelled on purpose
            pass

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Typo(), name="typo")
    with pytest.raises(pluggy.PluginValidationError, match="lowrank_register_pases"):
        pm.check_pending()


def test_every_hookspec_is_documented_and_prefixed():
    specs = [obj for name, obj in vars(hookspecs).items() if inspect.isfunction(obj) and hasattr(obj, "optimum_lowrank_spec")]
    assert specs, "no hookspecs found"
    for spec in specs:
        assert spec.__name__.startswith("lowrank_")
        doc = inspect.getdoc(spec) or ""
        assert "Parameters" in doc and len(doc) > 100, f"{spec.__name__} needs a reference docstring"


def test_non_pass_registration_is_rejected():
    registry = PassRegistry()
    with pytest.raises(Exception, match="not a CompressionPass subclass"):
        registry(torch.nn.Linear)  # type: ignore[arg-type]


# ============================================================================ metrics


def _tokenizer():
    """A one-word tokenizer: ``optimize`` needs one, ``top1_agreement`` feeds random ids and never uses it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]")


def test_metrics_are_registered_through_the_hook_with_their_plugin():
    registry = MetricRegistry().collect(get_plugin_manager())
    entries = dict(registry.entries())
    assert {name: entries[name].plugin for name in METRICS} == dict.fromkeys(METRICS, "optimum_lowrank.evaluation")
    assert entries["top1_agreement"].plugin == "rsvd"
    assert entries["top1_agreement"].evaluator_class.config_class.threshold_field == "min_agreement"
    assert registry.by_plugin()["optimum_lowrank.evaluation"] == list(METRICS)
    assert "top1_agreement" in get_metric_registry().names()


def test_duplicate_metric_id_names_both_plugins():
    class Again:
        @hookimpl
        def lowrank_register_metrics(self, register):
            register(PerplexityEvaluator)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Again(), name="again")
    with pytest.raises(
        DuplicateMetricError,
        match="metric 'perplexity' registered twice: by plugin 'optimum_lowrank.evaluation' .*by plugin 'again' \\(PerplexityEvaluator\\)",
    ):
        MetricRegistry().collect(pm)


def test_metric_registration_checks_the_declarations():
    registry = MetricRegistry()
    with pytest.raises(LowRankError, match="not an Evaluator subclass"):
        registry(SVDPass)  # type: ignore[arg-type]

    class NoKinds(PerplexityEvaluator):
        name = "no_kinds"
        model_kinds = ("seq2seq",)

    with pytest.raises(LowRankError, match="needs `model_kinds`, a non-empty tuple of \\('encoder', 'decoder'\\)"):
        registry(NoKinds)

    class NoConfig(PerplexityEvaluator):
        name = "no_config"
        config_class = dict  # type: ignore[assignment]

    with pytest.raises(LowRankError, match="needs a `config_class` deriving from AccuracyConfig"):
        registry(NoConfig)
    assert registry.names() == []


def test_example_plugin_metric_runs_through_a_recipe(tiny_llama):
    with torch.no_grad():  # at initialisation the layers barely move the tied embeddings' top-1; make them count
        for name, param in tiny_llama.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(2)
    recipe = {
        "version": 1,
        "passes": [{"pass": "randomized_svd", "targets": ["re:.*mlp\\.(gate|up)_proj"], "rank": 2}],
        "accuracy": {"metric": "top1_agreement", "min_agreement": 0.5, "num_samples": 2, "seq_len": 16},
        "export": {"latency": None},
    }
    assert load_recipe(recipe).to_dict()["accuracy"] == recipe["accuracy"]
    report = optimize(tiny_llama, recipe, tokenizer=_tokenizer(), progress=False)
    acc = report.accuracy
    assert acc.metric == "top1_agreement" and acc.higher_is_better and "2 x 16 random token ids" in acc.data
    assert (acc.threshold_name, acc.threshold) == ("min_agreement", 0.5)
    assert acc.original == 1.0
    assert 0.5 <= acc.compressed_torch < 1.0, "rank 2 changes some top-1 predictions"
    assert acc.onnx_fp32 == pytest.approx(acc.compressed_torch, abs=1 / 32), "ONNX Runtime agrees up to one near-tie"
    assert acc.passed is True

    strict = {**recipe, "accuracy": {**recipe["accuracy"], "min_agreement": 1.0}, "export": None}
    with pytest.raises(AccuracyError, match="compressed torch top1_agreement .*min_agreement=1"):
        optimize(tiny_llama, strict, tokenizer=_tokenizer(), progress=False)


def test_example_plugin_metric_options_are_validated():
    with pytest.raises(RecipeError, match="accuracy \\(top1_agreement\\): unknown key 'max_windows'; allowed keys: min_agreement, num_samples, seq_len"):
        load_recipe({"version": 1, "accuracy": {"metric": "top1_agreement", "min_agreement": 0.5, "max_windows": 2}})
    with pytest.raises(RecipeError, match="takes the threshold 'min_agreement', not min_cosine"):
        load_recipe({"version": 1, "accuracy": {"metric": "top1_agreement", "min_cosine": 0.5}})


# --------------------------------------------------------------------------- quantizers


def test_quantizers_are_registered_through_the_hook_with_their_plugin():
    registry = get_quantizer_registry()
    by_plugin = registry.by_plugin()
    assert set(by_plugin["optimum_lowrank.exporters.quantizers"]) == {
        "none", "dynamic_int8", "static_int8", "weight_int8", "weight_int4", "weight_only"
    }
    assert by_plugin["rsvd"] == ["int8_per_tensor"]


def test_duplicate_quantizer_id_names_both_plugins():
    from optimum_lowrank import Quantizer

    class Other(Quantizer):
        name = "dynamic_int8"

        def quantize(self, onnx_path, output_path, request):
            return {}

    class Duplicate:
        @hookimpl
        def lowrank_register_quantizers(self, register):
            register(Other)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Duplicate(), name="dup")
    with pytest.raises(DuplicateQuantizerError, match="quantizer 'dynamic_int8' registered twice.*'dup'"):
        QuantizerRegistry().collect(pm)


def test_example_plugin_quantizer_runs_through_a_recipe(tiny_bert, tmp_path):
    recipe = {"version": 1, "export": {"quantize": "int8_per_tensor", "latency": None}}
    report = optimize(tiny_bert, recipe, output=tmp_path / "out", tokenizer=_tokenizer(), progress=False)
    assert report.export.quantization_details == {"per_channel": False}
    graph = onnx.load(str(tmp_path / "out" / "onnx" / "model_quantized.onnx"))
    assert "DynamicQuantizeLinear" in {n.op_type for n in graph.graph.node}
    with pytest.raises(RecipeError, match="unknown quantizer 'int9'; registered: .*int8_per_tensor"):
        load_recipe({"version": 1, "export": {"quantize": "int9"}})

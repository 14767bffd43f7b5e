"""Recipe validation: every bad input gets an error naming the field and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimum_lowrank.errors import RecipeError, UnknownMetricError, UnknownPassError
from optimum_lowrank.recipe import AccuracyConfig, Recipe, load_recipe

SMALLEST = """
version: 1
passes:
  - {pass: svd, targets: ["re:.*intermediate\\\\.dense"], rank_ratio: 0.5}
export: {quantize: dynamic_int8}
"""


def test_smallest_recipe_parses_and_round_trips():
    recipe = load_recipe(SMALLEST)
    assert recipe.passes[0].pass_id == "svd"
    assert recipe.passes[0].config.rank_ratio == 0.5
    assert recipe.passes[0].config.targets == ("re:.*intermediate\\.dense",)
    assert recipe.export.quantize == "dynamic_int8"
    assert recipe.accuracy is None
    assert load_recipe(recipe.to_yaml()) == recipe


def test_empty_passes_is_the_baseline():
    recipe = load_recipe({"version": 1, "passes": []})
    assert recipe.passes == () and recipe.export is None


def test_recipe_file_and_missing_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(SMALLEST)
    assert load_recipe(path).passes[0].pass_id == "svd"
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1\npasses: [", "malformed YAML"),
        ("- just a list", "a recipe is a mapping"),
        ("passes: []", "missing required key 'version'"),
        ("version: 2", r"unknown version 2 \(supported: \[1\]\)"),
        ("version: 1\nfoo: 1", "unknown key 'foo'; allowed keys: version, passes"),
        ("version: 1\npasses: {pass: svd}", "'passes' must be a list"),
        ("version: 1\npasses: [{targets: [a]}]", "each pass is a mapping with a 'pass' id"),
        ("version: 1\npasses: [{pass: svd, targets: [a], rnk: 3}]", "unknown key 'rnk'; allowed keys: targets, rank, rank_ratio"),
        ("version: 1\npasses: [{pass: svd, targets: [a], rank: 3, energy: 0.5}]", "set exactly one of rank, rank_ratio, compression_ratio, energy; got rank, energy"),
        ("version: 1\npasses: [{pass: svd, targets: [a]}]", "set exactly one of .*got none"),
        ("version: 1\npasses: [{pass: svd, targets: [a], rank: 0}]", "rank: Input should be greater than or equal to 1"),
        ("version: 1\npasses: [{pass: svd, targets: [a], rank_ratio: 1.5}]", "rank_ratio: Input should be less than or equal to 1"),
        ("version: 1\npasses: [{pass: svd, targets: [a], rank_ratio: 0}]", "rank_ratio: Input should be greater than 0"),
        ("version: 1\npasses: [{pass: svd, targets: [a], energy: 1.01}]", "energy: Input should be less than or equal to 1"),
        ("version: 1\npasses: [{pass: svd, targets: [a], compression_ratio: 1}]", "compression_ratio: Input should be greater than 1"),
        ("version: 1\npasses: [{pass: svd, targets: [], rank: 2}]", "targets"),
        ("version: 1\npasses: [{pass: svd, targets: ['re:(('], rank: 2}]", "not a valid regular expression"),
        ("version: 1\npasses: [{pass: svd, targets: [a], rank: 2, tied_head: drop}]", "tied_head: Input should be 'shared' or 'untie'"),
        ("version: 1\naccuracy: {metric: perplexity, max_drop: 1}", "takes the threshold 'max_increase', not max_drop"),
        ("version: 1\naccuracy: {metric: perplexity}", "needs the threshold 'max_increase'"),
        ("version: 1\naccuracy: {metric: bleu, max_drop: 1}", "metric: Input should be 'perplexity', 'stsb_spearman', 'cosine_agreement' or 'accuracy'"),
        ("version: 1\naccuracy: {metric: stsb_spearman, max_drop: 1}", "needs 'data'"),
        ("version: 1\naccuracy: {metric: cosine_agreement, min_cosine: 1.5}", "min_cosine: Input should be less than or equal to 1"),
        ("version: 1\nexport: {quantize: int3}", "export.quantize: unknown quantizer 'int3'; registered: dynamic_int8, .*none, static_int8, weight_int4, weight_int8, weight_only"),
        ("version: 1\nexport: {qantize: none}", "export: unknown key 'qantize'; allowed keys: format, opset"),
        ("version: 1\nexport: {opset: 9}", "opset: Input should be greater than or equal to 14"),
        ("version: 1\nexport: {latency: {batch: 2}}", "export.latency: unknown key 'batch'; allowed keys: batch_size"),
        ("version: 1\ncalibration: {num_samples: 0}", "num_samples: Input should be greater than or equal to 1"),
    ],
)
def test_bad_recipes_name_the_problem(text, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(text)


def test_unknown_pass_lists_registered_ids():
    with pytest.raises(UnknownPassError, match="unknown pass 'svdd'; registered passes: .*svd"):
        load_recipe("version: 1\npasses: [{pass: svdd, targets: [a], rank: 2}]")


def test_recipe_is_frozen():
    recipe = load_recipe(SMALLEST)
    with pytest.raises(Exception):
        recipe.version = 2  # type: ignore[misc]
    assert isinstance(recipe, Recipe)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    # a recipe without passes is an export (baseline, int8 only) or a search (writes its own passes and export)
    assert recipe.passes or recipe.export is not None or recipe.search is not None
    assert load_recipe(recipe.to_yaml()) == recipe  # round-trips


def test_unknown_metric_lists_the_registered_ones_by_plugin():
    with pytest.raises(
        UnknownMetricError,
        match="accuracy: metric: Input should be 'perplexity', 'stsb_spearman', 'cosine_agreement' or 'accuracy' \\(built in\\), "
        "or 'top1_agreement' \\(plugin 'rsvd'\\), got 'bleu'",
    ):
        load_recipe("version: 1\naccuracy: {metric: bleu, max_drop: 1}")


@pytest.mark.parametrize(
    ("accuracy", "expected"),
    [
        ("{metric: cosine_agreement, min_cosine: 0.9, max_windows: 3}", "accuracy \\(cosine_agreement\\): unknown key 'max_windows'; allowed keys: min_cosine, num_samples, seq_len, metric, data, enforce"),
        ("{metric: perplexity, max_increase: 0.1, num_samples: 3}", "accuracy \\(perplexity\\): unknown key 'num_samples'; allowed keys: max_increase, seq_len, stride, max_windows"),
        ("{metric: stsb_spearman, data: x.tsv, max_drop: 1, seq_len: 64}", "accuracy \\(stsb_spearman\\): unknown key 'seq_len'; allowed keys: max_drop, max_pairs"),
        ("{metric: cosine_agreement, min_cosine: 0.9, seq_len: 4}", "seq_len: Input should be greater than or equal to 8"),
        ("{metric: [perplexity], max_increase: 0.1}", "metric: Input should be 'perplexity'"),
        ("[perplexity]", "accuracy: a mapping with a 'metric' id"),
    ],
)
def test_each_metric_takes_only_its_own_options(accuracy, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(f"version: 1\naccuracy: {accuracy}")


@pytest.mark.parametrize(
    ("accuracy", "threshold", "original", "passing", "failing"),
    [
        ({"metric": "perplexity", "max_increase": 0.1, "seq_len": 256, "stride": 128, "max_windows": 4}, ("max_increase", 0.1), 20.0, 22.0, 22.1),
        ({"metric": "stsb_spearman", "data": "sts-dev.tsv", "max_drop": 2.0, "max_pairs": 300}, ("max_drop", 2.0), 80.0, 78.0, 77.9),
        ({"metric": "cosine_agreement", "min_cosine": 0.95, "num_samples": 8, "seq_len": 256, "enforce": False}, ("min_cosine", 0.95), 1.0, 0.95, 0.949),
    ],
)
def test_accuracy_config_is_the_metrics_own_model(accuracy, threshold, original, passing, failing):
    recipe = load_recipe({"version": 1, "accuracy": accuracy})
    assert isinstance(recipe.accuracy, AccuracyConfig)
    assert recipe.to_dict()["accuracy"] == accuracy, "round-trips with only what was set"
    assert load_recipe(recipe.to_yaml()) == recipe
    assert recipe.accuracy.threshold == threshold
    assert recipe.accuracy.acceptable(original, passing) and not recipe.accuracy.acceptable(original, failing)


def test_cosine_agreement_seq_len_defaults_to_128():
    recipe = load_recipe("version: 1\naccuracy: {metric: cosine_agreement, min_cosine: 0.9}")
    assert (recipe.accuracy.seq_len, recipe.accuracy.num_samples) == (128, 64)
    assert recipe.to_dict()["accuracy"] == {"metric": "cosine_agreement", "min_cosine": 0.9}

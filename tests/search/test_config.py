"""The ``search:`` section: one objective, allowed bits, unknown keys, recipe wiring and the CLI's flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimum_lowrank.cli import main
from optimum_lowrank.errors import RecipeError
from optimum_lowrank.pipeline import optimize
from optimum_lowrank.recipe import load_recipe
from optimum_lowrank.search.config import SearchConfig
from optimum_lowrank.search.setup import compact_targets, parse_search_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_drop": 1.0, "size_mb": 8}, "set exactly one objective of max_drop, max_increase, size_mb; got max_drop, size_mb"),
        ({"max_drop": 1.0, "max_increase": 0.05}, "got max_drop, max_increase"),
        ({}, "set exactly one objective .*got none"),
        ({"max_drop": 1.0, "bitz": [4]}, "unknown key 'bitz'; allowed keys: max_drop, max_increase, size_mb, metric, data"),
        ({"max_drop": 1.0, "bits": [8, 3]}, r"bits: \[3\] not supported by the weight-only exporter; allowed bit-widths: 2, 4, 8"),
        ({"max_drop": 1.0, "embedding_bits": [16]}, "embedding_bits: .*allowed bit-widths: 2, 4, 8"),
        ({"max_drop": 1.0, "bits": []}, "bits: give at least one bit-width"),
        ({"max_drop": 1.0, "metric": "perplexity"}, "metric 'perplexity' takes the objective 'max_increase' .*not 'max_drop'"),
        ({"max_increase": 0.05, "metric": "stsb_spearman"}, "takes the objective 'max_drop'"),
        ({"max_drop": 1.0, "metric": "cosine_agreement"}, "metric: Input should be 'stsb_spearman' or 'perplexity'"),
        ({"size_mb": 0}, "size_mb: Input should be greater than 0"),
        ({"max_drop": 1.0, "block_size": 48}, r"block_size: give powers of 2 in \[16, 256\], got 48"),
        ({"max_drop": 1.0, "block_size": [32, 512]}, r"block_size: give powers of 2 in \[16, 256\]"),
        ({"max_drop": 1.0, "embedding_ratios": [0.5, 2]}, "embedding_ratios: give compression ratios >= 1"),
    ],
)
def test_bad_search_config_names_the_field_and_the_allowed_values(config, expected):
    with pytest.raises(RecipeError, match=expected):
        parse_search_config(config)
    with pytest.raises(RecipeError, match=expected):
        load_recipe({"version": 1, "search": config})


def test_objective_and_kind_defaults():
    config = parse_search_config({"size_mb": 6})
    assert config.objective == ("size_mb", 6.0)
    assert config.default("encoder", "embedding_ratios") == (1.0, 2.5, 5.0, 10.0)
    assert config.default("decoder", "embedding_ratios") == (1.0,)
    assert parse_search_config(config) is config


def test_search_recipe_round_trips_and_stands_alone():
    recipe = load_recipe({"version": 1, "search": {"max_increase": 0.05, "bits": [8, 4, 2]}})
    assert isinstance(recipe.search, SearchConfig) and recipe.search.bits == (8, 4, 2)
    assert load_recipe(recipe.to_yaml()) == recipe
    with pytest.raises(RecipeError, match="holds only version and search .*also given: passes, export"):
        load_recipe({"version": 1, "passes": [{"pass": "svd", "targets": ["a"], "rank": 2}], "export": {"quantize": "dynamic_int8"},
                     "search": {"max_drop": 1.0}})
    with pytest.raises(RecipeError, match="also given: seed"):
        load_recipe({"version": 1, "seed": 3, "search": {"max_drop": 1.0}})


@pytest.mark.parametrize("name", ["minilm-auto.yaml", "smollm2-auto.yaml"])
def test_shipped_auto_recipes(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.search is not None and recipe.passes == () and recipe.export is None
    assert parse_search_config(RECIPES / name) == recipe.search


def test_optimize_refuses_a_search_recipe():
    with pytest.raises(RecipeError, match="has a 'search:' section: run it with optimum_lowrank.search.search"):
        optimize("minilm", {"version": 1, "search": {"max_drop": 1.0}})
    with pytest.raises(RecipeError, match="has no 'search:' section"):
        parse_search_config({"version": 1, "passes": []})


def test_cli_search_flags(capsys, tmp_path):
    assert main(["optimize", "--model", "minilm", "--output", str(tmp_path / "o")]) == 2
    assert "give --recipe, or an objective (--max-drop, --max-increase or --size-mb)" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\npasses: []\n")
    assert main(["optimize", "--model", "minilm", "--recipe", str(recipe), "--max-drop", "1", "--output", str(tmp_path / "o")]) == 2
    assert "--max-drop apply without --recipe" in capsys.readouterr().err
    assert main(["optimize", "--model", "minilm", "--max-drop", "1", "--size-mb", "3", "--output", str(tmp_path / "o")]) == 2
    assert "set exactly one objective" in capsys.readouterr().err


def test_compact_targets():
    every = [f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("up_proj", "down_proj")] + ["lm_head"]
    chosen = [f"model.layers.{i}.mlp.down_proj" for i in range(3)] + ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj", "lm_head"]
    assert compact_targets(chosen, every) == ["model.layers.*.mlp.down_proj", "re:model\\.layers\\.(1|2)\\.mlp\\.up_proj", "lm_head"]
    assert compact_targets(["model.layers.0.mlp.up_proj"], every) == ["model.layers.0.mlp.up_proj"]

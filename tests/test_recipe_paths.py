"""Relative data paths in a recipe file resolve against the recipe file's folder, wherever the command runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimum_lowrank.data import RELATIVE_PATH_RULE, load_text
from optimum_lowrank.errors import DataError
from optimum_lowrank.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """``project/recipes/`` next to ``project/data/{calib.txt, sts.tsv}``; the working directory set to an unrelated folder."""
    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    (data / "calib.txt").write_text("some calibration prose " * 50)
    (data / "sts.tsv").write_text("a\tb\tc\td\t1.0\tfirst sentence\tsecond sentence\n")
    recipes = tmp_path / "project" / "recipes"
    recipes.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return recipes, data


def _write(folder: Path, body: str) -> Path:
    path = folder / "r.yaml"
    path.write_text("version: 1\n" + body)
    return path


def test_paths_resolve_against_the_recipe_folder_not_the_working_directory(layout, monkeypatch):
    recipes, data = layout
    path = _write(recipes, (
        "calibration: {data: ../data/calib.txt}\n"
        "accuracy: {metric: stsb_spearman, data: ../data/sts.tsv, max_drop: 1}\n"
    ))
    recipe = load_recipe(path)
    assert recipe.calibration.data == str(data / "calib.txt")
    assert recipe.accuracy.data == str(data / "sts.tsv")
    assert load_text(recipe.calibration.data)[0].startswith("some calibration prose")
    monkeypatch.chdir(recipes)  # the same recipe given by a relative path, from its own folder
    assert load_recipe("r.yaml").calibration.data == str(data / "calib.txt")


def test_tsv_paths_in_pass_options_resolve_and_other_sources_stay(layout):
    recipes, data = layout
    path = _write(recipes, (
        "calibration: {data: 'tsv:../data/sts.tsv:5,6:header'}\n"
        "passes:\n"
        "  - {pass: structured_prune, targets: ['re:encoder\\.layer\\.\\d+'], target_sparsity: 0.5, data: ../data/sts.tsv}\n"
        "accuracy: {metric: perplexity, data: 'datasets:wikitext:wikitext-2-raw-v1:test', max_increase: 0.1}\n"
    ))
    recipe = load_recipe(path)
    assert recipe.calibration.data == f"tsv:{data / 'sts.tsv'}:5,6:header"
    assert recipe.passes[0].config.data == str(data / "sts.tsv")
    assert recipe.accuracy.data == "datasets:wikitext:wikitext-2-raw-v1:test"


def test_a_missing_file_error_shows_the_resolved_path_and_the_rule(layout):
    recipes, data = layout
    recipe = load_recipe(_write(recipes, "calibration: {data: ../data/nope.txt}\n"))
    resolved = data / "nope.txt"
    assert recipe.calibration.data == str(resolved)
    with pytest.raises(DataError) as err:
        load_text(recipe.calibration.data)
    assert str(resolved) in str(err.value) and RELATIVE_PATH_RULE in str(err.value)


def test_recipes_written_against_the_working_directory_still_load_with_a_warning(layout, monkeypatch):
    recipes, data = layout
    monkeypatch.chdir(data.parent)  # the old rule: relative to where the command runs
    path = _write(recipes, "calibration: {data: data/calib.txt}\n")
    expected = r"calibration\.data: 'data/calib.txt' is not in the recipe's folder.*write '\.\./data/calib\.txt'"
    with pytest.warns(UserWarning, match=expected):
        recipe = load_recipe(path)
    assert recipe.calibration.data == str(data / "calib.txt")


def test_text_and_dict_recipes_keep_paths_as_given():
    assert load_recipe("version: 1\ncalibration: {data: some/file.txt}\n").calibration.data == "some/file.txt"
    assert load_recipe({"version": 1, "calibration": {"data": "x.txt"}}).calibration.data == "x.txt"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_find_their_data_from_any_folder(path, data_dir, monkeypatch, tmp_path, recwarn):
    """Every data file a shipped recipe names exists, read from an unrelated working directory, without the fallback."""
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert not [w for w in recwarn if "working directory" in str(w.message)]
    sources = [recipe.calibration.data, recipe.accuracy.data if recipe.accuracy else None]
    sources += [getattr(step.config, "data", None) for step in recipe.passes]
    for source in filter(None, sources):
        if source.startswith("datasets:"):
            continue
        file = source.removeprefix("tsv:").rsplit(":", 1)[0] if source.startswith("tsv:") else source
        assert Path(file).is_absolute() and Path(file).is_file(), (path.name, source)


def test_shared_data_paths_follow_the_data_variable_when_the_checkout_is_elsewhere(tmp_path, monkeypatch):
    """A checkout not beside ``shared/`` (a CI clone) finds ``../../shared/data/...`` under $OPTIMUM_LOWRANK_DATA."""
    data = tmp_path / "somewhere" / "data"
    (data / "wikitext-2").mkdir(parents=True)
    (data / "wikitext-2" / "wiki.valid.tokens").write_text("text " * 100)
    recipes = tmp_path / "clone" / "recipes"
    recipes.mkdir(parents=True)
    path = _write(recipes, "calibration: {data: ../../shared/data/wikitext-2/wiki.valid.tokens}\npasses: []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPTIMUM_LOWRANK_DATA", raising=False)
    assert load_recipe(path).calibration.data == str(tmp_path / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens")
    monkeypatch.setenv("OPTIMUM_LOWRANK_DATA", str(data))
    assert load_recipe(path).calibration.data == str(data / "wikitext-2" / "wiki.valid.tokens")

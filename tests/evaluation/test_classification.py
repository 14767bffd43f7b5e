"""The ``accuracy`` metric on a tiny classifier: PyTorch and ONNX Runtime agree; recipe checks."""

from __future__ import annotations

import pytest

from optimum_lowrank.errors import DataError, ModelLoadError, RecipeError
from optimum_lowrank.evaluation import build_evaluator
from optimum_lowrank.evaluation.classification import ClassificationAccuracyEvaluator
from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
from optimum_lowrank.models import LoadedModel, load_model, task_cache_dir
from optimum_lowrank.recipe import load_recipe
from tests.helpers import sentiment_tsv, tiny_classifier, word_tokenizer


def _loaded(tmp_path):
    return LoadedModel(tiny_classifier(), word_tokenizer(tmp_path), "encoder", "tiny classifier")


def test_accuracy_in_torch_equals_accuracy_in_onnx_runtime(tmp_path):
    loaded = _loaded(tmp_path)
    data = sentiment_tsv(tmp_path / "dev.tsv", rows=40)
    evaluator = build_evaluator("accuracy", loaded, data=data)
    assert isinstance(evaluator, ClassificationAccuracyEvaluator) and "40 examples" in evaluator.description
    torch_value = evaluator.evaluate_torch(loaded.model)
    assert 0.0 <= torch_value <= 100.0
    assert onnx_task(loaded.model) == "text-classification"
    path = export_onnx(loaded.model, tmp_path / "onnx", "text-classification")
    assert evaluator.predict_onnx(path) == evaluator.predict_torch(loaded.model)
    assert evaluator.evaluate_onnx(path) == torch_value


def test_labels_that_do_not_fit_the_head_and_missing_data(tmp_path):
    path = tmp_path / "three.tsv"
    path.write_text("label\ttext_a\n0\tgood\n2\tbad\n")
    with pytest.raises(DataError, match="head has 2 labels"):
        build_evaluator("accuracy", _loaded(tmp_path), data=path)
    with pytest.raises(RecipeError, match="needs 'data'"):
        load_recipe("version: 1\naccuracy: {metric: accuracy, max_drop: 1}")
    recipe = load_recipe("version: 1\naccuracy: {metric: accuracy, data: dev.tsv, max_drop: 1}")
    assert recipe.accuracy.acceptable(90.0, 89.0) and not recipe.accuracy.acceptable(90.0, 88.9)


def test_a_saved_classifier_loads_with_its_head(tmp_path):
    model = tiny_classifier()
    model.save_pretrained(tmp_path / "clf")
    word_tokenizer(tmp_path).save_pretrained(tmp_path / "clf")
    loaded = load_model(tmp_path / "clf")
    assert type(loaded.model).__name__ == "BertForSequenceClassification" and loaded.kind == "encoder"
    with pytest.raises(ModelLoadError, match="unknown task model alias"):
        task_cache_dir("minilm-mnli")

"""Big graphs: a graph whose weights live in ONNX external data is exported, sized and quantized the same way.

Optimum's exporter saves all weights in one external file ``model.onnx_data`` when the
TorchScript exporter produced external data (graphs above protobuf's 2 GB limit) or
``FORCE_ONNX_EXTERNAL_DATA=1`` is set; :func:`quantize_onnx` writes external data when the
fp32 graph exceeds ``_EXTERNAL_DATA_MB`` (1,800 MB). Both thresholds are forced low here so a
tiny model takes the big-model path.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.external_data_helper import uses_external_data

import optimum_lowrank.exporters.quantize as quantize_module
from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task
from optimum_lowrank.exporters.quantize import quantize_onnx
from optimum_lowrank.layers.lowrank import LowRankLinear
from optimum_lowrank.testing import tiny_bert


def _external_files(path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {entry.value for t in proto.graph.initializer if uses_external_data(t) for entry in t.external_data if entry.key == "location"}


def _run(path, ids) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0]


@pytest.fixture(scope="module")
def external_export(tmp_path_factory):
    model = tiny_bert()
    for layer in model.encoder.layer:
        layer.intermediate.dense = LowRankLinear.from_linear(layer.intermediate.dense, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
        path = export_onnx(model, tmp_path_factory.mktemp("big") / "onnx", onnx_task(model))
    return model, path


def test_export_writes_one_external_data_file(external_export):
    _, path = external_export
    assert _external_files(path) == {"model.onnx_data"}
    assert onnx_size_mb(path) == pytest.approx((path.stat().st_size + (path.parent / "model.onnx_data").stat().st_size) / 1e6)
    assert path.stat().st_size < (path.parent / "model.onnx_data").stat().st_size


@pytest.mark.parametrize("method", ["dynamic_int8", "weight_int8"])
def test_quantized_big_graph_uses_external_data_and_runs(external_export, tmp_path, monkeypatch, method):
    _, path = external_export
    monkeypatch.setattr(quantize_module, "_EXTERNAL_DATA_MB", 0.0)
    out = quantize_onnx(path, tmp_path / "model_quantized.onnx", method)
    assert _external_files(out), f"{method}: no external data written"
    ids = np.random.default_rng(0).integers(5, 1000, (1, 24), dtype=np.int64)
    reference, got = _run(path, ids), _run(out, ids)
    cosine = float((reference * got).sum() / (np.linalg.norm(reference) * np.linalg.norm(got)))
    assert cosine > 0.99, cosine

"""ONNX export, parity, quantization and latency of compressed tiny models.

The low-rank modules here are defined locally (plain ``nn.Module`` s of the kind
the passes produce) so that these tests depend on the exporters only.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from optimum_lowrank.errors import DataError, ExportError
from optimum_lowrank.exporters.latency import LatencyResult, measure_latency
from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task
from optimum_lowrank.exporters.parity import ParityResult, check_parity
from optimum_lowrank.exporters.quantize import QUANTIZATION_METHODS, calibration_feeds_from_ids, optimize_graph, quantize_onnx
from optimum_lowrank.exporters.runtime import build_dummy_feeds, make_session

VOCAB = 100
RANK = 8


class LowRankLinear(nn.Module):
    """``x -> up(down(x))``: a rank-``rank`` replacement of an ``nn.Linear``."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.down = nn.Linear(linear.in_features, rank, bias=False)
        self.up = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class LowRankEmbedding(nn.Module):
    """``ids -> proj(emb(ids))``: an ``nn.Embedding(V, r)`` then ``nn.Linear(r, d)``."""

    def __init__(self, num_embeddings: int, rank: int, embedding_dim: int):
        super().__init__()
        self.emb = nn.Embedding(num_embeddings, rank)
        self.proj = nn.Linear(rank, embedding_dim, bias=False)
        self.dropout = nn.Dropout(0.5)  # must be off in the exported graph

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.emb(ids)))


class TiedLowRankHead(nn.Module):
    """LM head reusing a :class:`LowRankEmbedding`'s factors: ``h @ P @ E^T``."""

    def __init__(self, embedding: LowRankEmbedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.embedding.proj.weight) @ self.embedding.emb.weight.T


def _lowrank_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )
    model = BertModel(config)
    for layer in model.encoder.layer:
        layer.intermediate.dense = LowRankLinear(layer.intermediate.dense, RANK)
        layer.output.dense = LowRankLinear(layer.output.dense, RANK)
    model.embeddings.word_embeddings = LowRankEmbedding(VOCAB, RANK, 32)
    return model.train()  # export must switch every module to eval


def _tied_lowrank_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    model.model.embed_tokens = LowRankEmbedding(VOCAB, RANK, 32)
    model.lm_head = TiedLowRankHead(model.model.embed_tokens)
    for layer in model.model.layers:
        layer.mlp.down_proj = LowRankLinear(layer.mlp.down_proj, RANK)
    return model.eval()


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = _lowrank_bert()
    path = export_onnx(model, tmp_path_factory.mktemp("bert") / "onnx", onnx_task(model))
    return model, path


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = _tied_lowrank_llama()
    path = export_onnx(model, tmp_path_factory.mktemp("llama") / "onnx", onnx_task(model))
    return model, path


def _first_output(path: Path, batch: int = 2, seq: int = 16, seed: int = 7) -> np.ndarray:
    session = make_session(path)
    return session.run(None, build_dummy_feeds(session, batch, seq, VOCAB, seed))[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- export and parity -------------------------------------------------------------------------


def test_onnx_task_encoder_and_decoder() -> None:
    assert onnx_task(_lowrank_bert()) == "feature-extraction"
    assert onnx_task(_tied_lowrank_llama()) == "text-generation-with-past"


def test_lowrank_bert_exports_and_matches(bert_export) -> None:
    model, path = bert_export
    assert path == path.parent / "model.onnx" and (path.parent / "config.json").is_file()
    onnx.checker.check_model(str(path))
    assert not any(m.training for m in model.modules())
    # The factorised embedding table (V, r) is in the graph, not a dense (V, d) one.
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(path)).graph.initializer}
    assert shapes["embeddings.word_embeddings.emb.weight"] == (VOCAB, RANK)
    assert (VOCAB, 32) not in shapes.values()

    result = check_parity(model, path, seq_lengths=(8, 32, 128), batch_size=2)
    assert result.passed
    assert result.max_abs_diff < 1e-4
    assert set(result.per_shape) == {"batch=2,seq=8", "batch=2,seq=32", "batch=2,seq=128", "batch=2,seq=128,right-padded to 64"}
    json.dumps(result.to_dict())


def test_parity_reports_a_mismatch(bert_export) -> None:
    model, path = bert_export
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.encoder.layer[1].output.LayerNorm.bias.add_(0.01)
    result = check_parity(changed, path, seq_lengths=(8,), atol=1e-3)
    assert not result.passed
    assert result.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    assert result.per_shape["batch=2,seq=8"] == result.max_abs_diff


def test_parity_caps_lengths_at_max_positions(bert_export) -> None:
    model, path = bert_export
    result = check_parity(model, path, seq_lengths=(8, 500), batch_size=1)
    assert set(result.per_shape) == {"batch=1,seq=8", "batch=1,seq=128", "batch=2,seq=128,right-padded to 64"}
    assert result.passed


class _IgnoresMask(torch.nn.Module):
    """The model, but blind to the attention mask (what a graph that drops the mask computes)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_parity_runs_a_right_padded_batch(bert_export) -> None:
    """Issue 15, finding 9: with all-ones masks a graph that ignored padding would pass."""
    model, path = bert_export
    result = check_parity(_IgnoresMask(model), path, seq_lengths=(8, 32), batch_size=2, atol=1e-4)
    assert result.per_shape["batch=2,seq=8"] < 1e-4 and result.per_shape["batch=2,seq=32"] < 1e-4
    assert result.per_shape["batch=2,seq=32,right-padded to 16"] > 1e-3
    assert not result.passed


def test_parity_result_to_dict_handles_inf() -> None:
    result = ParityResult(max_abs_diff=float("inf"), atol=1e-3, passed=False, per_shape={"batch=1,seq=8": float("inf")})
    assert json.loads(json.dumps(result.to_dict()))["max_abs_diff"] == "inf"


def test_tied_lowrank_head_llama_exports_and_matches(llama_export) -> None:
    model, path = llama_export
    assert model.lm_head.embedding is model.model.embed_tokens  # tying survives the export
    session = make_session(path)
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.0.key" in names
    result = check_parity(model, path, seq_lengths=(8, 32, 128), batch_size=2)
    assert result.passed and result.max_abs_diff < 1e-4, result
    logits = _first_output(path, batch=2, seq=5)
    assert logits.shape == (2, 5, VOCAB)


def test_parity_compares_every_present_output(llama_export) -> None:
    model, path = llama_export
    result = check_parity(model, path, seq_lengths=(8, 16), batch_size=2, atol=1e-4)
    layers = model.config.num_hidden_layers
    presents = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert list(result.per_output) == ["logits", *presents]  # graph order
    assert result.passed and result.failed_outputs == []
    assert all(diff < 1e-4 for diff in result.per_output.values()), result.per_output
    assert result.max_abs_diff == max(result.per_output.values()) == max(result.per_shape.values())
    assert json.loads(json.dumps(result.to_dict()))["per_output"].keys() == result.per_output.keys()


def _scale_graph_output(path: Path, out: Path, name: str, factor: float) -> Path:
    """A copy of the graph at ``path`` whose output ``name`` is multiplied by ``factor``."""
    proto = onnx.load(str(path))
    raw = f"{name}_unscaled"
    for node in proto.graph.node:  # the graph computes on with the unscaled tensor
        node.output[:] = [raw if o == name else o for o in node.output]
        node.input[:] = [raw if i == name else i for i in node.input]
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, dtype=np.float32), f"{name}_factor"))
    proto.graph.node.append(onnx.helper.make_node("Mul", [raw, f"{name}_factor"], [name]))
    onnx.save(proto, str(out))
    return out


def test_parity_names_a_corrupted_present_output(llama_export, tmp_path) -> None:
    model, path = llama_export
    corrupted = _scale_graph_output(path, tmp_path / "model.onnx", "present.1.value", 1.5)
    result = check_parity(model, corrupted, seq_lengths=(8,), batch_size=2, atol=1e-4)
    assert not result.passed
    assert result.failed_outputs == ["present.1.value"]
    assert result.per_output["logits"] < 1e-4 and result.per_output["present.0.value"] < 1e-4
    assert result.max_abs_diff == result.per_output["present.1.value"] > 1e-2
    assert "present.1.value" in result.describe() and "logits" not in result.describe()


def test_parity_rejects_an_output_the_model_does_not_return(bert_export, tmp_path) -> None:
    model, path = bert_export
    proto = onnx.load(str(path))
    proto.graph.output[0].name = "mystery"
    for node in proto.graph.node:
        node.output[:] = ["mystery" if o == "last_hidden_state" else o for o in node.output]
    onnx.save(proto, str(tmp_path / "model.onnx"))
    with pytest.raises(ExportError, match="'mystery' .* no PyTorch counterpart; the model returns last_hidden_state"):
        check_parity(model, tmp_path / "model.onnx", seq_lengths=(8,))


def test_export_failure_is_an_export_error(tmp_path) -> None:
    class Unexportable(nn.Module):
        def __init__(self, linear: nn.Linear):
            super().__init__()
            self.linear = linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) + torch.linalg.svdvals(x).sum()  # no ONNX symbolic

    model = _lowrank_bert()
    model.encoder.layer[0].output.dense = Unexportable(nn.Linear(64, 32))
    with pytest.raises(ExportError, match="svdvals") as info:
        export_onnx(model, tmp_path, "feature-extraction")
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is not None


def test_onnx_size_mb_counts_external_data(bert_export, tmp_path) -> None:
    _, path = bert_export
    proto = onnx.load(str(path))
    split = tmp_path / "split.onnx"
    onnx.save_model(proto, str(split), save_as_external_data=True, location="split.onnx.data", size_threshold=0)
    expected = (split.stat().st_size + (tmp_path / "split.onnx.data").stat().st_size) / 1e6
    assert onnx_size_mb(split) == pytest.approx(expected)
    assert onnx_size_mb(path) == pytest.approx(path.stat().st_size / 1e6)


# --- feeds ---------------------------------------------------------------------------------------


def test_dummy_feeds_are_seeded_and_in_range(llama_export) -> None:
    _, path = llama_export
    session = make_session(path)
    a = build_dummy_feeds(session, 3, 10, VOCAB, seed=1)
    b = build_dummy_feeds(session, 3, 10, VOCAB, seed=1)
    assert set(a) == {i.name for i in session.get_inputs()}
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert a["input_ids"].min() >= 0 and a["input_ids"].max() < VOCAB
    assert a["attention_mask"].shape == (3, 10) and a["attention_mask"].all()
    np.testing.assert_array_equal(a["position_ids"][2], np.arange(10))
    assert a["past_key_values.1.value"].shape == (3, 2, 0, 8)


def test_calibration_feeds_from_ids(bert_export) -> None:
    _, path = bert_export
    batches = [np.array([[1, 2, 3, 4]], dtype=np.int64), np.zeros((2, 6), dtype=np.int64)]
    feeds = calibration_feeds_from_ids(path, batches)
    assert len(feeds) == 2
    assert set(feeds[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    np.testing.assert_array_equal(feeds[0]["input_ids"], batches[0])
    assert feeds[1]["token_type_ids"].shape == (2, 6) and not feeds[1]["token_type_ids"].any()
    with pytest.raises(DataError):
        calibration_feeds_from_ids(path, [np.arange(4)])  # 1-D: no batch axis


# --- quantization --------------------------------------------------------------------------------

_QUANT_OPS = {
    "dynamic_int8": "DynamicQuantizeLinear",
    "static_int8": "QuantizeLinear",
    "weight_int8": "MatMulNBits",
    "weight_int4": "MatMulNBits",
    "weight_only": "MatMulNBits",
}


def _quantize(path: Path, out: Path, method: str) -> Path:
    feeds = None
    if method == "static_int8":
        rng = np.random.default_rng(0)
        feeds = calibration_feeds_from_ids(path, [rng.integers(0, VOCAB, (2, 16)) for _ in range(4)])
    return quantize_onnx(path, out, method, calibration_feeds=feeds)


@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_quantized_bert_runs_close_and_smaller(bert_export, tmp_path, method) -> None:
    _, path = bert_export
    out = _quantize(path, tmp_path / f"{method}.onnx", method)
    onnx.checker.check_model(str(out))
    reference, got = _first_output(path), _first_output(out)
    assert got.shape == reference.shape
    if method == "none":
        np.testing.assert_array_equal(got, reference)
        return
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert _QUANT_OPS[method] in ops
    assert _cosine(got, reference) > 0.99
    assert onnx_size_mb(out) < onnx_size_mb(path)  # tiny factors: scales and zero points weigh a lot


@pytest.fixture(scope="module")
def dense_bert_path(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64,
    )
    return export_onnx(BertModel(config), tmp_path_factory.mktemp("dense") / "onnx", "feature-extraction")


# Largest quantized / fp32 size ratio for a dense model whose weights dominate the file (measured:
# 0.344, 0.348, 0.601, 0.532). The embedding tables (40% of the weights here) stay fp32 under the
# weight-only methods.
_MAX_SIZE_RATIO = {"dynamic_int8": 0.4, "static_int8": 0.4, "weight_int8": 0.65, "weight_int4": 0.6}


@pytest.mark.parametrize("method", sorted(_MAX_SIZE_RATIO))
def test_quantization_shrinks_a_dense_graph(dense_bert_path, tmp_path, method) -> None:
    out = _quantize(dense_bert_path, tmp_path / f"{method}.onnx", method)
    ratio = onnx_size_mb(out) / onnx_size_mb(dense_bert_path)
    assert ratio < _MAX_SIZE_RATIO[method]
    assert _cosine(_first_output(out), _first_output(dense_bert_path)) > 0.99


@pytest.mark.parametrize("method", [m for m in QUANTIZATION_METHODS if m != "none"])
def test_quantized_tied_llama_runs_close(llama_export, tmp_path, method) -> None:
    _, path = llama_export
    out = _quantize(path, tmp_path / f"{method}.onnx", method)
    assert _cosine(_first_output(out), _first_output(path)) > 0.99


def test_unknown_method_names_the_allowed_ones(bert_export, tmp_path) -> None:
    _, path = bert_export
    with pytest.raises(ValueError, match="unknown quantization method 'int3'") as info:
        quantize_onnx(path, tmp_path / "q.onnx", "int3")
    for allowed in QUANTIZATION_METHODS:
        assert allowed in str(info.value)


@pytest.mark.parametrize("feeds", [None, []])
def test_static_needs_calibration_feeds(bert_export, tmp_path, feeds) -> None:
    _, path = bert_export
    with pytest.raises(DataError, match="calibration_feeds"):
        quantize_onnx(path, tmp_path / "q.onnx", "static_int8", calibration_feeds=feeds)
    assert not (tmp_path / "q.onnx").exists()


def test_failed_quantization_leaves_no_output(tmp_path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx graph")
    out = tmp_path / "q.onnx"
    with pytest.raises(ExportError, match="dynamic_int8 quantization"):
        quantize_onnx(broken, out, "dynamic_int8")
    assert not out.exists()


def test_optimized_graph_quantizes(bert_export, tmp_path) -> None:
    _, path = bert_export
    with pytest.raises(ValueError, match="allowed: 0, 1, 2"):
        optimize_graph(path, tmp_path / "o.onnx", 3)
    optimized = optimize_graph(path, path.parent / "optimized.onnx", 2)
    np.testing.assert_allclose(_first_output(optimized), _first_output(path), atol=1e-5)
    quantized = quantize_onnx(optimized, tmp_path / "oq.onnx", "dynamic_int8")
    assert _cosine(_first_output(quantized), _first_output(path)) > 0.99


# --- latency -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_latency(bert_export, llama_export, which) -> None:
    _, path = bert_export if which == "bert" else llama_export
    result = measure_latency(path, batch_size=2, seq_len=16, repeats=3, warmup=1, threads=1)
    assert isinstance(result, LatencyResult)
    assert 0 < result.median_ms <= result.p90_ms
    assert (result.batch_size, result.seq_len, result.threads, result.repeats) == (2, 16, 1, 3)
    assert set(result.to_dict()) == {"median_ms", "p90_ms", "batch_size", "seq_len", "threads", "repeats"}


def test_latency_rejects_seq_len_beyond_positions(bert_export) -> None:
    _, path = bert_export
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        measure_latency(path, seq_len=256, repeats=1)


# --- import cost ---------------------------------------------------------------------------------


def test_importing_exporters_is_cheap() -> None:
    code = (
        "import sys, optimum_lowrank.exporters as e; "
        "assert callable(e.__getattr__); "
        "print(','.join(m for m in ('onnx', 'onnxruntime', 'optimum') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_tied_head_copies_are_reported(llama_export, tmp_path, caplog) -> None:
    # Both factors are used once as stored and once transposed (embedding vs head), so constant
    # folding keeps a transposed copy of each; the export says so in one warning.
    from optimum_lowrank.exporters.onnx import _transposed_copies

    model, path = llama_export
    pairs = sorted((name, nbytes) for name, _, nbytes in _transposed_copies(path))
    assert pairs == [("model.embed_tokens.emb.weight", VOCAB * RANK * 4), ("model.embed_tokens.proj.weight", 32 * RANK * 4)]
    with caplog.at_level("WARNING", logger="optimum_lowrank.exporters.onnx"):
        export_onnx(model, tmp_path, "text-generation-with-past", validate=False)
    notes = [r.getMessage() for r in caplog.records if r.name == "optimum_lowrank.exporters.onnx"]
    assert len(notes) == 1 and "2 tied parameter(s) twice" in notes[0]

"""Edge-grade weight-only quantization: embeddings and tied heads quantized, per-target bits, errors read back.

Tiny random models exported with Optimum (seconds). Tolerances are for random weights:
the relative error of a block of 32 random values at 8 bits is about 0.5%, at 4 bits about 9%.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from optimum_lowrank.errors import RecipeError, TargetError
from optimum_lowrank.exporters.nbits import dequantize, pack
from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
from optimum_lowrank.exporters.quantize import quantize_onnx
from optimum_lowrank.exporters.runtime import build_dummy_feeds, make_session
from optimum_lowrank.exporters.weight_only import (
    WeightOnlySpec,
    initializer_table,
    module_path,
    quantize_weight_only_model,
)
from optimum_lowrank.passes.svd import SVDPass
from optimum_lowrank.recipe import load_recipe

#: In a weight-only graph no float initializer may be larger than this (bytes): norms and biases only.
FLOAT_LIMIT = 4096


def _float_initializers(model: onnx.ModelProto) -> dict[str, int]:
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    return {t.name: int(np.prod(t.dims)) * 4 for t in model.graph.initializer if t.data_type in floats}


def _export(model, tmp_path):
    return export_onnx(model, tmp_path / "onnx", onnx_task(model))


def _outputs(path, vocab: int, name: str) -> np.ndarray:
    session = make_session(path)
    names = [o.name for o in session.get_outputs()]
    return session.run([name if name in names else names[0]], build_dummy_feeds(session, 2, 12, vocab, 3))[0]


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    return model, _export(model, tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("method", ["weight_int8", "weight_int4"])
def test_no_large_float_initializer_and_tied_table_stored_once(llama_fp32, tmp_path, method):
    _, fp32 = llama_fp32
    details: dict = {}
    out = quantize_onnx(fp32, tmp_path / "q.onnx", method, details=details)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    large = {k: v for k, v in _float_initializers(model).items() if v > FLOAT_LIMIT}
    assert not large, f"float initializers left: {large}"
    assert details["shared_tables"] == ["model.embed_tokens.weight"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1
    assert "model.embed_tokens.weight" not in {t.name for t in model.graph.initializer}
    # the Gather and the head read the same uint8 table
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    assert gbq.input[0] == head.input[1]
    assert all(row["dtype"] != "float32" for row in details["large_initializers"])


def test_shared_embedding_graph_matches_the_float_graph(llama_fp32, tmp_path):
    _, fp32 = llama_fp32
    details: dict = {}
    out = quantize_onnx(fp32, tmp_path / "q.onnx", "weight_int8", details=details)
    reference, quantized = _outputs(fp32, 512, "logits"), _outputs(out, 512, "logits")
    assert _relative(reference, quantized) < 0.02
    assert (reference.argmax(-1) == quantized.argmax(-1)).mean() > 0.9
    errors = details["relative_error"]
    assert 0 < errors["model.embed_tokens.weight"] < 0.01 and all(0 < e < 0.01 for e in errors.values())


def test_overrides_reach_the_right_nodes(llama_fp32):
    _, fp32 = llama_fp32
    spec = WeightOnlySpec(bits=4, embedding_bits=8, overrides=((("*down_proj",), 8), (("re:model\\.layers\\.1\\.self_attn\\.q_proj",), 2)))
    model, result = quantize_weight_only_model(onnx.load(str(fp32)), spec)
    onnx.checker.check_model(model)
    bits = {module_path(n.name.rsplit("_Q", 1)[0]): next(a.i for a in n.attribute if a.name == "bits")
            for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert bits["model.layers.0.mlp.down_proj"] == bits["model.layers.1.mlp.down_proj"] == 8
    assert bits["model.layers.1.self_attn.q_proj"] == 2 and bits["model.layers.0.self_attn.q_proj"] == 4
    assert bits["model.layers.0.mlp.up_proj"] == 4 and bits["lm_head"] == 8
    assert result.bits["/model/layers.0/mlp/down_proj/MatMul"] == 8
    # 4-bit errors are an order of magnitude above 8-bit ones
    assert result.errors["/model/layers.0/mlp/up_proj/MatMul"] > 5 * result.errors["/model/layers.0/mlp/down_proj/MatMul"]


def test_hqq_with_8_bit_layers_runs_in_ort(llama_fp32, tmp_path):
    # ORT's CPU MatMulNBits has no 8-bit kernel with float zero points: hqq's 8-bit layers are symmetric rtn
    _, fp32 = llama_fp32
    spec = WeightOnlySpec(bits=4, embedding_bits=8, algorithm="hqq", symmetric=False, overrides=((("*down_proj",), 8),))
    model, result = quantize_weight_only_model(onnx.load(str(fp32)), spec)
    onnx.checker.check_model(model)
    inputs = {module_path(n.name.rsplit("_Q", 1)[0]): (next(a.i for a in n.attribute if a.name == "bits"), len(n.input) > 3 and bool(n.input[3]))
              for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert inputs["model.layers.0.mlp.down_proj"] == (8, False) and inputs["model.layers.0.mlp.up_proj"] == (4, True)
    onnx.save(model, tmp_path / "q.onnx")
    reference, quantized = _outputs(fp32, 512, "logits"), _outputs(tmp_path / "q.onnx", 512, "logits")
    assert _relative(reference, quantized) < 0.1 and result.errors["/model/layers.0/mlp/down_proj/MatMul"] < 0.01


def test_dequantize_reads_back_what_ort_computes():
    rng = np.random.default_rng(0)
    k, n = 40, 24  # K not a multiple of the block: the last block is padded
    weight = rng.standard_normal((k, n)).astype(np.float32)
    for bits in (2, 4, 8):
        packed, scales, zero_points = pack(weight.T, bits, 16, True)
        node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=16)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
            [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        ort_weight = session.run(None, {"x": np.eye(k, dtype=np.float32)})[0]
        np.testing.assert_allclose(dequantize(packed, scales, None, bits, k).T, ort_weight, atol=1e-5)


def test_compressed_embedding_tables_are_quantized_too(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    SVDPass({"targets": ["model.embed_tokens"], "rank": 8}).run(model)
    SVDPass({"targets": ["re:.*mlp\\.down_proj"], "rank": 8}).run(model)
    fp32 = _export(model, tmp_path)
    out = quantize_onnx(fp32, tmp_path / "q.onnx", "weight_int4")
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized)
    large = {k: v for k, v in _float_initializers(quantized).items() if v > 1024}
    assert not large, f"float initializers left: {large}"
    assert _relative(_outputs(fp32, 128, "logits"), _outputs(out, 128, "logits")) < 0.5


def test_encoder_weight_only(tiny_bert, tmp_path):
    fp32 = _export(tiny_bert, tmp_path)
    out = quantize_onnx(fp32, tmp_path / "q.onnx", "weight_int8")
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized)
    assert not {k: v for k, v in _float_initializers(quantized).items() if v > FLOAT_LIMIT}
    assert _relative(_outputs(fp32, 120, "last_hidden_state"), _outputs(out, 120, "last_hidden_state")) < 0.02


def test_override_matching_nothing_is_refused_and_nothing_is_written(llama_fp32, tmp_path):
    _, fp32 = llama_fp32
    spec = WeightOnlySpec(bits=4, overrides=((("*no_such_proj",), 8),))
    with pytest.raises(TargetError, match="no_such_proj"):
        quantize_onnx(fp32, tmp_path / "q.onnx", "weight_only", weight_only=spec)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "options, match",
    [
        ({"algorithm": "gptq"}, "bit-identical to RTN"),
        ({"algorithm": "hqq", "symmetric": True}, "asymmetric"),
        ({"bits": 3}, "bits"),
        ({"block_size": 48}, "power of 2"),
        ({"overrides": [{"targets": [], "bits": 8}]}, "targets"),
    ],
)
def test_bad_weight_only_options_are_refused(options, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe({"version": 1, "export": {"quantize": "weight_only", "weight_only": options}})


def test_weight_only_block_needs_a_weight_only_method():
    with pytest.raises(RecipeError, match="weight_only options apply"):
        load_recipe({"version": 1, "export": {"quantize": "dynamic_int8", "weight_only": {"bits": 4}}})
    with pytest.raises(RecipeError, match="fixes bits 8"):
        load_recipe({"version": 1, "export": {"quantize": "weight_int8", "weight_only": {"bits": 4}}})


def test_initializer_table_lists_large_tensors(llama_fp32):
    _, fp32 = llama_fp32
    rows = initializer_table(fp32, min_bytes=100_000)
    assert rows[0]["name"] == "model.embed_tokens.weight" and rows[0]["bytes"] == 512 * 64 * 4
    assert all(r["bytes"] >= 100_000 for r in rows)


def test_shipped_graph_loads_in_optimum_and_generates(tiny_llama, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from optimum_lowrank import optimize

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]")
    recipe = {"version": 1, "export": {"quantize": "weight_only", "weight_only": {"bits": 4, "embedding_bits": 8,
              "overrides": [{"targets": ["*down_proj"], "bits": 8}]}, "latency": None}}
    report = optimize(tiny_llama, recipe, output=tmp_path / "out", tokenizer=tokenizer, progress=False)
    details = report.export.quantization_details
    assert details["shared_tables"] == ["model.embed_tokens.weight"]
    assert details["bits"]["/model/layers.0/mlp/down_proj/MatMul"] == 8 and details["bits"]["/model/layers.0/mlp/up_proj/MatMul"] == 4
    model = ORTModelForCausalLM.from_pretrained(tmp_path / "out" / "onnx", file_name="model_quantized.onnx")
    ids = torch.tensor([[1, 5, 9, 13]])
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9) and generated[0, :4].tolist() == ids[0].tolist()


def test_bits_the_installed_runtime_lacks_are_refused(monkeypatch):
    import onnxruntime
    from onnxruntime.capi import _pybind_state

    from optimum_lowrank.exporters.weight_only import check_ort_support

    monkeypatch.delattr(_pybind_state, "quantize_matmul_2bits")
    with pytest.raises(RecipeError, match=f"onnxruntime {onnxruntime.__version__} quantizes MatMulNBits weights to \\[4, 8\\] bits only, not \\[2\\]"):
        check_ort_support(WeightOnlySpec(bits=4, overrides=((("*q_proj",), 2),)))
    check_ort_support(WeightOnlySpec(bits=4))


def test_block_size_fits_the_row_length():
    from optimum_lowrank.exporters.weight_only import fit_block

    assert fit_block(576, 128) == 64 and fit_block(1536, 128) == 128 and fit_block(384, 32) == 32
    assert fit_block(40, 32) == 32  # no power of 2 >= 16 divides 40: the last block is padded

"""Sensitivity: the fake quantization is what ORT stores, the replayed blocks change nothing, the cache returns the same."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
from optimum_lowrank.exporters.quantize import quantize_onnx
from optimum_lowrank.exporters.weight_only import WeightOnlySpec, dequantize, module_path
from optimum_lowrank.search.allocate import GraphLayout
from optimum_lowrank.search.sensitivity import EmbeddingVariant, LinearTarget, Probe, fake_quantize, measure_sensitivity, model_fingerprint
from optimum_lowrank.search.setup import linear_targets


@pytest.mark.parametrize(("bits", "algorithm"), [(4, "rtn"), (8, "rtn"), (4, "hqq")])
def test_fake_quantize_is_what_ort_stores(tiny_llama, tmp_path, bits, algorithm):
    fp32 = export_onnx(tiny_llama, tmp_path / "onnx", onnx_task(tiny_llama))
    spec = WeightOnlySpec(bits=bits, embedding_bits=bits, algorithm=algorithm, symmetric=algorithm == "rtn")
    out = quantize_onnx(fp32, tmp_path / "q.onnx", "weight_only", weight_only=spec)
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.output[0] == "logits":
            continue
        k = next(a.i for a in node.attribute if a.name == "K")
        zero = inits[node.input[3]] if algorithm == "hqq" else None  # HQQ: a float zero point per block
        stored = dequantize(inits[node.input[1]], inits[node.input[2]], zero, bits, k)
        weight = tiny_llama.get_submodule(module_path(node.name.rsplit("_Q", 1)[0])).weight
        np.testing.assert_allclose(fake_quantize(weight, bits, 32, algorithm).numpy(), stored, rtol=0, atol=1e-7)
        if algorithm == "hqq":  # asymmetric with fitted zero points: closer than symmetric round-to-nearest
            assert (weight - fake_quantize(weight, bits, 32, algorithm)).norm() < (weight - fake_quantize(weight, bits, 32)).norm()
        checked += 1
    assert checked == 14
    table = tiny_llama.model.embed_tokens.weight
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    stored = dequantize(inits[gbq.input[0]], inits[gbq.input[2]], None, bits, table.shape[1])
    np.testing.assert_array_equal(fake_quantize(table, bits, 32).numpy(), stored)


def _llama_probe(model):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    return Probe(model, "decoder", [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}])


def _bert_probe(model):
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(4, 120, (4, 9), generator=g), "attention_mask": torch.ones(4, 9, dtype=torch.long)} for _ in range(2)]
    return Probe(model, "encoder", batches, pairs=4)


@pytest.mark.parametrize(("family", "make"), [("tiny_llama", _llama_probe), ("tiny_bert", _bert_probe)])
def test_replayed_blocks_give_the_full_forward(family, make, request):
    model = request.getfixturevalue(family)
    probe = make(model)
    assert len(probe.blocks) == 2 and probe.measure() == (0.0, None if family == "tiny_llama" else 0.0)
    name = "model.layers.1.mlp.down_proj" if family == "tiny_llama" else "encoder.layer.1.output.dense"
    assert probe.block_of(name) == 1
    weight = model.get_submodule(name).weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(fake_quantize(saved, 2, 32))
    replayed, full = probe.measure(start_block=1), probe.measure(start_block=0)
    with torch.no_grad():
        weight.copy_(saved)
    assert replayed[0] != 0  # random weights: the NLL may move either way
    torch.testing.assert_close(torch.tensor(replayed[0]), torch.tensor(full[0]), rtol=1e-5, atol=1e-9)
    assert probe.measure() == (0.0, None if family == "tiny_llama" else 0.0)  # restored, forwards unpatched


def test_measure_sensitivity_orders_bits_and_caches(tiny_llama, tmp_path):
    fingerprint = model_fingerprint(tiny_llama)
    fp32 = export_onnx(tiny_llama, tmp_path / "onnx", onnx_task(tiny_llama))
    layout = GraphLayout.from_graph(onnx.load(str(fp32)), 1, "model.embed_tokens")
    targets, unmeasured = linear_targets(tiny_llama, layout)
    assert len(targets) == 14 and unmeasured == []
    probe = _llama_probe(tiny_llama)
    variant = EmbeddingVariant(1.0, tiny_llama, (tiny_llama.model.embed_tokens.weight,), ())
    cache = tmp_path / "sens.json"
    result = measure_sensitivity(probe, targets, [variant], (8, 4), (8, 4), (32, 16), cache_file=cache)
    assert model_fingerprint(tiny_llama) == fingerprint  # every weight restored
    # measured: 4 bits in blocks of 16 per layer, the embedding at 2 x 2 choices; the rest estimated
    assert result.measurements == 14 + 4 and len(result.estimated) == 14 * 3 and not result.cached
    for name, damages in result.linears.items():
        errors = result.errors[name]
        assert errors["4/32"] > errors["4/16"] > 10 * errors["8/16"] > 0
        assert damages["8/16"] == pytest.approx(damages["4/16"] * (errors["8/16"] / errors["4/16"]) ** 2, rel=1e-4)
        assert damages["4/32"] == pytest.approx(damages["4/16"] * (errors["4/32"] / errors["4/16"]) ** 2, rel=1e-4)
    assert abs(result.embedding["1/4/32"]) > abs(result.embedding["1/8/32"])
    again = measure_sensitivity(probe, targets, [variant], (8, 4), (8, 4), (32, 16), cache_file=cache)
    assert again.cached and again.linears == result.linears and again.embedding == result.embedding
    every = measure_sensitivity(probe, targets[:2], [], (8, 4), (8,), (32,), measure_all_bits=True)
    assert every.measurements == 4 and not every.estimated


def test_linear_targets_skip_what_is_not_a_linear_of_the_exported_shape(tiny_llama):
    layout = GraphLayout(0, linears={"model.layers.0.mlp.down_proj": [(32, 64)], "model.layers.0.mlp.up_proj": [(32, 64)], "nowhere": [(2, 2)]})
    targets, unmeasured = linear_targets(tiny_llama, layout)
    assert [t.name for t in targets] == ["model.layers.0.mlp.down_proj"] and unmeasured == ["model.layers.0.mlp.up_proj", "nowhere"]
    assert isinstance(targets[0], LinearTarget) and targets[0].rows().shape == (32, 64)

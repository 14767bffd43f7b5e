"""Byte model vs the files the exporter writes, and the greedy path's properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optimum_lowrank.exporters.nbits import pack
from optimum_lowrank.exporters.onnx import export_onnx, onnx_size_mb, onnx_task
from optimum_lowrank.exporters.quantize import quantize_onnx
from optimum_lowrank.exporters.weight_only import fit_block
from optimum_lowrank.models import LoadedModel
from optimum_lowrank.search.allocate import Choice, DamageModel, Unit, fill_gap, greedy_path, matmul_bytes, pick_index
from optimum_lowrank.search.config import SearchConfig
from optimum_lowrank.search.setup import SearchSetup, weight_only_spec
from tests.search.conftest import word_tokenizer

#: Predicted bytes within this share of the real file (tiny graphs; on MiniLM / SmolLM2 the framing is noise).
TOLERANCE = 0.02


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("k", "block"), [(40, 16), (64, 32), (10, 32), (96, 64), (576, 128)])
def test_matmul_bytes_is_what_pack_stores(bits, k, block):
    fitted = fit_block(k, block)  # the exporter's block for rows of k values: 96 in 32s, 576 in 64s
    packed, scales, _ = pack(np.random.default_rng(0).standard_normal((24, k)).astype(np.float32), bits, fitted, True)
    assert matmul_bytes(24, k, bits, block) == packed.nbytes + scales.nbytes


def _setup(model, tokenizer, kind, sts_files, text_files, **config):
    train, dev = sts_files if kind == "encoder" else text_files
    config = SearchConfig(max_drop=1.0, data=str(dev), search_data=str(train), **config) if kind == "encoder" else \
        SearchConfig(max_increase=0.05, data=str(dev), search_data=str(train), **config)
    return SearchSetup(config, LoadedModel(model, tokenizer, kind, "tiny"))


def _check(setup, layout, fp32, tmp_path, ratio=1.0):
    units = list(layout.linears)
    for case, (ebits, block, algorithm) in enumerate([(8, 32, "rtn"), (4, 64, "rtn"), (8, 32, "hqq")]):
        bits = {u: (4 if (i + case) % 3 else 8) for i, u in enumerate(units)}  # mixed widths
        spec = weight_only_spec(setup, fp32, bits, ebits, ratio, block, algorithm)
        assert spec.algorithm == algorithm and spec.symmetric == (algorithm == "rtn")
        out = quantize_onnx(fp32, tmp_path / f"q{case}.onnx", "weight_only", weight_only=spec)
        real = onnx_size_mb(out) * 1e6
        predicted = layout.nbytes(bits, ebits, block, algorithm)
        assert abs(predicted - real) / real < TOLERANCE, (case, predicted, real)


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_gpt2", "tiny_llama"])
def test_byte_model_matches_the_quantized_file(family, request, tmp_path, sts_files, text_files):
    model = request.getfixturevalue(family)
    kind = "encoder" if family == "tiny_bert" else "decoder"
    setup = _setup(model, word_tokenizer(model.config.vocab_size), kind, sts_files, text_files)
    fp32 = export_onnx(model, tmp_path / "onnx", onnx_task(model))
    layout = setup.layout(fp32)
    assert layout.fixed_bytes > 0
    if family == "tiny_llama":  # the tied table is stored once, its scales twice
        assert layout.tables == {"model.embed_tokens.weight": (128, 32, True)}
    if family == "tiny_gpt2":  # Conv1D exports as Gemm: nothing for MatMulNBits, the tied table and wpe only
        assert layout.linears == {} and set(layout.tables) == {"transformer.wte.weight", "transformer.wpe.weight"}
    _check(setup, layout, fp32, tmp_path)


def test_byte_model_of_a_factorized_table(tiny_bert, tmp_path, sts_files, text_files):
    setup = _setup(tiny_bert, word_tokenizer(120), "encoder", sts_files, text_files, keep_share=0.3)
    layout = setup.layout(export_onnx(tiny_bert, tmp_path / "orig", onnx_task(tiny_bert)))
    variant, predicted = setup.factorize(tiny_bert, layout, 2.0)
    assert variant.linears and setup.keep_top_k(2.0) == 0  # V = 120: round(0.3 * 120 / 2, -2) = 0
    fp32 = export_onnx(variant.model, tmp_path / "fact", onnx_task(variant.model))
    real = setup.layout(fp32)
    assert abs(real.fixed_bytes - predicted.fixed_bytes) / real.fixed_bytes < TOLERANCE
    assert sorted(real.group_linears) == sorted(predicted.group_linears) and set(real.tables) == set(predicted.tables)
    _check(setup, predicted, fp32, tmp_path, ratio=2.0)


def _unit(name, *choices):
    return Unit(name, tuple(Choice(value, nbytes, damage) for value, nbytes, damage in choices))


def test_greedy_path_takes_the_least_damage_per_byte_first():
    units = [
        _unit("a", ((8,), 100, 0.0), ((4,), 60, 4.0)),  # 0.1 per byte
        _unit("b", ((8,), 100, 0.0), ((4,), 60, 0.4)),  # 0.01 per byte
        _unit("emb", ((1, 8), 200, 0.0), ((1, 4), 120, 1.0), ((5, 8), 220, 3.0), ((5, 4), 50, 2.0)),  # (5, 8): beaten, dropped
    ]
    path = greedy_path(units, fixed_bytes=10)
    assert [p.nbytes for p in path] == sorted((p.nbytes for p in path), reverse=True)
    assert path[0].nbytes == 410 and path[0].picks == (0, 0, 0)
    assert path[1].step == "b: 8-bit -> 4-bit"
    assert path[-1].picks == (1, 1, 3) and path[-1].nbytes == 10 + 60 + 60 + 50
    assert all(2 not in p.picks[2:] for p in path)
    assert greedy_path(units, 10) == path  # deterministic
    assert math.isclose(path[-1].damage, 4.0 + 0.4 + 2.0)


def test_damage_model_and_pick_index():
    log = DamageModel("log", 1.0)
    assert math.isclose(log.metric_damage(math.log(1.05)), 0.05)
    log.fit(0.1, 0.05)
    assert math.isclose(log.metric_damage(0.1), 0.05)
    additive = DamageModel("additive", 50.0)
    additive.fit(0.02, 2.0)
    assert additive.scale == 100.0
    additive.fit(0.02, -1.0)  # a gain says nothing about the scale
    assert additive.scale == 100.0
    units = [_unit(f"u{i}", ((8,), 100, 0.0), ((4,), 60, 0.01 * (i + 1))) for i in range(5)]
    path = greedy_path(units, 0)
    assert pick_index(path, "max_drop", 3.5, additive, -1, len(path)) == 2  # points 0, 1, 3, 6, ... (100 x proxy)
    assert pick_index(path, "max_drop", 3.5, additive, 2, 4) == 3  # clamped into the bracket
    assert pick_index(path, "size_mb", 420 / 1e6, additive, -1, len(path)) == 2
    assert pick_index(path, "size_mb", 420 / 1e6, additive, -1, len(path), size_offset=40) == 3


def test_fill_gap_keeps_the_big_step_and_gives_layers_their_bits_back():
    units = [_unit("a", ((8,), 100, 0.0), ((4,), 60, 0.1)), _unit("b", ((8,), 100, 0.0), ((4,), 60, 0.2)),
             _unit("emb", ((1, 8), 300, 0.0), ((5, 8), 100, 1.0))]
    path = greedy_path(units, 0)
    assert [p.nbytes for p in path] == [500, 460, 420, 220]  # the last step factorizes the table: 200 bytes at once
    extra = fill_gap(units, path[3], limit_bytes=path[2].nbytes, fixed_bytes=0)
    assert [(p.nbytes, p.picks) for p in extra] == [(260, (1, 0, 1)), (300, (0, 0, 1))]  # b first: most damage per byte
    assert extra[0].step == "gap: b: 4-bit -> 8-bit" and extra[1].damage == pytest.approx(1.0)
    assert fill_gap(units, path[3], limit_bytes=250, fixed_bytes=0) == []


def test_cross_check_verifies_another_path_that_now_predicts_a_smaller_graph(monkeypatch):
    from types import SimpleNamespace

    from optimum_lowrank.search import run
    from optimum_lowrank.search.allocate import PathPoint
    from optimum_lowrank.search.report import Candidate

    def path(*points):
        return [PathPoint(i, (), nbytes, proxy, "") for i, (nbytes, proxy) in enumerate(points)]

    # block 64 was verified (its guess failed, 120 MB passed); block 32 predicts 116 MB at almost no damage
    paths = {(64, "hqq"): ([], path((130e6, 0.0), (120e6, 0.04), (115e6, 0.0485))), (32, "hqq"): ([], path((116e6, 0.0005), (100e6, 0.2)))}
    setup = SimpleNamespace(config=SearchConfig(max_increase=0.05))
    evaluated = []

    def evaluate(setup, units, point, block, algorithm, *args, name):
        evaluated.append((block, algorithm, point.index))
        return Candidate(index=point.index, ratio=1.0, embedding_bits=8, bits={}, predicted_bytes=point.nbytes, nbytes=int(point.nbytes),
                         proxy=point.damage, search=20.0, damage=0.001, seconds=0.0)

    monkeypatch.setattr(run, "_evaluate", evaluate)
    report = SimpleNamespace(candidates=[])
    chosen = Candidate(index=1, ratio=1.0, embedding_bits=8, bits={}, predicted_bytes=120e6, nbytes=120_000_000, proxy=0.04, search=20.4,
                       damage=0.049, seconds=0.0)
    variant, candidate = run._cross_check(setup, paths, (64, "hqq"), DamageModel("log", 1.0), chosen, None, None, None, None, 19.45, report, None)
    assert variant == (32, "hqq") and evaluated == [(32, "hqq", 0)] and candidate.passed and report.candidates == [candidate]
    # nothing smaller predicted within the budget: no extra round
    smaller = Candidate(index=1, ratio=1.0, embedding_bits=8, bits={}, predicted_bytes=110e6, nbytes=110_000_000, proxy=0.04, search=20.4,
                        damage=0.049, seconds=0.0)
    assert run._cross_check(setup, paths, (64, "hqq"), DamageModel("log", 1.0), smaller, None, None, None, None, 19.45, report, None) is None
    assert run._cross_check(SimpleNamespace(config=SearchConfig(size_mb=100)), paths, (64, "hqq"), DamageModel("log", 1.0), None,
                            None, None, None, None, 19.45, report, None) is None
    assert len(evaluated) == 1

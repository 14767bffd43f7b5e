"""Sequential onloading: block by block from safetensors gives the whole-model result; bad inputs fail clearly."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_lowrank import optimize
from optimum_lowrank.errors import DeviceError, ModelLoadError, PassError, RecipeError
from optimum_lowrank.execution import load_compressed, resolve_device
from optimum_lowrank.execution.checkpoint import SourceCheckpoint
from optimum_lowrank.execution.sequential import compress_sequentially
from optimum_lowrank.layers.lowrank import LowRankLinear
from optimum_lowrank.passes.linear.activation_svd import ActivationSVDPass
from optimum_lowrank.passes.svd import SVDPass
from optimum_lowrank.testing import tiny_bert, tiny_context, tiny_llama
from tests.helpers import WordTokenizer

OPTIONS = {
    "decoder": {"targets": ["re:.*_proj"], "rank_ratio": 0.25},
    "encoder": {"targets": ["re:encoder.*(query|value|dense)"], "rank_ratio": 0.25},
}


def _low_rank(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


@pytest.mark.parametrize(("factory", "kind"), [(tiny_llama, "decoder"), (tiny_bert, "encoder")])
@pytest.mark.parametrize("method", ["svd_llm", "asvd"])
def test_sequential_equals_whole_model(tmp_path, factory, kind, method):
    """Same factors, bit for bit: block i sees the original block i-1's outputs, as the whole-model pass does."""
    model = factory()
    model.save_pretrained(tmp_path / "src")
    options = {**OPTIONS[kind], "method": method}
    whole = copy.deepcopy(model)
    whole_reports = ActivationSVDPass(options).run(whole, tiny_context(kind=kind))
    (tmp_path / "out").mkdir()
    result = compress_sequentially(SourceCheckpoint(tmp_path / "src"), [ActivationSVDPass(options)], tiny_context(kind=kind),
                                   tmp_path / "out", kind=kind)
    assert [(r.name, r.rank, r.metrics) for r in result.layers[0]] == [(r.name, r.rank, r.metrics) for r in whole_reports]
    assert len(result.block_seconds) == 2 and result.peak_rss_mb > 0
    sequential = load_compressed(tmp_path / "out")
    expected, got = _low_rank(whole), _low_rank(sequential)
    assert list(expected) == list(got) and len(got) > 4
    for name, layer in expected.items():
        torch.testing.assert_close(got[name].up.weight, layer.up.weight, rtol=0, atol=0)
        torch.testing.assert_close(got[name].down.weight, layer.down.weight, rtol=0, atol=0)
    assert sum(p.numel() for p in sequential.parameters()) == sum(p.numel() for p in whole.parameters()) == result.params_after
    ids = tiny_context(kind=kind).calibration_ids[:2]
    with torch.no_grad():
        args = {"use_cache": False} if kind == "decoder" else {}
        torch.testing.assert_close(sequential(input_ids=ids, **args)[0], whole(input_ids=ids, **args)[0], rtol=0, atol=0)


def test_two_passes_follow_recipe_order(tmp_path):
    """A data-free pass after a calibrated one, block by block, equals the two passes on the whole model."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "src")
    first = {"targets": ["re:.*mlp.*"], "rank_ratio": 0.25}
    second = {"targets": ["re:.*self_attn.*"], "rank": 8}
    whole = copy.deepcopy(model)
    ActivationSVDPass(first).run(whole, tiny_context(kind="decoder"))
    SVDPass(second).run(whole, tiny_context(kind="decoder"))
    result = compress_sequentially(SourceCheckpoint(tmp_path / "src"), [ActivationSVDPass(first), SVDPass(second)],
                                   tiny_context(kind="decoder"), None, kind="decoder")
    assert result.folder is None and [len(step) for step in result.layers] == [6, 8]
    assert result.params_after == sum(p.numel() for p in whole.parameters())


def test_on_block_is_called_after_each_block_is_written_and_freed(tmp_path):
    """on_block(i, seconds) runs once per block, in order, after the block's file is written; seconds are block_seconds."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    calls = []

    def on_block(i, seconds):
        calls.append((i, seconds, (tmp_path / "out" / f"block-{i:05d}.safetensors").is_file()))

    result = compress_sequentially(SourceCheckpoint(tmp_path / "src"), [ActivationSVDPass(OPTIONS["decoder"])], tiny_context(kind="decoder"),
                                   tmp_path / "out", kind="decoder", on_block=on_block)
    assert [(i, written) for i, _, written in calls] == [(0, True), (1, True)]
    assert [seconds for _, seconds, _ in calls] == result.block_seconds


def _recipe(tmp_path, **extra):
    g = torch.Generator().manual_seed(0)
    (tmp_path / "cal.txt").write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 128, (3000,), generator=g)))
    return {"version": 1, "calibration": {"data": str(tmp_path / "cal.txt"), "num_samples": 6, "seq_len": 16},
            "passes": [{"pass": "activation_svd", "targets": ["re:.*_proj"], "rank_ratio": 0.25}], **extra}


def test_optimize_sequential_matches_whole_and_keeps_checkpoint(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "src")
    seq = optimize(str(tmp_path / "src"), _recipe(tmp_path, execution={"mode": "sequential"}), tmp_path / "out",
                   tokenizer=WordTokenizer(), progress=False)
    whole = optimize(str(tmp_path / "src"), _recipe(tmp_path, execution={"mode": "whole"}), tokenizer=WordTokenizer(), progress=False)
    assert (seq.params_before, seq.params_after) == (whole.params_before, whole.params_after)
    assert seq.params_after < seq.params_before
    assert [(a.rank, a.metrics) for a in seq.passes[0].layers] == [(b.rank, b.metrics) for b in whole.passes[0].layers]
    assert any(n.startswith("sequential mode (execution.mode: sequential): 2 blocks") for n in seq.notes)
    model = load_compressed(tmp_path / "out" / "checkpoint")
    assert sum(p.numel() for p in model.parameters()) == seq.params_after
    assert not list(tmp_path.glob(".out.*")), "no staging folder left"


@pytest.mark.parametrize(("limit", "mode"), [(1e-6, "sequential mode"), (1000.0, "whole-model mode")])
def test_auto_mode_states_its_threshold(tmp_path, tiny_llama, limit, mode):
    tiny_llama.save_pretrained(tmp_path / "src")
    report = optimize(str(tmp_path / "src"), _recipe(tmp_path, execution={"mode": "auto", "memory_limit_gb": limit}),
                      tokenizer=WordTokenizer(), progress=False)
    note = next(n for n in report.notes if "execution.mode: auto" in n)
    assert f"threshold {limit:.3g} GB (memory_limit_gb): {mode}" in note


def test_auto_mode_falls_back_to_whole_for_a_whole_model_pass(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "src")
    recipe = _recipe(tmp_path, execution={"mode": "auto", "memory_limit_gb": 1e-6})
    recipe["passes"][0] = {"pass": "activation_svd", "targets": ["re:.*_proj"], "target_params_ratio": 0.8, "allocation": "relative"}
    report = optimize(str(tmp_path / "src"), recipe, tokenizer=WordTokenizer(), progress=False)
    assert any("whole-model mode anyway, since pass 'activation_svd' with target_params_ratio" in n for n in report.notes)


def test_sequential_refuses_a_whole_model_pass_by_name(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "src")
    recipe = _recipe(tmp_path, execution={"mode": "sequential"})
    recipe["passes"].append({"pass": "softlm", "targets": ["re:.*mlp.*"], "target_params_ratio": 0.5})
    with pytest.raises(RecipeError, match="pass 'softlm' needs the whole model.*Passes that can run sequentially: activation_svd, svd"):
        optimize(str(tmp_path / "src"), recipe, tmp_path / "out", tokenizer=WordTokenizer(), progress=False)
    assert not (tmp_path / "out").exists()


def test_sequential_refuses_finetune_and_accuracy(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "src")
    recipe = _recipe(tmp_path, execution={"mode": "sequential"}, finetune={"steps": 1})
    with pytest.raises(RecipeError, match="finetune: trains the whole compressed model"):
        optimize(str(tmp_path / "src"), recipe, tokenizer=WordTokenizer(), progress=False)


def test_sequential_refuses_targets_outside_the_blocks(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "src")
    with pytest.raises(PassError, match=r"inside the blocks \(model.layers.N\); pass 'svd' also targets lm_head"):
        compress_sequentially(SourceCheckpoint(tmp_path / "src"), [SVDPass({"targets": ["lm_head", "re:.*q_proj"], "rank": 4})],
                              tiny_context(kind="decoder"), None, kind="decoder")


def test_sequential_needs_a_safetensors_folder(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ModelLoadError, match="streams weights from safetensors files"):
        SourceCheckpoint(tmp_path / "bin")
    with pytest.raises(ModelLoadError, match="streams weights from a local folder"):
        optimize(tiny_llama, _recipe(tmp_path, execution={"mode": "sequential"}), tokenizer=WordTokenizer(), progress=False)


def test_device_flag():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cuda asked for CUDA, but torch sees no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_device_cuda_without_cuda(tmp_path, capsys):
    from optimum_lowrank.cli import main

    (tmp_path / "r.yaml").write_text("version: 1\n")
    assert main(["optimize", "--model", "minilm", "--recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sequential_execution_refuses_in_memory_sequential_option():
    from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass

    config = ActivationSVDConfig(targets=["re:.*mlp.*"], rank=4, sequential=True)
    problem = ActivationSVDPass(config).sequential_problem()
    assert problem is not None and "sequential: true" in problem
    assert ActivationSVDPass(ActivationSVDConfig(targets=["re:.*mlp.*"], rank=4)).sequential_problem() is None

"""structured_prune on tiny random Llamas (GQA): gated == removed, KV-cache export, save/load, bad input."""

from __future__ import annotations

import pytest
import torch

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.errors import PassError, TargetError
from optimum_lowrank.layers.pruned import BiasOnlyMLP
from optimum_lowrank.passes.pruning.decoder import decoder_sizes
from optimum_lowrank.passes.pruning.structure import expected_sparsity, install_gates, remove_closed, set_gate_values
from optimum_lowrank.passes.pruning.structured import StructuredPrunePass
from optimum_lowrank.testing import tiny_context
from tests.helpers import fill_gates, randomize_gates, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["model.layers.0", "model.layers.1", "model.layers.2"]
TARGETS = ["re:model\\.layers\\.\\d+"]


def llama(seed: int = 0, heads: int = 4, kv_heads: int = 2):
    """A random 3-layer LlamaForCausalLM (vocab 1000, hidden 64, intermediate 128, GQA), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))


def _gated(model, closed_attention: int | None = 0, closed_mlp: int | None = 1):
    gates = install_gates({n: model.get_submodule(n) for n in LAYERS}, 0.5, sublayers=True)
    randomize_gates(gates)
    with torch.no_grad():
        for g in gates:
            g.ffn.log_alpha.fill_(10.0)
        if closed_attention is not None:
            gates[closed_attention].heads.log_alpha.fill_(-10.0)  # every query slot closes
        if closed_mlp is not None:
            gates[closed_mlp].ffn.log_alpha.fill_(-10.0)  # the whole MLP closes
    return gates


@pytest.mark.parametrize("heads", [4, 8])
def test_pruned_and_removed_decoder_equals_the_gated_decoder(heads):
    model = llama(heads=heads)
    gates = _gated(model)
    set_gate_values(gates, "deterministic")
    ids = _ids()
    with torch.no_grad():
        gated = model(input_ids=ids).logits
    before = count_parameters(model)
    set_gate_values(gates, "off")
    shapes = remove_closed(gates)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        removed = model(input_ids=ids).logits
        torch.testing.assert_close(removed, gated, atol=1e-5, rtol=0)
        prefix = model(input_ids=ids[:, :-1], use_cache=True)  # the KV cache still works, one step = the full pass
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step[:, -1], removed[:, -1], atol=1e-5, rtol=0)
    assert shapes[0]["heads_kept"] == 0 and shapes[0]["mha_removed"]
    attn0 = model.model.layers[0].self_attn
    assert attn0.num_key_value_groups == 1 and torch.count_nonzero(attn0.o_proj.weight) == 0  # one zeroed slot for the cache
    assert isinstance(model.model.layers[1].mlp, BiasOnlyMLP) and shapes[1]["ffn_removed"]
    for layer, shape in zip(model.model.layers, shapes):
        attn = layer.self_attn
        assert attn.k_proj.out_features == 2 * attn.head_dim  # every layer keeps its key/value heads
        assert attn.q_proj.out_features == 2 * attn.num_key_value_groups * attn.head_dim
        assert shape["heads_total"] == heads and shape["heads_kept"] % 2 == 0
    assert count_parameters(model) < before


def test_expected_sparsity_counts_key_value_projections_as_kept():
    model = llama()
    gates = install_gates({n: model.get_submodule(n) for n in LAYERS}, 0.5, sublayers=True)
    fill_gates(gates, 20.0)
    assert float(expected_sparsity(gates)) == pytest.approx(0.0, abs=1e-6)
    fill_gates(gates, -20.0, ("heads", "ffn"))
    full, _ = decoder_sizes(gates[0])
    kv = 2 * 64 * 32  # k_proj + v_proj: 2 KV heads of 16 dims
    assert full == 2 * 64 * 64 + kv + 3 * 64 * 128
    assert float(expected_sparsity(gates)) == pytest.approx(1 - kv / full, abs=1e-6)


@pytest.fixture(scope="module")
def pruned_llama():
    """A tiny Llama pruned by the pass on calibration windows (module-scoped: exported and saved below)."""
    model = llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    context = tiny_context(kind="decoder")
    options = {"targets": TARGETS, "target_sparsity": 0.5, "steps": 12, "batch_size": 4, "max_length": 16,
               "mask_lr": 0.5, "sparsity_warmup": 0.2, "finetune_steps": 2}
    pruned = model
    reports = StructuredPrunePass(options).run(pruned, context)
    return original, pruned, reports, context


def test_the_pass_prunes_a_decoder_on_calibration_windows(pruned_llama):
    original, model, reports, context = pruned_llama
    assert len(reports) == 3 and all(r.action == "replaced" for r in reports)
    assert sum(r.params_after for r in reports) < sum(r.params_before for r in reports)
    assert any("next-token KL distillation on 8 calibration windows" in note for note in context.notes)
    assert all(r.metrics["heads_total"] == 4 for r in reports)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids()).logits).all()


@pytest.mark.parametrize("which", ["trained", "attention and MLP removed"])
def test_pruned_decoder_exports_with_kv_cache_and_matches_onnx_runtime(which, pruned_llama, tmp_path):
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
    from optimum_lowrank.exporters.parity import check_parity

    if which == "trained":
        _, model, _, _ = pruned_llama
    else:  # layer 0: every query slot closed; layer 1: MLP removed; layer 2: partly pruned
        model = llama(heads=8)
        gates = _gated(model)
        remove_closed(gates)
        assert len({layer.self_attn.num_key_value_groups for layer in model.model.layers}) > 1
    assert onnx_task(model) == "text-generation-with-past"
    path = export_onnx(model, tmp_path / "onnx", onnx_task(model))
    parity = check_parity(model, path, atol=1e-4, seq_lengths=(8, 24), vocab_size=1000)
    assert parity.passed, parity.describe()
    import onnxruntime

    names = {o.name for o in onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()}
    assert {f"present.{i}.key" for i in range(3)} <= names


def test_pruned_decoder_save_load_round_trip_is_exact(pruned_llama, tmp_path):
    from optimum_lowrank.saving import from_pretrained, save_pretrained

    _, model, _, _ = pruned_llama
    save_pretrained(model, tmp_path / "saved")
    loaded = from_pretrained(tmp_path / "saved")
    for layer, again in zip(model.model.layers, loaded.model.layers):
        assert again.self_attn.num_key_value_groups == layer.self_attn.num_key_value_groups
        assert type(again.mlp) is type(layer.mlp)
    ids = _ids()
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max()) == 0.0


def test_decoder_trains_on_a_text_file(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text(" ".join(["the good movie", "a bad film", "very fine", "not awful"] * 40) + "\n")
    context = PassContext(kind="decoder", tokenizer=word_tokenizer(tmp_path))
    model = llama()
    StructuredPrunePass({"targets": TARGETS, "target_sparsity": 0.3, "data": str(text), "steps": 2, "batch_size": 2,
                         "max_length": 16, "max_examples": 5}).run(model, context)
    assert any("next-token KL distillation on 5 windows of" in note for note in context.notes)


def test_a_model_neither_bert_nor_llama_is_a_clear_error(tiny_gpt2):
    state = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    with pytest.raises(TargetError, match="BertLayer.*LlamaDecoderLayer"):
        StructuredPrunePass({"targets": ["re:transformer\\.h\\.\\d+"], "target_sparsity": 0.5}).run(
            tiny_gpt2, tiny_context(vocab_size=100, kind="decoder"))
    assert all(torch.equal(v, state[k]) for k, v in tiny_gpt2.state_dict().items())


def test_task_objective_on_a_decoder_and_an_already_pruned_decoder_are_errors(pruned_llama):
    model = llama()
    with pytest.raises(PassError, match="objective 'task' needs a ...ForSequenceClassification"):
        StructuredPrunePass({"targets": TARGETS, "target_sparsity": 0.5, "objective": "task"}).run(model, tiny_context(kind="decoder"))
    _, pruned, _, _ = pruned_llama
    state = {k: v.clone() for k, v in pruned.state_dict().items()}
    with pytest.raises(PassError, match="already pruned"):
        StructuredPrunePass({"targets": TARGETS, "target_sparsity": 0.5, "steps": 1}).run(pruned, tiny_context(kind="decoder"))
    assert pruned.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in pruned.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pruned.modules())

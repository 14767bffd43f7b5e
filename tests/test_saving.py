"""save_pretrained / from_pretrained: every registered layer class rebuilt exactly, ties kept, loud failures."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

from optimum_lowrank import UnknownLayerError, from_pretrained, hookimpl, save_pretrained
from optimum_lowrank.errors import DuplicateLayerError, ModelLoadError
from optimum_lowrank.layers import (
    AffineFactorHead,
    AutoencoderEmbedding,
    FourierEmbedding,
    HybridEmbedding,
    HybridHead,
    LowRankEmbedding,
    LowRankHead,
    LowRankLinear,
    MaterializedHead,
    TTEmbedding,
    TTMatrixEmbedding,
)
from optimum_lowrank.layers.hybrid import frequency_slots
from optimum_lowrank.layers.pruned import BiasOnlyAttention, BiasOnlyOutput, PassThrough
from optimum_lowrank.layers.serial import LAYER_CLASSES, TORCH_LAYERS
from optimum_lowrank.layers.token_dropping import TokenDroppingEncoder, TokenKeepPredictor
from optimum_lowrank.plugins import LayerRegistry, get_layer_registry, get_plugin_manager
from optimum_lowrank.saving import CONFIG_NAME, MODEL_TYPE, WEIGHTS_NAME


def _tie_head(model: nn.Module, embedding: nn.Module, head: nn.Module) -> None:
    model.model.embed_tokens = embedding
    model.lm_head = head
    model.config.tie_word_embeddings = False


def _low_rank(model):
    model.model.layers[0].mlp.up_proj = LowRankLinear.from_linear(model.model.layers[0].mlp.up_proj, 8)
    embedding = LowRankEmbedding.from_embedding(model.model.embed_tokens, 8)
    _tie_head(model, embedding, LowRankHead(embedding))


def _autoencoder(model):
    embedding = AutoencoderEmbedding(128, 32, 6)
    _tie_head(model, embedding, AffineFactorHead(embedding, bias=torch.randn(128)))


def _tt(model):
    embedding = TTEmbedding.from_weight(model.model.embed_tokens.weight, shape=(4, 8), max_rank=4)
    _tie_head(model, embedding, MaterializedHead(embedding))


def _tt_matrix(model):
    embedding = TTMatrixEmbedding.from_weight(model.model.embed_tokens.weight, vocab_shape=(8, 16), dim_shape=(4, 8), max_rank=4)
    _tie_head(model, embedding, MaterializedHead(embedding))


def _fourier(model):
    embedding = FourierEmbedding(128, 32, hidden_dim=16, mlp="geglu")
    _tie_head(model, embedding, MaterializedHead(embedding))


def _hybrid(model):
    weight = model.model.embed_tokens.weight.detach()
    kept, rest_ids = frequency_slots(torch.randint(0, 50, (128,)).float(), 16)
    rest = LowRankEmbedding.from_embedding(nn.Embedding.from_pretrained(weight[rest_ids]), 4)
    embedding = HybridEmbedding.from_ids(weight[kept], kept, rest_ids, rest)
    _tie_head(model, embedding, HybridHead(embedding, LowRankHead(rest), bias=None))


def _pruned(model):
    first, second = model.encoder.layer
    first.attention = BiasOnlyAttention(torch.randn(32), first.attention.output.LayerNorm)
    first.intermediate = PassThrough()
    first.output = BiasOnlyOutput(torch.randn(32), first.output.LayerNorm)
    second.attention.prune_heads([0, 2])  # resizes Q/K/V/output Linears, changes head counts in place
    keep = torch.tensor([0, 3, 5, 9, 17, 40])
    up, down = second.intermediate.dense, second.output.dense
    second.intermediate.dense = nn.Linear(32, keep.numel())
    second.output.dense = nn.Linear(keep.numel(), 32)
    with torch.no_grad():
        second.intermediate.dense.weight.copy_(up.weight[keep])
        second.output.dense.weight.copy_(down.weight[:, keep])


def _pruned_llama(model):
    """structured_prune's decoder removal: fewer query heads per KV group (an attribute), smaller projections, an MLP removed."""
    from optimum_lowrank.passes.pruning.structure import install_gates, remove_closed

    gates = install_gates({f"model.layers.{i}": model.model.layers[i] for i in range(2)}, 0.5, sublayers=True)
    with torch.no_grad():
        gates[0].heads.log_alpha.copy_(torch.tensor([5.0, -5.0]))
        gates[0].ffn.log_alpha.fill_(5.0)
        gates[1].ffn.log_alpha.fill_(-10.0)
    remove_closed(gates)
    assert model.model.layers[0].self_attn.num_key_value_groups == 1


def _token_dropping(model):
    layers = model.encoder.layer
    predictor = TokenKeepPredictor(32, init_bias=0.0)
    with torch.no_grad():
        predictor.net[-1].weight.normal_()  # some tokens kept, some dropped
    model.encoder = TokenDroppingEncoder(layers, nn.ModuleList([nn.Identity(), predictor]), restore_positions=True)


def _token_dropping_linear(model):
    """A cheap predictor (``LayerNorm -> Linear(D, 2)``, ``predictor_hidden: 0``) before the first layer only."""
    layers = model.encoder.layer
    predictor = TokenKeepPredictor(32, init_bias=0.0, inner=0)
    with torch.no_grad():
        predictor.net[-1].weight.normal_()
    model.encoder = TokenDroppingEncoder(layers, nn.ModuleList([predictor, nn.Identity()]), restore_positions=True)


def _resized_table(model):
    """A pass may also leave a plain torch module of another shape (here a vocabulary cut to 100 rows)."""
    old = model.embeddings.word_embeddings
    model.embeddings.word_embeddings = nn.Embedding(100, 32, padding_idx=0)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.copy_(old.weight[:100])


#: case -> (fixture, how to compress, the registered layer names it must record)
CASES: dict[str, tuple[str, Callable, set[str]]] = {
    "low_rank": ("tiny_llama", _low_rank, {"LowRankLinear", "LowRankEmbedding", "LowRankHead"}),
    "autoencoder": ("tiny_llama", _autoencoder, {"AutoencoderEmbedding", "AffineFactorHead"}),
    "tt": ("tiny_llama", _tt, {"TTEmbedding", "MaterializedHead"}),
    "tt_matrix": ("tiny_llama", _tt_matrix, {"TTMatrixEmbedding", "MaterializedHead"}),
    "fourier": ("tiny_llama", _fourier, {"FourierEmbedding", "MaterializedHead"}),
    "hybrid": ("tiny_llama", _hybrid, {"HybridEmbedding", "HybridHead", "LowRankEmbedding", "LowRankHead"}),
    "pruned": ("tiny_bert", _pruned, {"BiasOnlyAttention", "BiasOnlyOutput", "PassThrough", "torch.nn.Linear", "torch.nn.LayerNorm"}),
    "pruned_llama": ("tiny_llama", _pruned_llama, {"BiasOnlyMLP", "torch.nn.Linear"}),
    "resized_table": ("tiny_bert", _resized_table, {"torch.nn.Embedding"}),
    "token_dropping": (
        "tiny_bert", _token_dropping, {"TokenDroppingEncoder", "TokenKeepPredictor", "torch.nn.ModuleList", "torch.nn.Identity"},
    ),
    "token_dropping_linear": (
        "tiny_bert", _token_dropping_linear, {"TokenDroppingEncoder", "TokenKeepPredictor", "torch.nn.ModuleList", "torch.nn.Identity"},
    ),
}


def _outputs(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _assert_same_model(original: nn.Module, loaded: nn.Module) -> None:
    assert type(loaded) is type(original)
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in original.named_modules()]
    before, after = original.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert float((_outputs(original) - _outputs(loaded)).abs().max()) == 0.0


def test_every_layer_class_has_a_round_trip_case():
    covered = set().union(*(names for _, _, names in CASES.values()))
    builtin = {cls.__name__ for cls in LAYER_CLASSES} | set(TORCH_LAYERS)
    assert covered == builtin
    assert set(get_layer_registry().names()) >= builtin


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact(case, request, tmp_path):
    fixture, compress, names = CASES[case]
    model = request.getfixturevalue(fixture)
    compress(model)
    model.eval()
    save_pretrained(model, tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / CONFIG_NAME).read_text())
    assert record["model_type"] == MODEL_TYPE
    recorded = {entry["layer"] for entry in record["optimum_lowrank"]["modules"].values()}
    assert names <= recorded, recorded
    loaded = from_pretrained(tmp_path / "saved")
    _assert_same_model(model, loaded)
    assert not loaded.training


def test_heads_share_the_rebuilt_embedding(tiny_llama, tmp_path):
    _hybrid(tiny_llama)
    save_pretrained(tiny_llama, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.lm_head.embedding is loaded.model.embed_tokens
    assert loaded.lm_head.rest_head.embedding is loaded.model.embed_tokens.rest
    weights = {p.data_ptr() for p in loaded.parameters()}
    assert len(weights) == len(list(loaded.parameters()))  # parameters() lists shared ones once: no silent copies


def test_tied_embedding_stays_tied(tiny_llama, tmp_path):
    """SVD on the linear layers only: the stock tie between embedding and head is kept through the save."""
    layer = tiny_llama.model.layers[1].self_attn
    layer.q_proj = LowRankLinear.from_linear(layer.q_proj, 4)
    save_pretrained(tiny_llama, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())["optimum_lowrank"]
    assert saved["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _assert_same_model(tiny_llama, loaded)


def test_pruned_attention_keeps_its_head_count(tiny_bert, tmp_path):
    _pruned(tiny_bert)
    save_pretrained(tiny_bert, tmp_path / "m")
    attributes = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())["optimum_lowrank"]["attributes"]
    assert attributes["encoder.layer.1.attention.self"]["num_attention_heads"] == 2
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.encoder.layer[1].attention.self.num_attention_heads == 2
    assert loaded.encoder.layer[1].attention.pruned_heads == {0, 2}


def test_unknown_layer_on_load_names_it_and_the_registered_ones(tiny_llama, tmp_path):
    _low_rank(tiny_llama)
    save_pretrained(tiny_llama, tmp_path / "m")
    path = tmp_path / "m" / CONFIG_NAME
    record = json.loads(path.read_text())
    record["optimum_lowrank"]["modules"]["lm_head"]["layer"] = "MysteryHead"
    path.write_text(json.dumps(record))
    with pytest.raises(UnknownLayerError, match=r"'MysteryHead' is not registered.*registered: .*LowRankHead"):
        from_pretrained(tmp_path / "m")


def test_unregistered_module_cannot_be_saved_and_nothing_is_written(tiny_llama, tmp_path):
    class Mystery(nn.Module):
        def forward(self, x):
            return x

    tiny_llama.model.layers[0].mlp.act_fn = Mystery()
    with pytest.raises(UnknownLayerError, match=r"model\.layers\.0\.mlp\.act_fn: its class .*Mystery is not a registered layer"):
        save_pretrained(tiny_llama, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []


def test_transformers_refuses_the_folder_loudly(tiny_bert, tmp_path):
    from transformers import AutoModel, BertModel

    _pruned(tiny_bert)
    save_pretrained(tiny_bert, tmp_path / "m")
    with pytest.raises(ValueError, match=MODEL_TYPE):
        AutoModel.from_pretrained(tmp_path / "m")
    with pytest.raises(OSError, match="no file named .*model.safetensors"):
        BertModel.from_pretrained(tmp_path / "m")  # explicit class: no weights file it knows, never random weights
    assert (tmp_path / "m" / WEIGHTS_NAME).is_file()


def test_missing_or_foreign_folders_are_load_errors(tiny_llama, tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        from_pretrained(tmp_path)
    tiny_llama.save_pretrained(tmp_path / "stock")
    with pytest.raises(ModelLoadError, match="not a compressed model written by optimum-lowrank"):
        from_pretrained(tmp_path / "stock")


def test_a_plugin_registers_its_layer_through_the_hook(tiny_llama, tmp_path):
    class ScaledLinear(nn.Module):
        def __init__(self, in_features: int, out_features: int, scale: float):
            super().__init__()
            self.inner, self.scale = nn.Linear(in_features, out_features, bias=False), scale

        def layer_config(self) -> dict:
            return {"in_features": self.inner.in_features, "out_features": self.inner.out_features, "scale": self.scale}

        def forward(self, x):
            return self.inner(x) * self.scale

    class Plugin:
        @hookimpl
        def lowrank_register_layers(self, register):
            register(ScaledLinear)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="scaled")
    registry = LayerRegistry().collect(pm)
    assert registry.entry("ScaledLinear").plugin == "scaled"
    tiny_llama.model.layers[0].mlp.down_proj = ScaledLinear(64, 32, 0.5)
    with pytest.raises(UnknownLayerError, match="ScaledLinear"):
        save_pretrained(tiny_llama, tmp_path / "x")  # the default registry does not know it
    save_pretrained(tiny_llama, tmp_path / "m", registry=registry)
    with pytest.raises(UnknownLayerError, match="'ScaledLinear' is not registered"):
        from_pretrained(tmp_path / "m")
    _assert_same_model(tiny_llama, from_pretrained(tmp_path / "m", registry=registry))
    with pytest.raises(DuplicateLayerError, match="LowRankLinear"):
        registry(LowRankLinear)


def test_save_refuses_an_existing_folder_without_overwrite(tiny_llama, tmp_path):
    from optimum_lowrank.errors import OutputExistsError

    save_pretrained(tiny_llama, tmp_path / "m")
    with pytest.raises(OutputExistsError):
        save_pretrained(tiny_llama, tmp_path / "m")
    save_pretrained(tiny_llama, tmp_path / "m", overwrite=True)
    _assert_same_model(tiny_llama, from_pretrained(tmp_path / "m"))

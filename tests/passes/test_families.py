"""Passes on tiny random models of several families (issue 15, finding 10): the output stays that of
the dense model where the pass is exact, and a module whose class changes the behaviour the pass
assumes (Gemma's scaled word embedding) is refused with an error naming its class."""

from __future__ import annotations

import pytest
import torch

from optimum_lowrank.api import PassContext
from optimum_lowrank.errors import TargetError
from optimum_lowrank.pipeline import apply_passes
from optimum_lowrank.recipe import load_recipe


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, max_position_embeddings=32))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=32))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=8, max_position_embeddings=32, sliding_window=16))


# family -> (builder, linear targets, embedding name or None when the embedding must be refused)
FAMILIES = {
    "bert": (_bert, "re:encoder\\.layer\\.\\d+\\..*(query|key|value|dense)", "embeddings.word_embeddings"),
    "gpt2": (_gpt2, "re:transformer\\.h\\.\\d+\\..*(c_attn|c_proj|c_fc)", "transformer.wte"),
    "llama": (_llama, "re:model\\.layers\\.\\d+\\..*_proj", "model.embed_tokens"),
    "qwen2": (_qwen2, "re:model\\.layers\\.\\d+\\..*_proj", "model.embed_tokens"),
    "gemma3": (_gemma3, "re:model\\.layers\\.\\d+\\..*_proj", None),
}


def _output(model, ids):
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_svd_keeps_the_dense_output(family, one_thread):
    build, linears, embedding = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = [linears] + ([embedding] if embedding else [])
    recipe = load_recipe({"version": 1, "passes": [{"pass": "svd", "targets": targets, "energy": 1.0, "min_layer_saving": 0.0}]})
    compressed, reports = apply_passes(model, recipe, PassContext(kind="encoder" if family == "bert" else "decoder"))
    assert reports[0].layers, "the pass replaced something"
    torch.testing.assert_close(_output(compressed, ids), _output(model, ids), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pass_options", [
    {"pass": "svd", "rank": 4},
    {"pass": "tt_embedding", "mode": "tt_matrix", "max_rank": 4, "epochs": 1},
    {"pass": "autoencoder_embedding", "compression_ratio": 2, "epochs": 1},
    {"pass": "fourier_embedding", "compression_ratio": 2, "epochs": 1},
])
def test_a_scaled_embedding_subclass_is_refused_by_every_embedding_pass(pass_options):
    model = _gemma3().eval()
    recipe = load_recipe({"version": 1, "passes": [{**pass_options, "targets": ["model.embed_tokens"]}]})
    with pytest.raises(TargetError, match="Gemma3TextScaledWordEmbedding.*own forward"):
        apply_passes(model, recipe, PassContext(kind="decoder"))
    with pytest.raises(TargetError, match="Gemma3TextScaledWordEmbedding"):  # a broad glob does not slip it through
        apply_passes(model, load_recipe({"version": 1, "passes": [{"pass": "svd", "targets": ["*"], "rank": 4}]}), PassContext(kind="decoder"))


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2", "gemma3"])
def test_calibrated_linear_passes_on_every_family(family, one_thread):
    """activation_svd at full energy keeps the dense output; softlm (a few steps) stays finite and smaller."""
    build, linears, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    context = PassContext(kind="encoder" if family == "bert" else "decoder", calibration_loader=lambda: torch.randint(0, 96, (4, 16)))
    exact = load_recipe({"version": 1, "passes": [{"pass": "activation_svd", "targets": [linears], "energy": 1.0, "min_layer_saving": 0.0}]})
    compressed, _ = apply_passes(model, exact, context)
    torch.testing.assert_close(_output(compressed, ids), _output(model, ids), rtol=1e-3, atol=1e-3)
    lossy = load_recipe({"version": 1, "passes": [{"pass": "softlm", "targets": [linears], "target_params_ratio": 0.8, "steps": 2}]})
    compressed, reports = apply_passes(model, lossy, context)
    assert reports[0].model_params_after < reports[0].model_params_before
    assert torch.isfinite(_output(compressed, ids)).all()

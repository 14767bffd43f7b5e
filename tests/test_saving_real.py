"""Save and load compressed real models: MiniLM through optimize(save_pytorch=True), the tiny Llama through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from optimum_lowrank import from_pretrained, optimize, save_pretrained
from optimum_lowrank.cli import main
from optimum_lowrank.models import load_model
from optimum_lowrank.pipeline import _context, apply_passes
from optimum_lowrank.recipe import load_recipe
from optimum_lowrank.saving import CONFIG_NAME, MODEL_TYPE

MINILM_RECIPE = {
    "version": 1,
    "passes": [
        {"pass": "svd", "targets": ["re:.*intermediate\\.dense", "re:.*layer\\.\\d+\\.output\\.dense"], "rank_ratio": 0.5},
        {"pass": "svd", "targets": ["embeddings.word_embeddings"], "compression_ratio": 4, "keep_top_k": 200},
    ],
    "calibration": {"num_samples": 8, "seq_len": 64},
}


def _sentences(data_dir) -> list[str]:
    lines = (data_dir / "stsb" / "sts-dev.tsv").read_text(encoding="utf-8").splitlines()[:16]
    return [line.split("\t")[5] for line in lines]


def _embed(model, tokenizer, sentences) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.integration
def test_real_minilm_round_trip_is_exact(data_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    loaded = load_model("minilm")
    recipe = load_recipe(MINILM_RECIPE)
    compressed, reports = apply_passes(loaded.model, recipe, _context(recipe, loaded))
    save_pretrained(compressed, tmp_path / "direct", tokenizer=loaded.tokenizer, passes=reports)
    sentences = _sentences(data_dir)
    reference = _embed(compressed, loaded.tokenizer, sentences)

    rebuilt = from_pretrained(tmp_path / "direct")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "direct")
    assert tokenizer(sentences)["input_ids"] == loaded.tokenizer(sentences)["input_ids"]
    assert float((_embed(rebuilt, tokenizer, sentences) - reference).abs().max()) == 0.0
    assert type(rebuilt.embeddings.word_embeddings).__name__ == "HybridEmbedding"

    modules = json.loads((tmp_path / "direct" / CONFIG_NAME).read_text())["optimum_lowrank"]["modules"]
    dense = modules["encoder.layer.0.intermediate.dense"]
    assert dense["layer"] == "LowRankLinear" and dense["pass"] == "svd" and dense["options"]["rank_ratio"] == 0.5
    assert dense["config"] == {"in_features": 384, "out_features": 1536, "rank": 192, "bias": True}  # rank_ratio 0.5 of min(384, 1536)
    assert modules["embeddings.word_embeddings"]["options"]["keep_top_k"] == 200
    with pytest.raises(ValueError, match=MODEL_TYPE):
        AutoModel.from_pretrained(tmp_path / "direct")

    # the same recipe through optimize(save_pytorch=True): the passes are deterministic, the saved model identical
    report = optimize("minilm", MINILM_RECIPE, tmp_path / "out", save_pytorch=True, progress=False)
    assert any("pytorch" in note for note in report.notes)
    assert (tmp_path / "out" / "report.json").is_file()
    from_optimize = from_pretrained(tmp_path / "out")  # the output folder: its pytorch/ is found
    assert float((_embed(from_optimize, tokenizer, sentences) - reference).abs().max()) == 0.0


def test_cli_save_pytorch_on_a_tiny_llama(tiny_llama, tmp_path):
    folder = tmp_path / "llama"
    tiny_llama.save_pretrained(folder)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"w{i % 127}" for i in range(4000)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\npasses:\n  - {pass: svd, targets: ['re:model\\.layers\\.\\d+\\.mlp\\..*_proj'], rank_ratio: 0.25}\n"
        "  - {pass: svd, targets: [model.embed_tokens], rank: 8}\n"
        f"calibration: {{data: {text}, num_samples: 4, seq_len: 32}}\n"
    )
    assert main(["optimize", "--model", str(folder), "--recipe", str(recipe), "--output", str(tmp_path / "out"),
                 "--save-pytorch", "--quiet"]) == 0
    rebuilt = from_pretrained(tmp_path / "out" / "pytorch")
    assert rebuilt.lm_head.embedding is rebuilt.model.embed_tokens  # the compressed tie survives
    modules = json.loads((tmp_path / "out" / "pytorch" / CONFIG_NAME).read_text())["optimum_lowrank"]["modules"]
    assert modules["lm_head"]["pass"] == "svd" and modules["model.embed_tokens"]["options"]["rank"] == 8

    loaded = load_model(str(folder))
    recipe_obj = load_recipe(recipe)
    compressed, _ = apply_passes(loaded.model, recipe_obj, _context(recipe_obj, loaded))
    ids = torch.randint(0, 127, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((rebuilt(ids).logits - compressed(ids).logits).abs().max()) == 0.0
    assert main(["optimize", "--model", str(folder), "--max-drop", "1", "--output", str(tmp_path / "s"), "--save-pytorch"]) == 2

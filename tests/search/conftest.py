"""Tiny tokenizers and data files for the search tests: STS-style pairs and plain text, split in two."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from optimum_lowrank.data import default_text


def word_tokenizer(vocab_size: int):
    """WordLevel tokenizer trained offline on Python's docs, exactly ``vocab_size`` ids; adds [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, pre_tokenizers, processors, trainers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]
    tok = Tokenizer(WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([default_text()[0][:50_000]], trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    assert len(out) == vocab_size
    return out


def _sentences() -> list[str]:
    text = default_text()[0][50_000:200_000]
    parts = [re.sub(r"\s+", " ", s).strip() for s in re.split(r"[.\n]", text)]
    return [s for s in parts if 4 <= len(s.split()) <= 20]


def write_pairs(path: Path, sentences: list[str]) -> Path:
    """STS-B's original layout: genre, file, year, id, score, sentence1, sentence2 (score from word overlap)."""
    rows = []
    for i in range(0, len(sentences) - 1, 2):
        a, b = sentences[i], sentences[i + 1]
        wa, wb = set(a.lower().split()), set(b.lower().split())
        score = 5.0 * len(wa & wb) / max(1, len(wa | wb))
        rows.append(f"main\tdocs\t2024\t{i:04d}\t{score:.3f}\t{a}\t{b}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def sts_files(tmp_path_factory) -> tuple[Path, Path]:
    """``(train.tsv, dev.tsv)``: 60 and 40 pairs of different sentences."""
    folder = tmp_path_factory.mktemp("sts")
    sentences = _sentences()
    return write_pairs(folder / "train.tsv", sentences[:120]), write_pairs(folder / "dev.tsv", sentences[120:200])


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> tuple[Path, Path]:
    """``(valid.txt, test.txt)``: two different stretches of Python's docs."""
    folder = tmp_path_factory.mktemp("text")
    text = default_text()[0]
    (folder / "valid.txt").write_text(text[200_000:230_000])
    (folder / "test.txt").write_text(text[250_000:280_000])
    return folder / "valid.txt", folder / "test.txt"


@pytest.fixture(autouse=True)
def _search_cache(tmp_path, monkeypatch) -> None:
    """Sensitivities and reference scores are cached per test, never in the user's cache."""
    monkeypatch.setenv("OPTIMUM_LOWRANK_CACHE", str(tmp_path / "cache"))

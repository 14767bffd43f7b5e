"""Calibration text windows.

Tiny random models and random calibration ids (seconds, no real data).
"""

from __future__ import annotations

import pytest

from optimum_lowrank.api import PassContext
from optimum_lowrank.errors import DataError
from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
from tests.helpers import LLAMA_TARGETS, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_short_calibration_text_raises_data_error_from_token_windows(tiny_llama):
    from optimum_lowrank.data import token_windows

    class Tok:
        def __call__(self, text, **_):
            return {"input_ids": list(range(len(text.split())))}

    context = PassContext(kind="decoder", calibration_loader=lambda: token_windows(Tok(), "too short", 128, 4))
    with pytest.raises(DataError, match="fewer than one window"):
        ActivationSVDPass(ActivationSVDConfig(targets=LLAMA_TARGETS, rank=2)).run(tiny_llama, context)


def test_token_windows_strict_names_how_many_windows_the_text_gives():
    from optimum_lowrank.data import token_windows

    text = " ".join(f"w{i}" for i in range(56))  # 56 tokens: 7 windows of 8
    assert token_windows(WordTokenizer(), text, 8, 10).shape == (7, 8)  # lenient: fewer, silently
    assert token_windows(WordTokenizer(), text, 8, 7, strict=True).shape == (7, 8)
    with pytest.raises(DataError, match="asked for 10 windows of 8 tokens .* 56 tokens: only 7 windows"):
        token_windows(WordTokenizer(), text, 8, 10, strict=True)


def test_load_text_reads_a_file_once_and_again_when_it_changes(tmp_path, monkeypatch):
    import os

    import optimum_lowrank.data as data

    reads = []
    real = data._read_file

    def counting(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(data, "_read_file", counting)
    data.clear_text_cache()
    path = tmp_path / "cal.txt"
    path.write_text("first version of the text")
    first = data.load_text(path)
    assert data.load_text(str(path)) == first and data.load_text(tmp_path / "." / "cal.txt") == first
    assert len(reads) == 1, "the same file (any spelling of its path) is read once"
    path.write_text("second, longer version of the text")
    assert data.load_text(path)[0] == "second, longer version of the text" and len(reads) == 2
    path.write_text("third, longer version of the text")  # same size: the modification time tells
    stamp = path.stat()
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    assert data.load_text(path)[0] == "third, longer version of the text" and len(reads) == 3
    table = tmp_path / "pairs.tsv"
    table.write_text("a\tb\nc\td\n")
    assert data.load_text(f"tsv:{table}:1")[0] == "b\nd"
    assert data.load_text(f"tsv:{table}:1")[0] == "b\nd" and len(reads) == 4
    table.write_text("a\tb\nc\tdd\n")
    assert data.load_text(f"tsv:{table}:1")[0] == "b\ndd" and len(reads) == 5
    data.clear_text_cache()
    data.load_text(path)
    assert len(reads) == 6


def test_pipeline_reads_the_calibration_text_once(tiny_llama, tmp_path, monkeypatch):
    import optimum_lowrank.data as data
    from optimum_lowrank import optimize

    class VocabTokenizer(WordTokenizer):
        def get_vocab(self):
            return {f"w{i}": i for i in range(128)}

        def __len__(self):
            return 128

    reads = []
    real = data._read_file
    monkeypatch.setattr(data, "_read_file", lambda path: reads.append(path) or real(path))
    monkeypatch.setenv("OPTIMUM_LOWRANK_CACHE", str(tmp_path / "cache"))
    data.clear_text_cache()
    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"w{i}" for i in range(64)))
    recipe = {
        "version": 1,
        "passes": [{"pass": "svd", "targets": ["model.embed_tokens"], "compression_ratio": 2, "keep_top_k": 4}],
        "calibration": {"data": str(text), "num_samples": 4, "seq_len": 8},
        "finetune": {"steps": 1, "lr": 1e-3, "num_samples": 2},
    }
    report = optimize(tiny_llama, recipe, tokenizer=VocabTokenizer(), progress=False)
    assert report.passes[0].layers[0].metrics["exact_rows"] == 4 and report.finetune["steps"] == 1
    assert len(reads) == 1, "calibration windows, token counts and fine-tune windows share one read"

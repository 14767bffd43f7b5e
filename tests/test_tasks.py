"""Labelled task files (SST-2 layout) and the label checks against a classification head."""

from __future__ import annotations

import pytest

from optimum_lowrank.data import shared_data_dir
from optimum_lowrank.errors import DataError
from optimum_lowrank.tasks import check_num_labels, encode_batches, load_labelled_tsv
from tests.helpers import sentiment_tsv, tiny_classifier, word_tokenizer


def test_reads_the_real_sst2_dev_file():
    data = load_labelled_tsv(shared_data_dir() / "sst2" / "dev.tsv")
    assert len(data) == 872 and data.columns == ("text_a",) and set(data.labels) == {0, 1}
    assert data.texts[0].startswith("it 's a charming")


def test_pair_columns_and_max_rows(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("sentence1\tsentence2\tlabel\na b\tc d\t1\ne f\tg h\t0\ni\tj\t2\n")
    data = load_labelled_tsv(path, max_rows=2)
    assert data.texts == [("a b", "c d"), ("e f", "g h")] and data.labels == [1, 0] and data.num_labels == 2


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("label\ttext_a\n1\tfine\n\tmissing label\n", "line 3: label '' is not an integer"),
        ("label\ttext_a\n1\tfine\npositive\tword label\n", "line 3: label 'positive' is not an integer"),
        ("label\ttext_a\n-1\tnegative label\n", "line 2: label -1 is negative"),
        ("text_a\nno labels at all\n", "no label column 'label'"),
        ("label\tbody\n1\tx\n", "no text column found"),
        ("label\ttext_a\n", "has a header but no examples"),
    ],
)
def test_bad_task_files_are_data_errors(tmp_path, content, match):
    path = tmp_path / "task.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_labelled_tsv(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_labelled_tsv(tmp_path / "nope.tsv")


def test_label_count_must_fit_the_head(tmp_path):
    path = tmp_path / "three.tsv"
    path.write_text("label\ttext_a\n0\ta\n2\tb\n")
    with pytest.raises(DataError, match="3 classes\\) but the model's head has 2 labels"):
        check_num_labels(tiny_classifier(), load_labelled_tsv(path))
    with pytest.raises(DataError, match="no sequence-classification head"):
        check_num_labels(object(), load_labelled_tsv(path))


def test_encode_batches_pads_and_keeps_indices(tmp_path):
    data = load_labelled_tsv(sentiment_tsv(tmp_path / "s.tsv", rows=5))
    batches = encode_batches(word_tokenizer(tmp_path), data, 2, sort_by_length=True)
    assert sorted(i for _, _, idx in batches for i in idx) == list(range(5))
    inputs, labels, idx = batches[0]
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape and labels.tolist() == [data.labels[i] for i in idx]

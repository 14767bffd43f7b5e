"""Sequence-classification accuracy, on a PyTorch model and on a ``text-classification`` ONNX graph."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from optimum_lowrank.errors import DataError
from optimum_lowrank.evaluation.base import Evaluator, onnx_feed, open_session, torch_forward
from optimum_lowrank.progress import bar
from optimum_lowrank.recipe import MaxDropConfig
from optimum_lowrank.tasks import LabelledData, check_num_labels, encode_batches, load_labelled_tsv

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from optimum_lowrank.models import LoadedModel

__all__ = ["AccuracyMetricConfig", "ClassificationAccuracyEvaluator"]


class AccuracyMetricConfig(MaxDropConfig):
    """``accuracy: {metric: accuracy, data: sst2/dev.tsv, max_drop: 1.0}``: the gate for classifiers.

    Attributes
    ----------
    max_drop : float, 0 <= max_drop <= 100
        The threshold, in accuracy points (percent): the compressed value passes when
        ``value >= original - max_drop``.
    data : str
        Required: a labelled TSV with a header (see :func:`optimum_lowrank.tasks.load_labelled_tsv`),
        e.g. GLUE SST-2 ``dev.tsv``.
    max_examples : int >= 1, or None
        Use only the first ``max_examples`` rows; None: all.
    max_length : int, 8 <= max_length <= 512
        Tokens per example (longer ones are truncated).
    """

    data_needed: ClassVar[str] = "a labelled TSV (e.g. sst2/dev.tsv)"

    max_examples: int | None = Field(None, ge=1)
    max_length: int = Field(128, ge=8, le=512)


class ClassificationAccuracyEvaluator(Evaluator):
    """Accuracy x100 of the argmax of a classification head's ``logits`` against gold labels.

    Examples are tokenized once (grouped by length, padded per batch), so the
    original, the compressed model and its ONNX graphs see the same inputs.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    data : LabelledData
        At least one example.
    max_length : int
    batch_size : int
    threads : int
        ONNX Runtime intra-op threads.

    Raises
    ------
    DataError
        If ``data`` is empty; at evaluation, if a label does not fit the model's head.

    Notes
    -----
    Reference: GLUE SST-2 (Socher et al. 2013; Wang et al., arXiv:1804.07461).
    """

    name = "accuracy"
    config_class = AccuracyMetricConfig
    model_kinds = ("encoder",)
    higher_is_better = True

    def __init__(self, tokenizer: PreTrainedTokenizerBase, data: LabelledData, *, max_length: int = 128,
                 batch_size: int = 32, threads: int = 2) -> None:
        if len(data) == 0:
            raise DataError("accuracy needs at least one labelled example")
        self.data = data
        self.threads = threads
        self._batches = encode_batches(tokenizer, data, batch_size, max_length, sort_by_length=True)
        self.description = f"accuracy x100 on {len(data)} examples of {data.source} ({', '.join(data.columns)}), max_length {max_length}"

    @classmethod
    def from_config(cls, config: AccuracyMetricConfig, loaded: LoadedModel,
                    reference_model: PreTrainedModel | None = None) -> ClassificationAccuracyEvaluator:
        """The examples of ``config.data`` (required); the labels are checked against the model's head.

        Raises
        ------
        DataError
            If ``config.data`` is None, missing or malformed, or its labels do not fit the head.
        """
        if config.data is None:
            raise DataError(f"metric {cls.name!r} needs data: a labelled TSV (e.g. sst2/dev.tsv)")
        data = load_labelled_tsv(config.data, max_rows=config.max_examples)
        check_num_labels(loaded.model, data)
        return cls(loaded.tokenizer, data, max_length=config.max_length)

    def _score(self, predictions: dict[int, int]) -> float:
        correct = sum(int(predictions[i] == label) for i, label in enumerate(self.data.labels))
        return 100.0 * correct / len(self.data)

    def predict_torch(self, model: PreTrainedModel) -> dict[int, int]:
        """Predicted label per example index."""
        import torch

        check_num_labels(model, self.data)
        model.eval()
        out: dict[int, int] = {}
        with torch.inference_mode():
            for inputs, _, idx in bar(self._batches, desc="accuracy (torch)", unit="batch"):
                logits = torch_forward(model, inputs).logits
                out.update(zip(idx, logits.argmax(-1).tolist()))
        return out

    def predict_onnx(self, onnx_path: str | os.PathLike) -> dict[int, int]:
        session = open_session(onnx_path, self.threads)
        names = [o.name for o in session.get_outputs()]
        output = "logits" if "logits" in names else names[0]
        out: dict[int, int] = {}
        for inputs, _, idx in bar(self._batches, desc="accuracy (onnx)", unit="batch"):
            arrays = {k: v.numpy() for k, v in inputs.items()}
            logits = session.run([output], onnx_feed(session, arrays))[0]
            if logits.ndim != 2:
                raise DataError(f"{Path(onnx_path)} returns {output!r} of shape {logits.shape}; accuracy needs (batch, num_labels) logits")
            out.update(zip(idx, logits.argmax(-1).tolist()))
        return out

    def evaluate_torch(self, model: PreTrainedModel) -> float:
        """Accuracy x100 in [0, 100] for a ``...ForSequenceClassification`` model."""
        return self._score(self.predict_torch(model))

    def evaluate_onnx(self, onnx_path: str | os.PathLike) -> float:
        """Accuracy x100 in [0, 100] for a ``text-classification`` ONNX graph."""
        return self._score(self.predict_onnx(onnx_path))

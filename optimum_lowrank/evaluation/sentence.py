"""Sentence-embedding metrics for encoders: STS-B Spearman and data-free cosine agreement."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field

from optimum_lowrank.data import load_sts_pairs, load_text, token_windows
from optimum_lowrank.errors import DataError, RecipeError
from optimum_lowrank.evaluation.base import (
    Evaluator,
    hidden_state,
    mean_pool,
    onnx_hidden,
    open_session,
    spearman,
    torch_forward,
)
from optimum_lowrank.progress import bar
from optimum_lowrank.recipe import AccuracyConfig, MaxDropConfig

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from optimum_lowrank.models import LoadedModel

# --------------------------------------------------------------------------- STS-B


class _EncodedBatches:
    """Tokenized batches of sentences (sorted by length) and the way back to input order."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sentences: list[str], max_length: int, batch_size: int):
        import numpy as np

        lengths = [len(s) for s in sentences]
        self.order = np.argsort(lengths, kind="stable")
        self.batches: list[dict[str, np.ndarray]] = []
        for start in range(0, len(sentences), batch_size):
            chunk = [sentences[i] for i in self.order[start : start + batch_size]]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            self.batches.append({k: np.asarray(v, dtype=np.int64) for k, v in enc.items()})
        self.size = len(sentences)


def _embed_torch(model: PreTrainedModel, encoded: _EncodedBatches, desc: str) -> torch.Tensor:
    """Mean-pooled embeddings in input order, shape (n, hidden)."""
    import torch

    device = next(model.parameters()).device
    pieces = []
    with torch.inference_mode():
        for batch in bar(encoded.batches, desc=desc, unit="batch"):
            inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
            hidden = hidden_state(torch_forward(model, inputs)).float().cpu()
            pieces.append(mean_pool(hidden, inputs["attention_mask"].cpu()))
    return _unsort(torch.cat(pieces), encoded)


def _embed_onnx(session: onnxruntime.InferenceSession, encoded: _EncodedBatches, desc: str) -> torch.Tensor:
    import torch

    pieces = []
    for batch in bar(encoded.batches, desc=desc, unit="batch"):
        hidden = torch.from_numpy(onnx_hidden(session, batch)).float()
        pieces.append(mean_pool(hidden, torch.from_numpy(batch["attention_mask"])))
    return _unsort(torch.cat(pieces), encoded)


def _unsort(embeddings: torch.Tensor, encoded: _EncodedBatches) -> torch.Tensor:
    import torch

    out = torch.empty_like(embeddings)
    out[torch.from_numpy(encoded.order)] = embeddings
    return out


class STSBConfig(MaxDropConfig):
    """``accuracy: {metric: stsb_spearman, data: sts-dev.tsv, max_drop: 2.0}``: the gate for encoders.

    Attributes
    ----------
    max_drop : float, 0 <= max_drop <= 100
        The threshold: allowed drop of Spearman x 100; the compressed value passes
        when ``value >= original - max_drop``.
    data : str
        Required: an STS-B TSV of sentence pairs (see :func:`optimum_lowrank.data.load_sts_pairs`).
    max_pairs : int >= 1, or None
        Use only the first ``max_pairs`` pairs; None: all.
    """

    data_needed: ClassVar[str] = "a STS-B TSV of sentence pairs"

    max_pairs: int | None = Field(None, ge=1)


class STSBEvaluator(Evaluator):
    """Semantic textual similarity: Spearman x100 of embedding cosine vs gold score.

    Each sentence is embedded as the attention-masked mean of the model's
    ``last_hidden_state``; the cosine of the two embeddings of a pair is ranked
    against the gold scores (sentence-transformers' STS-B protocol).

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    pairs : sequence of (sentence1, sentence2, score)
        E.g. from :func:`optimum_lowrank.data.load_sts_pairs`; at least 2 pairs.
    max_length : int
        Tokens per sentence (longer ones are truncated).
    batch_size : int
        Sentences per forward pass.
    max_pairs : int, optional
        Use only the first ``max_pairs`` pairs.
    pairs_description : str, optional
        Name of the data for :attr:`description`.
    threads : int
        ONNX Runtime intra-op threads.

    Raises
    ------
    DataError
        If fewer than 2 pairs are given.

    Notes
    -----
    Reference: all-MiniLM-L6-v2 on STS-B dev (1,500 pairs): 86.72 (PyTorch fp32).

    References
    ----------
    .. [1] Cer et al., "SemEval-2017 Task 1: Semantic Textual Similarity
       Multilingual and Crosslingual Focused Evaluation", arXiv:1708.00055.
    """

    name = "stsb_spearman"
    config_class = STSBConfig
    model_kinds = ("encoder",)
    higher_is_better = True

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str, float]],
        *,
        max_length: int = 128,
        batch_size: int = 64,
        max_pairs: int | None = None,
        pairs_description: str | None = None,
        threads: int = 2,
    ) -> None:
        pairs = list(pairs)[: max_pairs if max_pairs is not None else None]
        if len(pairs) < 2:
            raise DataError(f"STS-B evaluation needs at least 2 sentence pairs, got {len(pairs)}")
        self.gold = [float(p[2]) for p in pairs]
        sentences = [p[0] for p in pairs] + [p[1] for p in pairs]
        self._encoded = _EncodedBatches(tokenizer, sentences, max_length, batch_size)
        self.threads = threads
        where = f" of {pairs_description}" if pairs_description else ""
        self.description = (
            f"STS-B Spearman x100 of cosine of mean-pooled embeddings vs gold score, {len(pairs)} pairs{where}, max_length {max_length}"
        )

    @classmethod
    def from_config(cls, config: STSBConfig, loaded: LoadedModel, reference_model: PreTrainedModel | None = None) -> STSBEvaluator:
        """The pairs of ``config.data`` (required), tokenized with ``loaded``'s tokenizer.

        Raises
        ------
        DataError
            If ``config.data`` is None, missing or malformed, or holds fewer than 2 pairs.
        """
        if config.data is None:
            raise DataError(f"metric {cls.name!r} needs data: the path of an STS-B TSV file (e.g. sts-dev.tsv)")
        pairs = load_sts_pairs(config.data)
        return cls(loaded.tokenizer, pairs, max_pairs=config.max_pairs, pairs_description=Path(config.data).name)

    def _score(self, embeddings: torch.Tensor) -> float:
        import torch.nn.functional as F

        n = len(self.gold)
        cosine = F.cosine_similarity(embeddings[:n].double(), embeddings[n:].double(), dim=-1)
        return 100.0 * spearman(cosine.tolist(), self.gold)

    def evaluate_torch(self, model: PreTrainedModel) -> float:
        """Spearman x100 in [-100, 100] for a PyTorch encoder."""
        return self._score(_embed_torch(model, self._encoded, "stsb (torch)"))

    def evaluate_onnx(self, onnx_path: str | os.PathLike) -> float:
        """Spearman x100 in [-100, 100] for a feature-extraction ONNX graph."""
        session = open_session(onnx_path, self.threads)
        return self._score(_embed_onnx(session, self._encoded, "stsb (onnx)"))


# --------------------------------------------------------------------------- cosine agreement


class CosineAgreementConfig(AccuracyConfig):
    """``accuracy: {metric: cosine_agreement, min_cosine: 0.98}``: the data-free gate for encoders.

    Attributes
    ----------
    min_cosine : float, 0 < min_cosine <= 1
        The threshold: the compressed value (mean cosine to the original's pooled
        outputs) passes when ``value >= min_cosine``.
    data : str or None
        A text source for :func:`optimum_lowrank.data.load_text`; None: Python's own
        documentation.
    num_samples : int, >= 1
        At most this many windows.
    seq_len : int, 8 <= seq_len <= 8192
        Tokens per window, special tokens included; at most the model's
        ``max_position_embeddings`` (512 for BERT and MiniLM), else building the
        evaluator is a :class:`RecipeError`.
    """

    threshold_field: ClassVar[str] = "min_cosine"

    min_cosine: float | None = Field(None, gt=0, le=1)
    num_samples: int = Field(64, ge=1)
    seq_len: int = Field(128, ge=8, le=8192)

    def acceptable(self, original: float, value: float) -> bool:
        return value >= self.threshold[1]


class CosineAgreementEvaluator(Evaluator):
    """Data-free encoder check: cosine between the reference and evaluated embeddings.

    The text is cut into ``num_samples`` windows of ``seq_len`` tokens (including
    the tokenizer's special tokens, e.g. ``[CLS] ... [SEP]``). The reference model's
    mean-pooled ``last_hidden_state`` is computed once, at construction, so the
    reference model may be compressed in place afterwards. The score is the mean
    over windows of the cosine similarity between the reference embedding and the
    evaluated model's; the reference model itself scores 1.0.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    text : str
        Calibration text, at least ``seq_len`` tokens long.
    reference_model : PreTrainedModel
        The original (uncompressed) encoder.
    num_samples : int, >= 1
        Maximum number of windows.
    seq_len : int
        Tokens per window, special tokens included; larger than the number of
        special tokens.
    batch_size : int
        Windows per forward pass.
    text_description : str, optional
        Name of the text for :attr:`description`.
    threads : int
        ONNX Runtime intra-op threads.

    Raises
    ------
    DataError
        If the text is shorter than one window.
    """

    name = "cosine_agreement"
    config_class = CosineAgreementConfig
    model_kinds = ("encoder",)
    higher_is_better = True

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text: str,
        reference_model: PreTrainedModel,
        *,
        num_samples: int = 64,
        seq_len: int = 128,
        batch_size: int = 16,
        text_description: str | None = None,
        threads: int = 2,
    ) -> None:
        import numpy as np

        special = tokenizer.num_special_tokens_to_add(pair=False)
        if seq_len <= special:
            raise ValueError(f"seq_len must exceed the {special} special tokens, got {seq_len}")
        windows = token_windows(tokenizer, text, seq_len - special, num_samples)
        ids = np.asarray([tokenizer.build_inputs_with_special_tokens(row) for row in windows.tolist()], dtype=np.int64)
        self._batches: list[dict[str, np.ndarray]] = []
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            self._batches.append(
                {
                    "input_ids": chunk,
                    "attention_mask": np.ones_like(chunk),
                    "token_type_ids": np.zeros_like(chunk),
                }
            )
        self.threads = threads
        self._reference = self._embed_torch(reference_model)
        where = text_description or f"{len(text):,} characters of text"
        self.description = (
            f"mean cosine similarity of mean-pooled embeddings to the original model's, {len(ids)} windows of {seq_len} tokens of {where}"
        )

    @classmethod
    def from_config(
        cls, config: CosineAgreementConfig, loaded: LoadedModel, reference_model: PreTrainedModel | None
    ) -> CosineAgreementEvaluator:
        """Windows of ``config.data`` and the reference embeddings of ``reference_model``.

        Raises
        ------
        RecipeError
            If ``reference_model`` is None, or ``config.seq_len`` exceeds its
            ``max_position_embeddings``.
        DataError
            If the text cannot be read or is shorter than one window.
        """
        if reference_model is None:
            raise RecipeError(f"metric {cls.name!r} needs reference_model (the original model)")
        positions = getattr(getattr(reference_model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and config.seq_len > positions:
            raise RecipeError(
                f"metric {cls.name!r}: seq_len {config.seq_len} exceeds the model's {positions} positions "
                f"(max_position_embeddings); set accuracy.seq_len to at most {positions}"
            )
        text, text_description = load_text(config.data)
        return cls(
            loaded.tokenizer,
            text,
            reference_model,
            num_samples=config.num_samples,
            seq_len=config.seq_len,
            text_description=text_description,
        )

    def _embed_torch(self, model: PreTrainedModel) -> torch.Tensor:
        import torch

        device = next(model.parameters()).device
        pieces = []
        with torch.inference_mode():
            for batch in bar(self._batches, desc="cosine_agreement (torch)", unit="batch"):
                inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
                hidden = hidden_state(torch_forward(model, inputs)).float().cpu()
                pieces.append(mean_pool(hidden, inputs["attention_mask"].cpu()))
        return torch.cat(pieces)

    def _score(self, embeddings: torch.Tensor) -> float:
        import torch.nn.functional as F

        cosine = F.cosine_similarity(embeddings.double(), self._reference.double(), dim=-1)
        return float(cosine.mean())

    def evaluate_torch(self, model: PreTrainedModel) -> float:
        """Mean cosine similarity in [-1, 1] to the reference embeddings."""
        return self._score(self._embed_torch(model))

    def evaluate_onnx(self, onnx_path: str | os.PathLike) -> float:
        """Mean cosine similarity in [-1, 1] for a feature-extraction ONNX graph."""
        import torch

        session = open_session(onnx_path, self.threads)
        pieces = []
        for batch in bar(self._batches, desc="cosine_agreement (onnx)", unit="batch"):
            hidden = torch.from_numpy(onnx_hidden(session, batch)).float()
            pieces.append(mean_pool(hidden, torch.from_numpy(batch["attention_mask"])))
        return self._score(torch.cat(pieces))

"""Accuracy evaluators for the accuracy gate: the same metric on PyTorch and ONNX models.

Every evaluator measures one number on a fixed, deterministic sample of data, so the
original model, the compressed PyTorch model, its fp32 ONNX graph and its int8 ONNX
graph are compared on exactly the same inputs:

- ``perplexity`` (:class:`PerplexityEvaluator`): causal decoders, lower is better;
- ``stsb_spearman`` (:class:`STSBEvaluator`): encoders, higher is better (x100);
- ``cosine_agreement`` (:class:`CosineAgreementEvaluator`): encoders, data-free,
  higher is better (1.0 for the original model).

ONNX graphs are run with ONNX Runtime's ``CPUExecutionProvider`` (so graphs holding
``com.microsoft`` operators such as ``MatMulNBits`` work), feeding only the inputs
the graph declares. :func:`build_evaluator` is what the pipeline calls.
"""

from __future__ import annotations

import abc
import inspect
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimum_lowrank.data import load_sts_pairs, load_text, token_windows
from optimum_lowrank.errors import DataError, ExportError, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnxruntime
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from optimum_lowrank.models import LoadedModel

__all__ = [
    "METRICS",
    "CosineAgreementEvaluator",
    "Evaluator",
    "PerplexityEvaluator",
    "STSBEvaluator",
    "build_evaluator",
]

#: Metric names accepted by :func:`build_evaluator`.
METRICS: tuple[str, ...] = ("perplexity", "stsb_spearman", "cosine_agreement")


class Evaluator(abc.ABC):
    """One accuracy metric, measurable on a PyTorch model and on an ONNX graph.

    Attributes
    ----------
    metric : str
        Metric name, one of :data:`METRICS` for the built-in evaluators.
    higher_is_better : bool
    description : str
        Human description of the data and protocol (shown in reports).
    """

    metric: str
    higher_is_better: bool
    description: str

    @abc.abstractmethod
    def evaluate_torch(self, model: PreTrainedModel) -> float:
        """Score a PyTorch model (run on the CPU under ``torch.inference_mode``)."""

    @abc.abstractmethod
    def evaluate_onnx(self, onnx_path: str | os.PathLike) -> float:
        """Score an ONNX graph (a ``.onnx`` file, or a folder holding ``model.onnx``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


# --------------------------------------------------------------------------- helpers


def _resolve_onnx(onnx_path: str | os.PathLike) -> Path:
    path = Path(onnx_path)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        graphs = sorted(path.glob("*.onnx"))
        if len(graphs) == 1:
            return graphs[0]
        raise ExportError(f"folder {str(path)!r} holds {len(graphs)} .onnx files and no model.onnx; pass the file")
    if not path.is_file():
        raise ExportError(f"ONNX graph {str(path)!r} does not exist")
    return path


def _session(path: str | os.PathLike, threads: int = 2) -> onnxruntime.InferenceSession:
    """ONNX Runtime CPU session on a ``.onnx`` file, or a folder holding ``model.onnx`` or a single graph."""
    from optimum_lowrank.exporters.onnx import make_session

    return make_session(_resolve_onnx(path), threads=threads)


def _onnx_feed(session: onnxruntime.InferenceSession, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for ``session`` from ``arrays`` (``input_ids`` and optionally ``attention_mask``, ...)."""
    from optimum_lowrank.exporters.onnx import feeds_for_input_ids

    return feeds_for_input_ids(session, **arrays)


def _torch_forward(model: PreTrainedModel, inputs: dict[str, torch.Tensor], **extra: Any) -> Any:
    """Call ``model`` with the inputs its ``forward`` accepts."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = {**inputs, **extra}
    else:
        accepted = {k: v for k, v in {**inputs, **extra}.items() if k in params}
    return model(**accepted)


def _hidden_state(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over the sequence: (B, L, H), (B, L) -> (B, H)."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _onnx_hidden(session: onnxruntime.InferenceSession, arrays: dict[str, np.ndarray]) -> np.ndarray:
    names = [o.name for o in session.get_outputs()]
    output = "last_hidden_state" if "last_hidden_state" in names else names[0]
    return session.run([output], _onnx_feed(session, arrays))[0]


def _progress(iterable: Sequence, desc: str) -> Iterator:
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, leave=False, disable=None))


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation in [-1, 1] (ties get average ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y)[0])


# --------------------------------------------------------------------------- perplexity


class PerplexityEvaluator(Evaluator):
    """Causal language-model perplexity on fixed token windows of a text.

    The text is tokenized once without special tokens, preceded by the tokenizer's
    BOS token when it has one (``add_bos``; the start of the document, as in
    lm-evaluation-harness), and cut into at most ``max_windows`` windows of
    ``seq_len`` tokens starting every ``stride`` tokens.
    Each window is scored independently (no cache, no context from earlier windows).
    In the first window every token but the first is predicted; when windows overlap
    (``stride < seq_len``) later windows score only their last ``stride`` tokens, so
    each text token is scored at most once. Perplexity is ``exp`` of the mean
    negative log-likelihood (nats) over all scored tokens.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
    text : str
        At least ``seq_len`` tokens long.
    seq_len : int, >= 2
        Tokens per window (context length).
    stride : int, 1 <= stride
        Tokens between window starts.
    max_windows : int, >= 1
    batch_size : int, >= 1
        Windows per forward pass (memory grows as batch_size * seq_len * vocab).
    add_bos : bool
        Prepend ``tokenizer.bos_token_id`` (if any) to the token stream.
    text_description : str, optional
        Name of the text for :attr:`description`.
    threads : int
        ONNX Runtime intra-op threads.

    Raises
    ------
    DataError
        If the text is shorter than one window.

    Notes
    -----
    ONNX graphs exported with ``text-generation`` or ``text-generation-with-past``
    are accepted; the latter is fed an empty past (sequence length 0), attention
    mask ones and position ids 0..seq_len-1.
    Reference: SmolLM2-135M, WikiText-2 raw test, 20 windows of 512, stride 512:
    35.065 (PyTorch and ONNX fp32).
    """

    metric = "perplexity"
    higher_is_better = False

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text: str,
        *,
        seq_len: int = 512,
        stride: int = 512,
        max_windows: int = 20,
        batch_size: int = 1,
        add_bos: bool = True,
        text_description: str | None = None,
        threads: int = 2,
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 to predict a token, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.windows = token_windows(tokenizer, text, seq_len, max_windows, stride, add_bos=add_bos)
        bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
        self.seq_len, self.stride, self.batch_size, self.threads = seq_len, stride, batch_size, threads
        n = self.windows.shape[0]
        # First scored target position (index into the seq_len - 1 shifted targets) per window.
        first = [0] + [max(0, seq_len - 1 - stride) for _ in range(1, n)]
        self._first_target = first
        self.num_tokens = sum(seq_len - 1 - f for f in first)
        where = text_description or f"{len(text):,} characters of text"
        self.description = (
            f"perplexity on {n} windows of {seq_len} tokens, stride {stride} "
            f"({self.num_tokens:,} predicted tokens) of {where}"
            + (f", after BOS token {bos}" if bos is not None else "")
        )

    def _batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.windows.shape[0], self.batch_size):
            yield start, self.windows[start : start + self.batch_size]

    def _nll(self, start: int, logits: torch.Tensor, ids: torch.Tensor) -> float:
        import torch.nn.functional as F

        logits = logits[:, :-1].float()
        targets = ids[:, 1:]
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        losses = losses.view(targets.shape)
        total = 0.0
        for row in range(ids.shape[0]):
            total += float(losses[row, self._first_target[start + row] :].double().sum())
        return total

    def _finish(self, total_nll: float) -> float:
        mean = total_nll / self.num_tokens
        return math.exp(mean) if mean < 700 else math.inf

    def evaluate_torch(self, model: PreTrainedModel) -> float:
        """Perplexity of a PyTorch causal LM (``model(input_ids, use_cache=False).logits``).

        Returns
        -------
        float, >= 1
            ``inf`` if the mean NLL overflows.
        """
        import torch

        device = next(model.parameters()).device
        total = 0.0
        batches = list(self._batches())
        with torch.inference_mode():
            for start, ids in _progress(batches, "perplexity (torch)"):
                ids_dev = ids.to(device)
                out = _torch_forward(model, {"input_ids": ids_dev}, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                total += self._nll(start, logits.cpu(), ids)
        return self._finish(total)

    def evaluate_onnx(self, onnx_path: str | os.PathLike) -> float:
        """Perplexity of an ONNX causal-LM graph (output ``logits``, or the first output).

        Returns
        -------
        float, >= 1
        """
        import torch

        session = _session(onnx_path, self.threads)
        names = [o.name for o in session.get_outputs()]
        output = "logits" if "logits" in names else names[0]
        total = 0.0
        batches = list(self._batches())
        for start, ids in _progress(batches, "perplexity (onnx)"):
            feed = _onnx_feed(session, {"input_ids": ids.numpy()})
            logits = torch.from_numpy(session.run([output], feed)[0])
            total += self._nll(start, logits, ids)
        return self._finish(total)


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
        for batch in _progress(encoded.batches, desc):
            inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
            hidden = _hidden_state(_torch_forward(model, inputs)).float().cpu()
            pieces.append(_mean_pool(hidden, inputs["attention_mask"].cpu()))
    return _unsort(torch.cat(pieces), encoded)


def _embed_onnx(session: onnxruntime.InferenceSession, encoded: _EncodedBatches, desc: str) -> torch.Tensor:
    import torch

    pieces = []
    for batch in _progress(encoded.batches, desc):
        hidden = torch.from_numpy(_onnx_hidden(session, batch)).float()
        pieces.append(_mean_pool(hidden, torch.from_numpy(batch["attention_mask"])))
    return _unsort(torch.cat(pieces), encoded)


def _unsort(embeddings: torch.Tensor, encoded: _EncodedBatches) -> torch.Tensor:
    import torch

    out = torch.empty_like(embeddings)
    out[torch.from_numpy(encoded.order)] = embeddings
    return out


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

    metric = "stsb_spearman"
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
            f"STS-B Spearman x100 of cosine of mean-pooled embeddings vs gold score, "
            f"{len(pairs)} pairs{where}, max_length {max_length}"
        )

    def _score(self, embeddings: torch.Tensor) -> float:
        import torch.nn.functional as F

        n = len(self.gold)
        cosine = F.cosine_similarity(embeddings[:n].double(), embeddings[n:].double(), dim=-1)
        return 100.0 * _spearman(cosine.tolist(), self.gold)

    def evaluate_torch(self, model: PreTrainedModel) -> float:
        """Spearman x100 in [-100, 100] for a PyTorch encoder."""
        return self._score(_embed_torch(model, self._encoded, "stsb (torch)"))

    def evaluate_onnx(self, onnx_path: str | os.PathLike) -> float:
        """Spearman x100 in [-100, 100] for a feature-extraction ONNX graph."""
        session = _session(onnx_path, self.threads)
        return self._score(_embed_onnx(session, self._encoded, "stsb (onnx)"))


# --------------------------------------------------------------------------- cosine agreement


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

    metric = "cosine_agreement"
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
        ids = np.asarray(
            [tokenizer.build_inputs_with_special_tokens(row) for row in windows.tolist()], dtype=np.int64
        )
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
            f"mean cosine similarity of mean-pooled embeddings to the original model's, "
            f"{len(ids)} windows of {seq_len} tokens of {where}"
        )

    def _embed_torch(self, model: PreTrainedModel) -> torch.Tensor:
        import torch

        device = next(model.parameters()).device
        pieces = []
        with torch.inference_mode():
            for batch in self._batches:
                inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
                hidden = _hidden_state(_torch_forward(model, inputs)).float().cpu()
                pieces.append(_mean_pool(hidden, inputs["attention_mask"].cpu()))
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

        session = _session(onnx_path, self.threads)
        pieces = []
        for batch in self._batches:
            hidden = torch.from_numpy(_onnx_hidden(session, batch)).float()
            pieces.append(_mean_pool(hidden, torch.from_numpy(batch["attention_mask"])))
        return self._score(torch.cat(pieces))


# --------------------------------------------------------------------------- factory

_CLASSES: dict[str, type[Evaluator]] = {
    "perplexity": PerplexityEvaluator,
    "stsb_spearman": STSBEvaluator,
    "cosine_agreement": CosineAgreementEvaluator,
}
_KIND = {"perplexity": "decoder", "stsb_spearman": "encoder", "cosine_agreement": "encoder"}


def _check_options(metric: str, options: dict[str, Any]) -> None:
    params = inspect.signature(_CLASSES[metric].__init__).parameters
    allowed = sorted(
        name
        for name, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not name.endswith("_description")
    )
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RecipeError(f"unknown option(s) {unknown} for metric {metric!r}; allowed: {allowed}")


def build_evaluator(
    metric: str,
    loaded: LoadedModel,
    *,
    data: str | os.PathLike | None,
    reference_model: PreTrainedModel | None = None,
    **options: Any,
) -> Evaluator:
    """Build the evaluator for ``metric`` on ``loaded``'s tokenizer and data.

    Parameters
    ----------
    metric : {"perplexity", "stsb_spearman", "cosine_agreement"}
    loaded : LoadedModel
        The model being compressed; its tokenizer and kind are used.
    data : str, PathLike or None
        ``perplexity`` and ``cosine_agreement``: a text source for
        :func:`optimum_lowrank.data.load_text` (None: Python's own documentation,
        see :func:`~optimum_lowrank.data.default_text`). ``stsb_spearman``: a
        required STS-B TSV, see :func:`~optimum_lowrank.data.load_sts_pairs`.
    reference_model : PreTrainedModel, optional
        The original model; required by ``cosine_agreement``, whose reference
        embeddings are computed here, at construction.
    **options
        Keyword options of the evaluator class (e.g. ``seq_len``, ``max_windows``,
        ``max_pairs``, ``num_samples``).

    Returns
    -------
    Evaluator

    Raises
    ------
    RecipeError
        If the metric is unknown, does not suit the model kind (perplexity needs a
        decoder, the embedding metrics an encoder), an option is unknown, or
        ``cosine_agreement`` lacks ``reference_model``.
    DataError
        If the data is missing, empty or malformed (``stsb_spearman`` without data).
    """
    if metric not in _CLASSES:
        raise RecipeError(f"unknown accuracy metric {metric!r}; allowed: {', '.join(METRICS)}")
    needed = _KIND[metric]
    if loaded.kind != needed:
        hint = (
            "use stsb_spearman (with an STS-B TSV) or cosine_agreement for encoders"
            if needed == "decoder"
            else "use perplexity for decoders"
        )
        article = {"encoder": "an", "decoder": "a"}
        raise RecipeError(
            f"metric {metric!r} needs {article[needed]} {needed} model but {loaded.source} is "
            f"{article[loaded.kind]} {loaded.kind}; {hint}"
        )
    _check_options(metric, options)
    tokenizer = loaded.tokenizer

    if metric == "stsb_spearman":
        if data is None:
            raise DataError("metric 'stsb_spearman' needs data: the path of an STS-B TSV file (e.g. sts-dev.tsv)")
        pairs = load_sts_pairs(data)
        return STSBEvaluator(tokenizer, pairs, pairs_description=Path(data).name, **options)

    text, text_description = load_text(data)
    if metric == "perplexity":
        return PerplexityEvaluator(tokenizer, text, text_description=text_description, **options)
    if reference_model is None:
        raise RecipeError("metric 'cosine_agreement' needs reference_model (the original model)")
    return CosineAgreementEvaluator(
        tokenizer, text, reference_model, text_description=text_description, **options
    )

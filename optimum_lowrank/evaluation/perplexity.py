"""Causal language-model perplexity on fixed token windows (ONNX Runtime and PyTorch)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field

from optimum_lowrank.data import load_text, token_windows
from optimum_lowrank.evaluation.base import Evaluator, onnx_feed, open_session, torch_forward
from optimum_lowrank.progress import bar
from optimum_lowrank.recipe import AccuracyConfig

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from optimum_lowrank.models import LoadedModel

# --------------------------------------------------------------------------- perplexity


class PerplexityConfig(AccuracyConfig):
    """``accuracy: {metric: perplexity, max_increase: 0.05}``: the gate for causal LMs.

    Attributes
    ----------
    max_increase : float, 0 <= max_increase <= 100
        The threshold: allowed relative increase of perplexity (0.05 = +5%); the
        compressed value passes when ``value <= original * (1 + max_increase)``.
    data : str or None
        A text source for :func:`optimum_lowrank.data.load_text`; None: Python's own
        documentation (:func:`~optimum_lowrank.data.default_text`).
    seq_len : int, 8 <= seq_len <= 8192
        Tokens per window.
    stride : int >= 1, or None
        Tokens between window starts; None: ``seq_len`` (windows do not overlap).
    max_windows : int, >= 1
        At most this many windows.
    """

    threshold_field: ClassVar[str] = "max_increase"

    max_increase: float | None = Field(None, ge=0, le=100)
    seq_len: int = Field(512, ge=8, le=8192)
    stride: int | None = Field(None, ge=1)
    max_windows: int = Field(20, ge=1)

    def acceptable(self, original: float, value: float) -> bool:
        return value <= original * (1 + self.threshold[1])


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

    name = "perplexity"
    config_class = PerplexityConfig
    model_kinds = ("decoder",)
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
            f"({self.num_tokens:,} predicted tokens) of {where}" + (f", after BOS token {bos}" if bos is not None else "")
        )

    @classmethod
    def from_config(cls, config: PerplexityConfig, loaded: LoadedModel, reference_model: PreTrainedModel | None = None) -> PerplexityEvaluator:
        """Windows of ``config.data`` (see :class:`PerplexityConfig`) cut with ``loaded``'s tokenizer.

        Raises
        ------
        DataError
            If the text cannot be read or is shorter than one window.
        """
        text, text_description = load_text(config.data)
        return cls(
            loaded.tokenizer,
            text,
            seq_len=config.seq_len,
            stride=config.stride or config.seq_len,
            max_windows=config.max_windows,
            text_description=text_description,
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
            for start, ids in bar(batches, desc="perplexity (torch)", unit="batch"):
                ids_dev = ids.to(device)
                out = torch_forward(model, {"input_ids": ids_dev}, use_cache=False)
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

        session = open_session(onnx_path, self.threads)
        names = [o.name for o in session.get_outputs()]
        output = "logits" if "logits" in names else names[0]
        total = 0.0
        batches = list(self._batches())
        for start, ids in bar(batches, desc="perplexity (onnx)", unit="batch"):
            feed = onnx_feed(session, {"input_ids": ids.numpy()})
            logits = torch.from_numpy(session.run([output], feed)[0])
            total += self._nll(start, logits, ids)
        return self._finish(total)

"""The accuracy metric: top-1 next-token agreement of a causal LM with the original model."""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from optimum_lowrank import AccuracyConfig, Evaluator, LoadedModel, RecipeError, hookimpl, onnx_feed, open_session, torch_forward


class Top1AgreementConfig(AccuracyConfig):
    """``accuracy: {metric: top1_agreement, min_agreement: 0.9}``.

    Attributes
    ----------
    min_agreement : float, 0 < min_agreement <= 1
        The threshold: the compressed model passes when its agreement is at least this.
    num_samples : int, 1 <= num_samples <= 1024
        Sequences of random token ids.
    seq_len : int, 2 <= seq_len <= 8192
        Tokens per sequence; at most the model's ``max_position_embeddings``.
    """

    threshold_field: ClassVar[str] = "min_agreement"

    min_agreement: float | None = Field(None, gt=0, le=1)
    num_samples: int = Field(4, ge=1, le=1024)
    seq_len: int = Field(32, ge=2, le=8192)

    def acceptable(self, original: float, value: float) -> bool:
        return value >= self.threshold[1]


class Top1AgreementEvaluator(Evaluator):
    """Share of positions where a causal LM's top-1 next token equals the original model's.

    The inputs are ``num_samples`` sequences of ``seq_len`` token ids drawn uniformly
    from the vocabulary with seed 0: no data and no tokenizer. Random tokens are far
    from text, so this is a cheap check that the compressed model still computes
    the same function, not a measure of language quality (use ``perplexity``). The
    original model scores 1.0; higher is better.

    Raises
    ------
    RecipeError
        From :meth:`from_config`, without a reference model or when ``seq_len``
        exceeds the model's positions.
    """

    name = "top1_agreement"
    config_class = Top1AgreementConfig
    model_kinds = ("decoder",)
    higher_is_better = True

    def __init__(self, reference_model: nn.Module, num_samples: int = 4, seq_len: int = 32) -> None:
        vocab_size = reference_model.config.vocab_size
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
        self._reference = self._top1(reference_model)
        self.description = f"top-1 next-token agreement with the original on {num_samples} x {seq_len} random token ids (seed 0)"

    @classmethod
    def from_config(
        cls, config: Top1AgreementConfig, loaded: LoadedModel, reference_model: nn.Module | None
    ) -> Top1AgreementEvaluator:
        if reference_model is None:
            raise RecipeError("metric 'top1_agreement' needs reference_model (the original model)")
        positions = getattr(reference_model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and config.seq_len > positions:
            raise RecipeError(f"metric 'top1_agreement': seq_len {config.seq_len} exceeds the model's {positions} positions")
        return cls(reference_model, num_samples=config.num_samples, seq_len=config.seq_len)

    def _top1(self, model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        with torch.inference_mode():
            output = torch_forward(model, {"input_ids": self.input_ids.to(device)}, use_cache=False)
        return output.logits.argmax(-1).cpu()

    def _agreement(self, top1: torch.Tensor) -> float:
        return float((top1 == self._reference).double().mean())

    def evaluate_torch(self, model: nn.Module) -> float:
        """Agreement in [0, 1] of a PyTorch causal LM."""
        return self._agreement(self._top1(model))

    def evaluate_onnx(self, onnx_path: str | os.PathLike) -> float:
        """Agreement in [0, 1] of a causal-LM ONNX graph (output ``logits``)."""
        session = open_session(onnx_path)
        logits = session.run(["logits"], onnx_feed(session, {"input_ids": self.input_ids.numpy()}))[0]
        return self._agreement(torch.from_numpy(logits).argmax(-1))


@hookimpl
def lowrank_register_metrics(register) -> None:
    register(Top1AgreementEvaluator)

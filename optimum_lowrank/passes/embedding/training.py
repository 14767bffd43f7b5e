"""The direction-aware reconstruction loss and the small trainer shared by the embedding passes.

The autoencoder, tensor-train and Fourier embedding passes all fit a compressed
layer to the rows of the token-embedding table it replaces, with no task data.
They share the loss of Balazy et al. [1]_, its alpha schedule, the optimiser
(Adam + StepLR) and the option fields below.

Loss (per batch of rows ``x`` and reconstructions ``x_hat``, shape (B, d))::

    L = cos_weight * mean(1 - cos(x_hat, x))
      + pow_weight * mean((|x_hat - x| + 1e-10) ** alpha)
      + l2_weight * sum of squared trained weights

with ``cos_weight = 0.9975 / 5``, ``pow_weight = 0.0025``, ``l2_weight = 0`` and
``alpha`` annealed linearly from 1.0 to 0.1 over the first 20 epochs, then held
at 0.1 (10 more epochs in the paper). Adam, lr 1e-3, StepLR(step 4, gamma 0.5),
batch 32 in the paper.

References
----------
.. [1] Balazy, Banaei, Lebret, Tabor, Aberer, "Direction is what you need:
   Improving Word Embedding Compression in Large Language Models",
   RepL4NLP 2021, arXiv 2106.08181.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.passes.embedding.install import reconstruction_metrics
from optimum_lowrank.passes.embedding.usage import UsageAwareConfig
from optimum_lowrank.progress import bar

__all__ = [
    "EmbeddingTrainingConfig",
    "FitResult",
    "TrainingOptions",
    "TrainingResult",
    "alpha_at",
    "direction_loss",
    "fit_rows",
    "reconstruction_metrics",
    "train_rows",
]

COS_WEIGHT = 0.9975 / 5
POW_WEIGHT = 0.0025


class EmbeddingTrainingConfig(UsageAwareConfig):
    """Training options shared by the embedding passes.

    Every field left at None takes the pass's own default (listed in each pass's
    docstring and in :attr:`CompressionPass.training_defaults`); the paper's values
    are given below.

    Attributes
    ----------
    epochs : int >= 0
        Passes over the table's rows; 0 skips training (the initialisation is kept).
        Paper: 30.
    anneal_epochs : int >= 0
        Epochs over which ``alpha`` goes linearly from ``alpha_start`` to ``alpha_end``;
        it stays at ``alpha_end`` afterwards. Paper: 20.
    alpha_start, alpha_end : float in (0, 2]
        Exponent of the magnitude term. Paper: 1.0 -> 0.1.
    batch_size : int >= 1
        Rows per optimiser step (paper: 32; larger is much faster on a CPU). A
        batch of at least the vocabulary size means one full-table step per epoch.
    learning_rate : float > 0
        Adam learning rate (paper: 1e-3).
    lr_step : int >= 1, lr_gamma : float in (0, 1]
        StepLR: the learning rate is multiplied by ``lr_gamma`` every ``lr_step``
        epochs (paper: 4, 0.5).
    loss : {"direction", "mse"}
        ``direction``: the loss above; ``mse``: mean squared error (plain
        distillation), for comparison.
    cos_weight, pow_weight, l2_weight : float >= 0
        Weights of the direction loss (paper: 0.9975/5, 0.0025, 0); ``l2_weight``
        also applies with ``loss: mse``.
    seed : int or None
        Seed of initialisation and shuffling; None uses the recipe's seed.
    progress : bool
        Show a tqdm bar (on stderr) per trained layer.

    The usage-aware options (``row_weighting``, ``weight_exponent``, ``keep_top_k``,
    ``refine``) are those of :class:`~optimum_lowrank.passes.embedding.usage.UsageAwareConfig`.
    """

    epochs: int | None = Field(None, ge=0, description="Passes over the table's rows; 0 skips training (the initialisation is kept). Paper: 30.")
    anneal_epochs: int | None = Field(None, ge=0, description=(
        "Epochs over which `alpha` goes linearly from `alpha_start` to `alpha_end`; it stays at `alpha_end` "
        "afterwards. Paper: 20."
    ))
    alpha_start: float = Field(1.0, gt=0, le=2, description="Exponent of the magnitude term. Paper: 1.0 -> 0.1.")
    alpha_end: float = Field(0.1, gt=0, le=2, description="Exponent of the magnitude term. Paper: 1.0 -> 0.1.")
    batch_size: int | None = Field(None, ge=1, description=(
        "Rows per optimiser step (paper: 32; larger is much faster on a CPU). A batch of at least the "
        "vocabulary size means one full-table step per epoch."
    ))
    learning_rate: float | None = Field(None, gt=0, description="Adam learning rate (paper: 1e-3).")
    lr_step: int | None = Field(None, ge=1, description="StepLR: the learning rate is multiplied by `lr_gamma` every `lr_step` epochs (paper: 4).")
    lr_gamma: float = Field(0.5, gt=0, le=1, description="StepLR factor applied to the learning rate every `lr_step` epochs (paper: 0.5).")
    loss: Literal["direction", "mse"] = Field("direction", description="`direction`: the loss above; `mse`: mean squared error (plain distillation), for comparison.")
    cos_weight: float = Field(COS_WEIGHT, ge=0, description=(
        "Weights of the direction loss (paper: 0.9975/5, 0.0025, 0); `l2_weight` also applies with `loss: "
        "mse`."
    ))
    pow_weight: float = Field(POW_WEIGHT, ge=0, description=(
        "Weights of the direction loss (paper: 0.9975/5, 0.0025, 0); `l2_weight` also applies with `loss: "
        "mse`."
    ))
    l2_weight: float = Field(0.0, ge=0, description=(
        "Weights of the direction loss (paper: 0.9975/5, 0.0025, 0); `l2_weight` also applies with `loss: "
        "mse`."
    ))
    seed: int | None = Field(None, description="Seed of initialisation and shuffling; None uses the recipe's seed.")
    progress: bool = Field(True, description="Show a tqdm bar (on stderr) per trained layer.")

    @model_validator(mode="after")
    def _some_loss(self) -> EmbeddingTrainingConfig:
        if self.loss == "direction" and self.cos_weight == self.pow_weight == self.l2_weight == 0:
            raise ValueError("cos_weight, pow_weight and l2_weight are all 0: there is nothing to train on")
        return self

    def training(self, defaults: dict[str, Any], seed: int = 0) -> TrainingOptions:
        """The training options with every unset field taken from ``defaults`` (and ``seed``)."""
        values = {name: getattr(self, name) for name in TrainingOptions.__dataclass_fields__ if name != "seed"}
        for name, value in defaults.items():
            if values.get(name) is None:
                values[name] = value
        missing = [name for name, value in values.items() if value is None and name != "batch_size"]
        if missing:  # pragma: no cover - a pass forgot a default
            raise PassError(f"no default for training option(s) {missing}")
        return TrainingOptions(**values, seed=self.seed if self.seed is not None else seed)


@dataclass(frozen=True)
class TrainingOptions:
    """Resolved training options (see :class:`EmbeddingTrainingConfig`); ``batch_size`` None = all rows."""

    epochs: int = 30
    anneal_epochs: int = 20
    alpha_start: float = 1.0
    alpha_end: float = 0.1
    batch_size: int | None = 32
    learning_rate: float = 1e-3
    lr_step: int = 4
    lr_gamma: float = 0.5
    loss: str = "direction"
    cos_weight: float = COS_WEIGHT
    pow_weight: float = POW_WEIGHT
    l2_weight: float = 0.0
    seed: int = 0
    progress: bool = True


def alpha_at(epoch: int, config: TrainingOptions) -> float:
    """Exponent ``alpha`` of the magnitude term at 0-based ``epoch``.

    Linear from ``alpha_start`` (epoch 0) to ``alpha_end`` (epoch ``anneal_epochs``),
    then constant. With the paper's values: 1.0, 0.955, ..., 0.145, then 0.1 from epoch 20.
    """
    if config.anneal_epochs <= 0 or epoch >= config.anneal_epochs:
        return config.alpha_end
    return config.alpha_start + (config.alpha_end - config.alpha_start) * epoch / config.anneal_epochs


def direction_loss(
    x_hat: Tensor,
    x: Tensor,
    alpha: float,
    cos_weight: float = COS_WEIGHT,
    pow_weight: float = POW_WEIGHT,
    weights: Tensor | None = None,
) -> Tensor:
    """Direction-aware reconstruction loss of Balazy et al. (without the L2 term).

    Parameters
    ----------
    x_hat, x : Tensor, shape (B, d)
        Reconstructed and original rows.
    alpha : float > 0
        Exponent of the magnitude term.
    cos_weight, pow_weight : float >= 0
    weights : Tensor, shape (B,), optional
        Per-row weights (e.g. :func:`optimum_lowrank.vocab.row_weights`, mean 1 over
        the table); each row's terms are multiplied by its weight before the mean.

    Returns
    -------
    Tensor, scalar: ``cos_weight * mean(1 - cos(x_hat, x)) + pow_weight * mean((|x_hat - x| + 1e-10) ** alpha)``.

    References
    ----------
    .. [1] Balazy et al., arXiv 2106.08181, Section 3.
    """
    per_row = x_hat.new_zeros(x_hat.shape[:-1])
    if cos_weight:
        per_row = per_row + cos_weight * (1 - F.cosine_similarity(x_hat, x, dim=-1))
    if pow_weight:
        per_row = per_row + pow_weight * ((x_hat - x).abs() + 1e-10).pow(alpha).mean(-1)
    return (per_row if weights is None else per_row * weights).mean()






@dataclass
class TrainingResult:
    """What :func:`train_rows` did.

    Attributes
    ----------
    epochs : int
    steps : int
        Optimiser steps.
    seconds : float
    epoch_loss : list of float
        Mean training loss per epoch (in the loss's units; alpha changes between epochs).
    """

    epochs: int
    steps: int
    seconds: float
    epoch_loss: list[float] = field(default_factory=list)


def train_rows(
    rows: Callable[[Tensor], Tensor],
    parameters: Iterable[nn.Parameter],
    target: Tensor,
    config: TrainingOptions,
    *,
    desc: str = "training",
    row_weights: Tensor | None = None,
) -> TrainingResult:
    """Fit ``rows(index) ~= target[index]`` with the direction-aware loss.

    Each epoch visits every row once in a random order, in batches of
    ``config.batch_size``; Adam steps after every batch, StepLR after every
    epoch, ``alpha`` follows :func:`alpha_at`.

    Parameters
    ----------
    rows : callable, LongTensor (M,) -> Tensor (M, d)
        The compressed layer's reconstruction of rows ``index`` (differentiable).
    parameters : iterable of nn.Parameter
        What is trained (and what ``l2_weight`` penalises).
    target : Tensor, shape (V, d)
        The original table (not modified).
    config : TrainingOptions
        From :meth:`EmbeddingTrainingConfig.training`; ``config.seed`` seeds the shuffling.
    desc : str
        Label of the progress bar.
    row_weights : Tensor, shape (V,), optional
        Per-row loss weights (usage-aware compression); None weights rows alike.

    Returns
    -------
    TrainingResult
    """
    params = [p for p in parameters if p.requires_grad]
    total = target.shape[0]
    result = TrainingResult(epochs=config.epochs, steps=0, seconds=0.0)
    if config.epochs == 0 or not params:
        return result
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    target = target.detach().float()
    batch = total if config.batch_size is None else min(config.batch_size, total)
    epochs_bar = bar(total=config.epochs, desc=desc, unit="epoch", enabled=config.progress)
    start = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            alpha = alpha_at(epoch, config)
            order = torch.arange(total) if batch == total else torch.randperm(total, generator=generator)
            running, count = 0.0, 0
            for first in range(0, total, batch):
                index = order[first : first + batch]
                weights = None if row_weights is None else row_weights[index]
                if config.loss == "mse":
                    error = (rows(index) - target[index]).square().mean(-1)
                    loss = (error if weights is None else error * weights).mean()
                else:
                    loss = direction_loss(rows(index), target[index], alpha, config.cos_weight, config.pow_weight, weights)
                if config.l2_weight:
                    loss = loss + config.l2_weight * sum(p.square().sum() for p in params)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += float(loss.detach()) * index.numel()
                count += index.numel()
                result.steps += 1
            scheduler.step()
            result.epoch_loss.append(running / count)
            epochs_bar.set_postfix(loss=f"{running / count:.4g}", alpha=f"{alpha:.2f}", refresh=False)
            epochs_bar.update(1)
    finally:
        epochs_bar.close()
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class FitResult:
    """Row errors before and after :func:`fit_rows` trained a compressed layer.

    Attributes
    ----------
    init, final : dict of float
        :func:`reconstruction_metrics` of the fitted rows before and after training.
    training : TrainingResult
    """

    init: dict[str, float]
    final: dict[str, float]
    training: TrainingResult

    def metrics(self) -> dict[str, float]:
        """``init_*`` errors, ``train_seconds`` and ``epochs``, for a layer report."""
        out = {f"init_{key}": value for key, value in self.init.items()}
        out.update(train_seconds=self.training.seconds, epochs=float(self.training.epochs))
        return out

    def describe(self, start: str) -> str:
        """``"mean cosine 0.58 (<start>) -> 0.59 after 30 epochs (21.3 s)"``."""
        return (
            f"mean cosine {self.init['mean_cosine']:.4f} ({start}) -> {self.final['mean_cosine']:.4f} "
            f"after {self.training.epochs} epochs ({self.training.seconds:.1f} s)"
        )


def fit_rows(
    rows: Callable[[Tensor], Tensor],
    parameters: Iterable[nn.Parameter],
    target: Tensor,
    config: TrainingOptions,
    *,
    desc: str = "training",
    row_weights: Tensor | None = None,
    train_with: Callable[[Tensor], Tensor] | None = None,
) -> FitResult:
    """Measure ``rows`` against ``target`` (V, d), train with :func:`train_rows`, measure again.

    ``train_with`` (default ``rows``) is the differentiable row function used for
    training, when a faster one exists (e.g. a TT-matrix contracted as a whole
    table); ``row_weights`` is passed to :func:`train_rows`.

    Returns
    -------
    FitResult
    """
    init = reconstruction_metrics(rows, target)
    training = train_rows(train_with or rows, parameters, target, config, desc=desc, row_weights=row_weights)
    return FitResult(init, reconstruction_metrics(rows, target), training)


# --------------------------------------------------------------------------- installing a compressed embedding



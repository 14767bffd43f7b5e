"""PETE Fourier embeddings: the table is replaced by Fourier features of the token id and a small MLP.

``E(p) = RMSNorm(MLP(T(p)) + T(p))`` with ``T(p)`` the deterministic Fourier
features of ``x = 2p/(V-1) - 1`` (see :class:`~optimum_lowrank.layers.fourier.FourierEmbedding`).
PETE [1]_ trains this from scratch together with the transformer. Here the
transformer is already trained on a table, so the MLP (and the RMSNorm weight)
is fitted to reproduce the original rows (distillation on the table itself, no
task data) with the direction-aware loss of Balazy et al. or, with ``loss: mse``,
the mean squared error.

Expect this to be weak: nothing in a pre-trained vocabulary makes neighbouring
ids similar, while ``T(p)`` has at most d/2 frequencies, so an MLP of ``T(p)``
is a smooth function of the id. Measured on MiniLM (``docs/embeddings.md``): mean
row cosine about 0.2-0.25, against 0.13 for predicting the mean row everywhere
and 0.58 for a rank-37 SVD of the same size.

Decisions:

- MLP: GeGLU (``Linear(d, 2h) -> a * GELU(g) -> Linear(h, d)``), the paper's
  FFN; ``mlp: gelu`` or ``linear`` are options. ``compression_ratio`` sets the
  width h from the parameter count (:func:`~optimum_lowrank.layers.fourier.fourier_mlp_params`).
- The RMSNorm weight starts at the per-feature root-mean-square of the original
  table (not 1), so the outputs start at the table's scale; the direction loss
  hardly constrains magnitudes.
- Training defaults: 10 epochs (alpha annealed over 7), batches of 1024 rows,
  Adam lr 1e-2, StepLR(2, 0.5). The loss plateaus within a few epochs.

Tied output head
----------------
``tied_head: materialize`` (default) replaces the head with
:class:`~optimum_lowrank.layers.autoencoder.MaterializedHead`: the MLP is evaluated
for every id in every forward (V x d table, ``logits = h @ table^T``). Nothing
is stored twice, but each call costs ``V`` MLP evaluations (for SmolLM2 at
hidden 300: about 0.1 s per call on 2 CPU cores, more at larger widths).
``tied_head: untie`` keeps a dense copy of the original head.

Recipe
------
.. code-block:: yaml

    - {pass: fourier_embedding, targets: [embeddings.word_embeddings], compression_ratio: 20}
    - {pass: fourier_embedding, targets: [model.embed_tokens], hidden_dim: 256, mlp: gelu, loss: mse}

References
----------
.. [1] Ndubuaku, Talhi, "Parameter-Efficient Transformer Embeddings", arXiv 2505.02266 (2025).
.. [2] Balazy et al., "Direction is what you need", arXiv 2106.08181 (the loss).
"""

from __future__ import annotations

import math
import time
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from optimum_lowrank.api import CompressionPass, PassContext
from optimum_lowrank.errors import PassError
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.layers.base import MaterializedHead
from optimum_lowrank.layers.fourier import FourierEmbedding, fourier_mlp_params
from optimum_lowrank.passes.embedding.training import EmbeddingTrainingConfig, fit_rows
from optimum_lowrank.passes.embedding.usage import EmbeddingJob, finish_embedding, prepare_embedding
from optimum_lowrank.report import LayerReport

__all__ = ["FourierEmbeddingConfig", "FourierEmbeddingPass", "hidden_dim_for_ratio"]


class FourierEmbeddingConfig(EmbeddingTrainingConfig):
    """Options of the ``fourier_embedding`` pass.

    Exactly one of ``hidden_dim`` and ``compression_ratio``, except with
    ``mlp: linear``, which has no width (give neither).

    Attributes
    ----------
    hidden_dim : int >= 1
        MLP width h.
    compression_ratio : float > 1
        Table parameters / layer parameters, at least; sets h.
    mlp : {"geglu", "gelu", "linear"}
    tied_head : {"materialize", "untie"}
    row_weighting : {"none", "frequency"}
        Default ``none`` here (the other embedding passes default to ``frequency``):
        on MiniLM frequency weighting lowered STS-B at every ratio measured.

    Training options: :class:`~optimum_lowrank.passes.embedding.training.EmbeddingTrainingConfig`
    (defaults here: 10 epochs, alpha annealed over 7, batch 1024, lr 1e-2, StepLR(2, 0.5)).
    """

    hidden_dim: int | None = Field(None, ge=1, description="MLP width h.")
    compression_ratio: float | None = Field(None, gt=1, description="Table parameters / layer parameters, at least; sets h.")
    mlp: Literal["geglu", "gelu", "linear"] = Field("geglu", description=(
        "The MLP from Fourier features to the row: `geglu` (default, gated like the FFN), `gelu`, or `linear` "
        "(no width: give neither hidden_dim nor compression_ratio)."
    ))
    tied_head: Literal["materialize", "untie"] = Field("materialize", description=(
        "For an input embedding tied to the output head: `materialize` (default) evaluates the MLP for every "
        "id in every forward, logits = h @ table^T (nothing stored twice; V MLP evaluations per call); "
        "`untie` keeps a dense copy of the original head."
    ))
    # Measured on MiniLM (docs/usage_aware.md): frequency weighting lowered STS-B at ratios 5/10/20
    # (-4.1/-2.1/-1.6): the shared MLP is a smooth function of the id, and weighting spends it on a few ids.
    row_weighting: Literal["frequency", "none"] = Field("none", description=(
        "Default `none` here (the other embedding passes default to `frequency`): on MiniLM frequency "
        "weighting lowered STS-B at every ratio measured."
    ))

    @model_validator(mode="after")
    def _size(self) -> FourierEmbeddingConfig:
        given = [n for n in ("hidden_dim", "compression_ratio") if getattr(self, n) is not None]
        if self.mlp == "linear":
            if given:
                raise ValueError(f"mlp 'linear' has a fixed size (d^2 + 2d); do not set {', '.join(given)}")
        elif len(given) != 1:
            raise ValueError(f"set exactly one of hidden_dim, compression_ratio; got {', '.join(given) or 'none'}")
        return self


def hidden_dim_for_ratio(num_embeddings: int, embedding_dim: int, ratio: float, mlp: str) -> int:
    """Largest MLP width h with ``V d / params >= ratio`` (0 if even h = 1 is too big)."""
    d, budget = embedding_dim, num_embeddings * embedding_dim / ratio
    per_unit, fixed = (2 * d + 1, 2 * d) if mlp == "gelu" else (3 * d + 2, 2 * d)
    return max(0, math.floor((budget - fixed) / per_unit))


class FourierEmbeddingPass(CompressionPass):
    """PETE Fourier-feature embedding distilled from the table (Ndubuaku and Talhi, arXiv 2505.02266).

    Replaces each target ``nn.Embedding`` with a
    :class:`~optimum_lowrank.layers.fourier.FourierEmbedding` fitted to the original
    rows; the report gives ``relative_error``, ``mean_cosine``, ``min_cosine`` after
    fitting, the same at initialisation (``init_*``) and the training time. See the
    module docstring for decisions, the tied head and the recipe syntax.
    """

    name = "fourier_embedding"
    config_class = FourierEmbeddingConfig
    target_types = (nn.Embedding,)
    summary = "PETE Fourier features + MLP replacing the table, fitted to its rows (hidden_dim or compression_ratio)"
    example_options = {"targets": ["embeddings.word_embeddings"], "compression_ratio": 4, "epochs": 2}
    training_defaults: ClassVar[dict] = {
        "epochs": 10, "anneal_epochs": 7, "batch_size": 1024, "learning_rate": 1e-2, "lr_step": 2,
    }

    config: FourierEmbeddingConfig

    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        plans = []
        for name, module in targets.items():  # validate every target before changing any
            job = prepare_embedding(self.config, name, module, context, self.config.compression_ratio)
            plans.append((job, self._hidden_dim(job)))
        return [self._compress(model, job, hidden, context) for job, hidden in plans]

    def _hidden_dim(self, job: EmbeddingJob) -> int:
        vocab, dim = job.rows.shape
        cfg = self.config
        if cfg.mlp == "linear":
            hidden = dim
        elif cfg.hidden_dim is not None:
            hidden = cfg.hidden_dim
        else:
            hidden = hidden_dim_for_ratio(vocab, dim, job.ratio, cfg.mlp)
            if hidden < 1:
                raise PassError(f"{job.label}: compression ratio {job.ratio:g} leaves no room for a {cfg.mlp} MLP on d={dim}")
        params = fourier_mlp_params(dim, hidden, cfg.mlp)
        if params >= vocab * dim:
            raise PassError(
                f"{job.label}: a {cfg.mlp} MLP of width {hidden} has {params:,} parameters, not fewer than the table's {vocab * dim:,}"
            )
        return hidden

    def _compress(self, model: nn.Module, job: EmbeddingJob, hidden: int, context: PassContext) -> LayerReport:
        cfg = self.config
        options = cfg.training(self.training_defaults, context.seed)
        target = job.rows
        vocab, dim = target.shape
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # CPU only: the layers are built on the CPU
            torch.manual_seed(options.seed)
            layer = FourierEmbedding(vocab, dim, hidden, cfg.mlp, padding_idx=None if job.hybrid else job.module.padding_idx)
        with torch.no_grad():
            layer.norm_weight.copy_(target.square().mean(0).sqrt())
        fit = fit_rows(layer.rows, layer.parameters(), target, options, desc=f"{self.name} {job.name}", row_weights=job.weights)
        summary = f"{cfg.mlp} MLP width {hidden}; {fit.describe('init')}"
        report = finish_embedding(
            cfg, model, job, layer, context, tied_head=cfg.tied_head, head_factory=MaterializedHead,
            head_description="MLP evaluated for every id in every forward, logits = h @ table^T",
            rank=hidden, summary=summary, metrics=fit.metrics(),
        )
        report.metrics["seconds"] = time.perf_counter() - t0
        return report


@hookimpl
def lowrank_register_passes(register) -> None:
    register(FourierEmbeddingPass)

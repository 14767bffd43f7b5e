"""Direction-aware linear autoencoder compression of token embeddings (Balazy et al. 2021).

A linear autoencoder (encoder ``Linear(d, k)``, decoder ``Linear(k, d)``, both
with bias) is trained on the rows of the embedding table ``E`` (V x d) with the
direction-aware loss of :mod:`optimum_lowrank.passes.embedding.training`. The
deployed layer is :class:`~optimum_lowrank.layers.autoencoder.AutoencoderEmbedding`:
the latents ``encoder(E)`` (computed once) as ``nn.Embedding(V, k)`` followed by
the decoder; the encoder is dropped. No task data and no language-model training
are involved.

Decisions not fixed by the paper (measured in ``docs/embeddings.md``):

- SVD initialisation is the default (``init: svd``): encoder ``V_k^T x`` and
  decoder ``V_k z`` (zero biases) from the truncated SVD ``E ~= U_k S_k V_k^T``,
  so training starts exactly at the ``svd`` baseline and the report shows what
  the direction-aware training adds. ``init: pca`` centres the rows first
  (encoder ``V_k^T (x - mean)``, decoder ``V_k z + mean``: the best affine rank-k
  fit in the Frobenius norm); ``init: random`` uses PyTorch's ``nn.Linear``
  initialisation. MiniLM, ratio 5, STS-B dev Spearman x100 (SVD baseline 77.79):
  trained from SVD 75.83, from PCA 75.63, from random 75.56; untrained PCA 73.47.
  All reach the same mean row cosine (0.721 vs 0.719 for SVD).
- Batch 256 rows instead of 32: on this 2-core CPU one epoch over MiniLM's 30,522
  rows takes ~0.5 s instead of ~1.3 s, and the loss reached is the same.
- The paper's schedule is kept: 30 epochs, alpha 1.0 -> 0.1 over 20, Adam lr 1e-3,
  StepLR(4, 0.5).

Tied output head
----------------
``tied_head: shared`` (default) replaces the head with
:class:`~optimum_lowrank.layers.autoencoder.AffineFactorHead`,
``logits = (h P) A^T + (h . b)``, which reuses the latents ``A``, decoder weight
``P`` and bias ``b``: the savings are real for both the input and the output side.
``tied_head: untie`` keeps a dense copy of the original head (the head saves nothing).

Recipe
------
.. code-block:: yaml

    - {pass: autoencoder_embedding, targets: [embeddings.word_embeddings], compression_ratio: 5}
    - {pass: autoencoder_embedding, targets: [model.embed_tokens], latent_dim: 96, epochs: 10}

References
----------
.. [1] Balazy, Banaei, Lebret, Tabor, Aberer, "Direction is what you need:
   Improving Word Embedding Compression in Large Language Models",
   RepL4NLP 2021, arXiv 2106.08181.
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
from optimum_lowrank.layers.autoencoder import AffineFactorHead, AutoencoderEmbedding
from optimum_lowrank.linalg.svd import weighted_svd
from optimum_lowrank.passes.embedding.training import EmbeddingTrainingConfig, fit_rows
from optimum_lowrank.passes.embedding.usage import EmbeddingJob, finish_embedding, prepare_embedding
from optimum_lowrank.report import LayerReport

__all__ = ["AutoencoderEmbeddingConfig", "AutoencoderEmbeddingPass", "latent_dim_for_ratio"]


class AutoencoderEmbeddingConfig(EmbeddingTrainingConfig):
    """Options of the ``autoencoder_embedding`` pass. Exactly one of ``latent_dim`` and ``compression_ratio``.

    Attributes
    ----------
    latent_dim : int >= 1
        Latent size k; must be below the embedding dimension d (error otherwise).
    compression_ratio : float > 1
        ``k = floor(V d / (ratio (V + d)))`` (the paper's formula; the decoder bias,
        d parameters, is not counted in it but is in the report).
    init : {"svd", "pca", "random"}
        Start from the truncated SVD (default), the centred PCA, or a random initialisation.
    tied_head : {"shared", "untie"}
        See the module docstring.

    The training options (``epochs``, ``batch_size``, ``learning_rate``, loss weights, ``seed`` ...)
    are those of :class:`~optimum_lowrank.passes.embedding.training.EmbeddingTrainingConfig`;
    defaults here: 30 epochs, alpha annealed over 20, batch 256, lr 1e-3, StepLR(4, 0.5).
    """

    latent_dim: int | None = Field(None, ge=1, description="Latent size k; must be below the embedding dimension d (error otherwise).")
    compression_ratio: float | None = Field(None, gt=1, description=(
        "`k = floor(V d / (ratio (V + d)))` (the paper's formula; the decoder bias, d parameters, is not "
        "counted in it but is in the report)."
    ))
    init: Literal["svd", "pca", "random"] = Field("svd", description="Start from the truncated SVD (default), the centred PCA, or a random initialisation.")
    tied_head: Literal["shared", "untie"] = Field("shared", description=(
        "For an input embedding tied to the output head: `shared` (default) makes the head reuse the latents "
        "and decoder, logits = (h P) A^T + (h . b), so both sides save; `untie` keeps a dense copy of the "
        "original head (the head saves nothing)."
    ))

    @model_validator(mode="after")
    def _exactly_one_size(self) -> AutoencoderEmbeddingConfig:
        given = [n for n in ("latent_dim", "compression_ratio") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of latent_dim, compression_ratio; got {', '.join(given) or 'none'}")
        return self


def latent_dim_for_ratio(num_embeddings: int, embedding_dim: int, ratio: float) -> int:
    """``floor(V d / (ratio (V + d)))``, at least 1: the paper's latent size for a compression ratio."""
    return max(1, math.floor(num_embeddings * embedding_dim / (ratio * (num_embeddings + embedding_dim))))


class AutoencoderEmbeddingPass(CompressionPass):
    """Linear autoencoder on the embedding rows, trained with the direction-aware loss (Balazy et al., arXiv 2106.08181).

    Replaces each target ``nn.Embedding`` by an
    :class:`~optimum_lowrank.layers.autoencoder.AutoencoderEmbedding` (inside a
    :class:`~optimum_lowrank.layers.hybrid.HybridEmbedding` with ``keep_top_k``).
    Per layer the report gives ``relative_error``, ``mean_cosine`` and ``min_cosine``
    of the deployed table against the original one, the initialisation's figures on
    the fitted rows (``init_*``), the training time and the vocabulary report
    (:mod:`optimum_lowrank.passes.embedding.usage`). See the module docstring for the recipe
    syntax, decisions and tied-head handling.
    """

    name = "autoencoder_embedding"
    config_class = AutoencoderEmbeddingConfig
    target_types = (nn.Embedding,)
    summary = "direction-aware linear autoencoder of the embedding table (latent_dim or compression_ratio)"
    example_options = {"targets": ["embeddings.word_embeddings"], "compression_ratio": 4, "epochs": 2}
    training_defaults: ClassVar[dict] = {
        "epochs": 30, "anneal_epochs": 20, "batch_size": 256, "learning_rate": 1e-3, "lr_step": 4,
    }

    config: AutoencoderEmbeddingConfig

    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        jobs = [prepare_embedding(self.config, name, module, context, self.config.compression_ratio) for name, module in targets.items()]
        sizes = [self._latent_dim(job) for job in jobs]  # validate all before changing any
        return [self._compress(model, job, k, context) for job, k in zip(jobs, sizes)]

    def _latent_dim(self, job: EmbeddingJob) -> int:
        vocab, dim = job.rows.shape
        k = self.config.latent_dim if self.config.latent_dim is not None else latent_dim_for_ratio(vocab, dim, job.ratio)
        if k >= dim:
            raise PassError(f"{job.name}: latent_dim {k} must be smaller than embedding_dim {dim} (valid: 1..{dim - 1})")
        if vocab * k + k * dim + dim >= vocab * dim:
            raise PassError(
                f"{job.label}: latent_dim {k} would not reduce a {vocab}x{dim} table "
                f"({vocab * k + k * dim + dim:,} >= {vocab * dim:,} parameters)"
            )
        return k

    def _compress(self, model: nn.Module, job: EmbeddingJob, k: int, context: PassContext) -> LayerReport:
        options = self.config.training(self.training_defaults, context.seed)
        target = job.rows
        vocab, dim = target.shape
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # CPU only: the layers are built on the CPU
            torch.manual_seed(options.seed)
            encoder, decoder = nn.Linear(dim, k), nn.Linear(k, dim)
        if self.config.init != "random":
            mean = torch.zeros(dim)
            if self.config.init == "pca":
                mean = target.mean(0) if job.weights is None else (job.weights[:, None] * target).sum(0) / job.weights.sum()
            _, _, vh = weighted_svd(target - mean, job.weights)
            with torch.no_grad():
                encoder.weight.copy_(vh[:k])
                encoder.bias.copy_(-(vh[:k] @ mean))
                decoder.weight.copy_(vh[:k].t())
                decoder.bias.copy_(mean)

        def rows(index: torch.Tensor) -> torch.Tensor:
            return decoder(encoder(target[index]))

        fit = fit_rows(
            rows, [*encoder.parameters(), *decoder.parameters()], target, options,
            desc=f"{self.name} {job.name}", row_weights=job.weights,
        )
        layer = AutoencoderEmbedding.from_autoencoder(target, encoder, decoder, None if job.hybrid else job.module.padding_idx)
        init_name = {"svd": "SVD", "pca": "PCA", "random": "random init"}[self.config.init]
        summary = f"latent_dim {k}; {fit.describe(init_name)}"
        report = finish_embedding(
            self.config, model, job, layer, context, tied_head=self.config.tied_head, head_factory=AffineFactorHead,
            head_description="logits = (h P) A^T + (h . b)", rank=k, summary=summary, metrics=fit.metrics(),
        )
        report.metrics["seconds"] = time.perf_counter() - t0
        return report


@hookimpl
def lowrank_register_passes(register) -> None:
    register(AutoencoderEmbeddingPass)

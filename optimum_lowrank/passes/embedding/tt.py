"""Tensor-train token embeddings: per-token MPS (TensorGPT) or TT-matrix (Hrinchuk et al.), then trained.

``mode: tt`` (default, TensorGPT [1]_): each row of the table (V x d) is reshaped
to ``n_1 x ... x n_N`` (``prod n = d``) and decomposed by TT-SVD into per-token
cores; all rows are decomposed at once by a batched TT-SVD
(:func:`~optimum_lowrank.layers.tt.batched_tt_svd`), with TT-ranks shared by the
rows. Layer: :class:`~optimum_lowrank.layers.tt.TTEmbedding`. Per-token MPS
cannot compress much: a row of d = 384 held as N rank-1 cores still needs
``sum n_k`` >= 17 numbers (22.6x at most); d = 576: 32x; GPT-2's d = 768: 40.4x
(TensorGPT's 38.4x).

``mode: tt_matrix`` (Hrinchuk et al. [2]_): the vocabulary is factored too
(``V <= v_1 ... v_N``, padded with zero rows) and the whole table is one TT-matrix
with cores ``(R_{k-1}, v_k, d_k, R_k)``; a lookup splits the id into digits with
``//`` and ``%``. Much higher ratios (e.g. 30522 x 384 at TT-rank 32: 42x).
Layer: :class:`~optimum_lowrank.layers.tt.TTMatrixEmbedding`.

TT-SVD is only the initialisation: the cores are then trained on the
reconstruction of the original rows with the direction-aware loss of Balazy et
al. (:mod:`~optimum_lowrank.passes.embedding.training`; no task data), and the
report gives the errors before (``init_*``) and after training.

Decisions (measured in ``docs/embeddings.md``):

- Default reshape: ``d`` split into ``num_cores`` (default 3) balanced factors
  (384 -> 8 x 8 x 6, 576 -> 9 x 8 x 8); ``vocab_shape`` likewise with padding
  (30522 -> 32 x 32 x 30).
- ``compression_ratio``: for each candidate reshape, the largest uniform rank
  within the budget, then single bonds raised by one (left to right) while the
  budget allows, so the achieved ratio is close to (and at least) the requested
  one. In ``tt`` mode without ``reshape``/``num_cores`` the candidates are the
  balanced reshapes with 2..6 cores, and the one with the smallest TT-SVD error
  on 2,048 sampled rows is kept (the report note lists them); in ``tt_matrix``
  mode there is one candidate (3 cores by default).
- ``tolerance`` bounds the relative Frobenius error of the whole table
  (``||E - E_tt||_F <= tolerance ||E||_F``) of the TT-SVD, with ranks shared by
  all rows (per-row tolerances would give every row its own ranks, which a table
  cannot store); training may then change the error.
- Training defaults. ``tt``: 30 epochs, batches of 1024 rows, Adam lr 1e-2,
  StepLR(4, 0.5), alpha annealed over 20 epochs (cores are separate per token,
  so each row sees one update per epoch; lr 1e-2 gains more than 1e-3 in the same
  time). ``tt_matrix``: the paper's schedule (30 epochs, alpha annealed over 20,
  StepLR(4, 0.5)) with one full-table step per epoch (the whole table contracted
  by a Kronecker-ordered product is about 8x cheaper per row than gathering
  per-token cores, and reached a lower loss in the same time than batches of
  1024 rows), lr 3e-3 (1e-2 drifts the row norms further: relative error 1.45
  vs 0.99 at the same cosine). On MiniLM at TT-rank 64: 35 s; 300 steps gain
  only +0.008 mean cosine.

Tied output head
----------------
``tied_head: materialize`` (default) replaces the head with
:class:`~optimum_lowrank.layers.autoencoder.MaterializedHead`: the (V, d) table is
contracted from the cores in every forward and ``logits = h @ table^T``. It
stores nothing twice (the savings are real) but adds the contraction to every
call (in ONNX too). ``tied_head: untie`` keeps a dense copy of the original head.

Recipe
------
.. code-block:: yaml

    - {pass: tt_embedding, targets: [embeddings.word_embeddings], max_rank: 2}
    - {pass: tt_embedding, targets: [embeddings.word_embeddings], mode: tt_matrix, compression_ratio: 20}
    - {pass: tt_embedding, targets: [model.embed_tokens], mode: tt_matrix, tolerance: 0.5, epochs: 0}

References
----------
.. [1] Xu, Xu, Mandic, "TensorGPT: Efficient Compression of the Embedding Layer
   in LLMs based on the Tensor-Train Decomposition", arXiv 2307.00526.
.. [2] Hrinchuk, Khrulkov, Mirvakhabova, Orlova, Oseledets, "Tensorized
   Embedding Layers", arXiv 1901.10787.
.. [3] Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from optimum_lowrank.api import CompressionPass, PassContext
from optimum_lowrank.errors import PassError
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.layers.base import MaterializedHead
from optimum_lowrank.layers.tt import TTEmbedding, TTMatrixEmbedding
from optimum_lowrank.linalg.tt import balanced_factors, batched_tt_svd, prime_factors, tt_params, tt_ranks, vocab_factors
from optimum_lowrank.passes.embedding.training import EmbeddingTrainingConfig, fit_rows
from optimum_lowrank.passes.embedding.usage import EmbeddingJob, finish_embedding, prepare_embedding
from optimum_lowrank.report import LayerReport

__all__ = ["TTEmbeddingConfig", "TTEmbeddingPass", "choose_tt_layout"]

RANK_OPTIONS = ("max_rank", "tolerance", "compression_ratio")
SEARCH_CORES = range(2, 7)
SEARCH_ROWS = 2048


class TTEmbeddingConfig(EmbeddingTrainingConfig):
    """Options of the ``tt_embedding`` pass. Exactly one of ``max_rank``, ``tolerance``, ``compression_ratio``.

    Attributes
    ----------
    mode : {"tt", "tt_matrix"}
        Per-token MPS (TensorGPT) or TT-matrix that also factors the vocabulary (Hrinchuk et al.).
    reshape : tuple of int >= 2, optional
        ``(n_1, ..., n_N)`` with product d (checked against the layer: PassError otherwise).
        Default: ``num_cores`` balanced factors of d.
    num_cores : int in [1, 12], optional
        Number of cores N when ``reshape`` is not given (default 3; in ``tt`` mode
        with ``compression_ratio``, searched over 2..6 when neither is given).
    vocab_shape : tuple of int >= 1, optional
        ``tt_matrix`` only: ``(v_1, ..., v_N)`` with product >= V. Default: N
        nearly equal factors covering V (see :func:`~optimum_lowrank.layers.tt.vocab_factors`).
    max_rank : int >= 1
        Uniform TT-rank cap (each bond is also capped by its unfolding sizes).
    tolerance : float in (0, 1)
        Relative Frobenius error of the TT-SVD of the whole table; ranks are the smallest meeting it.
    compression_ratio : float > 1
        Table parameters before / after, at least; see the module docstring.
    tied_head : {"materialize", "untie"}
        See the module docstring.

    Training options are those of
    :class:`~optimum_lowrank.passes.embedding.training.EmbeddingTrainingConfig`, with
    per-mode defaults (module docstring); ``epochs: 0`` keeps the TT-SVD.
    """

    mode: Literal["tt", "tt_matrix"] = Field("tt", description="Per-token MPS (TensorGPT) or TT-matrix that also factors the vocabulary (Hrinchuk et al.).")
    reshape: tuple[int, ...] | None = Field(None, description=(
        "`(n_1, ..., n_N)` with product d (checked against the layer: PassError otherwise). Default: "
        "`num_cores` balanced factors of d."
    ))
    num_cores: int | None = Field(None, ge=1, le=12, description=(
        "Number of cores N when `reshape` is not given (default 3; in `tt` mode with `compression_ratio`, "
        "searched over 2..6 when neither is given)."
    ))
    vocab_shape: tuple[int, ...] | None = Field(None, description=(
        "`tt_matrix` only: `(v_1, ..., v_N)` with product >= V. Default: N nearly equal factors covering V "
        "(see `vocab_factors`)."
    ))
    max_rank: int | None = Field(None, ge=1, description="Uniform TT-rank cap (each bond is also capped by its unfolding sizes).")
    tolerance: float | None = Field(None, gt=0, lt=1, description="Relative Frobenius error of the TT-SVD of the whole table; ranks are the smallest meeting it.")
    compression_ratio: float | None = Field(None, gt=1, description="Table parameters before / after, at least; see the module docstring.")
    tied_head: Literal["materialize", "untie"] = Field("materialize", description=(
        "For an input embedding tied to the output head: `materialize` (default) contracts the (V, d) table "
        "from the cores in every forward, logits = h @ table^T (nothing stored twice, a contraction per "
        "call); `untie` keeps a dense copy of the original head."
    ))

    @field_validator("reshape", "vocab_shape")
    @classmethod
    def _positive_factors(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (not value or any(n < 1 for n in value)):
            raise ValueError(f"factors must be positive integers, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TTEmbeddingConfig:
        given = [n for n in RANK_OPTIONS if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(RANK_OPTIONS)}; got {', '.join(given) or 'none'}")
        if self.vocab_shape is not None and self.mode != "tt_matrix":
            raise ValueError("vocab_shape applies to mode 'tt_matrix' only")
        if self.reshape is not None and self.num_cores is not None and len(self.reshape) != self.num_cores:
            raise ValueError(f"reshape {list(self.reshape)} has {len(self.reshape)} factors but num_cores is {self.num_cores}")
        if self.reshape is not None and self.vocab_shape is not None and len(self.reshape) != len(self.vocab_shape):
            raise ValueError("reshape and vocab_shape need the same number of factors")
        return self


@dataclass
class _Layout:
    """Shapes and ranks chosen for one table."""

    shape: tuple[int, ...]
    vocab_shape: tuple[int, ...] | None
    max_rank: int | tuple[int, ...] | None
    tolerance: float | None
    params: int | None  # known before decomposing (rank-driven), None for tolerance
    note: str = ""


def choose_tt_layout(config: TTEmbeddingConfig, weight: Tensor, name: str = "embedding") -> _Layout:
    """Reshape(s) and rank for ``weight`` (V, d) as ``config`` asks.

    Raises
    ------
    PassError
        Reshape product differs from d, vocab_shape product below V, too many cores
        for d's prime factors, or a compression ratio the mode cannot reach.
    """
    vocab, dim = weight.shape
    matrix = config.mode == "tt_matrix"
    if config.reshape is not None and math.prod(config.reshape) != dim:
        raise PassError(f"{name}: reshape {list(config.reshape)} has product {math.prod(config.reshape)}, not embedding_dim {dim}")
    if config.vocab_shape is not None and math.prod(config.vocab_shape) < vocab:
        raise PassError(
            f"{name}: vocab_shape {list(config.vocab_shape)} covers {math.prod(config.vocab_shape)} ids, fewer than the vocabulary {vocab}"
        )

    def shapes(cores: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        shape = config.reshape or balanced_factors(dim, cores)
        vshape = (config.vocab_shape or vocab_factors(vocab, len(shape))) if matrix else None
        return tuple(shape), vshape

    def tensor_shape(shape: tuple[int, ...], vshape: tuple[int, ...] | None) -> tuple[int, ...]:
        return shape if vshape is None else tuple(v * d for v, d in zip(vshape, shape))

    def params(shape: tuple[int, ...], vshape: tuple[int, ...] | None, rank: int | Sequence[int]) -> int:
        merged = tensor_shape(shape, vshape)
        return (vocab if vshape is None else 1) * tt_params(merged, tt_ranks(merged, rank))

    fixed_cores = len(config.reshape) if config.reshape else len(config.vocab_shape or ()) or config.num_cores
    if config.compression_ratio is None:
        shape, vshape = shapes(fixed_cores or 3)
        if config.max_rank is not None:
            return _Layout(shape, vshape, config.max_rank, None, params(shape, vshape, config.max_rank))
        return _Layout(shape, vshape, None, config.tolerance, None)

    budget = vocab * dim / config.compression_ratio
    if fixed_cores is not None or matrix:
        candidates = [shapes(fixed_cores or 3)]
    else:
        candidates = [shapes(n) for n in SEARCH_CORES if n <= len(prime_factors(dim))]
    feasible = []
    for shape, vshape in candidates:
        rank, previous = 0, None
        while True:  # the largest uniform rank within the budget (stop once the bond caps saturate)
            count = params(shape, vshape, rank + 1)
            if count > budget or count == previous:
                break
            rank, previous = rank + 1, count
        if rank < 1:
            continue
        # then raise single bonds by one, left to right, while the budget allows (closer to the ratio)
        merged = tensor_shape(shape, vshape)
        ranks = list(tt_ranks(merged, rank)[1:-1])
        grown = True
        while grown:
            grown = False
            for k in range(len(ranks)):
                trial = ranks[:k] + [ranks[k] + 1] + ranks[k + 1 :]
                if list(tt_ranks(merged, trial)[1:-1]) == trial and params(shape, vshape, trial) <= budget:
                    ranks, grown = trial, True
        feasible.append((shape, vshape, tuple(ranks)))
    if not feasible:
        best = max(vocab * dim / params(s, v, 1) for s, v in candidates)
        hint = " (per-token MPS is bounded by d / sum of d's prime factors; mode tt_matrix goes much higher)" if not matrix else ""
        raise PassError(
            f"{name}: compression ratio {config.compression_ratio:g} is out of reach for a {vocab}x{dim} table in mode "
            f"{config.mode!r}: at most {best:.1f}x at TT-rank 1{hint}"
        )
    note = ""
    if len(feasible) > 1:
        generator = torch.Generator().manual_seed(0)
        sample = weight.detach().float()[torch.randperm(vocab, generator=generator)[:SEARCH_ROWS]]
        errors = []
        for shape, _, rank in feasible:
            cores = batched_tt_svd(sample.reshape(sample.shape[0], *shape), rank)
            approx = _contract_cores(cores, sample.shape[0])
            errors.append(float((approx - sample).norm() / sample.norm()))
        order = min(range(len(feasible)), key=lambda i: errors[i])
        tried = ", ".join(f"{'x'.join(map(str, s))}@{list(r)}: {e:.3f}" for (s, _, r), e in zip(feasible, errors))
        note = f"layout search on {sample.shape[0]} rows (reshape@ranks: TT-SVD error): {tried}"
        feasible = [feasible[order]]
    shape, vshape, rank = feasible[0]
    return _Layout(shape, vshape, rank, None, params(shape, vshape, rank), note)


def _contract_cores(cores: list[Tensor], batch: int) -> Tensor:
    out = cores[0].reshape(batch, -1, cores[0].shape[-1])
    for core in cores[1:]:
        out = torch.matmul(out, core.reshape(batch, core.shape[1], -1)).reshape(batch, -1, core.shape[-1])
    return out.reshape(batch, -1)


class TTEmbeddingPass(CompressionPass):
    """Tensor-train embedding: TT-SVD initialisation, then cores trained on the rows (TensorGPT, arXiv 2307.00526; TT-matrix: Hrinchuk et al., arXiv 1901.10787).

    Replaces each target ``nn.Embedding`` with a
    :class:`~optimum_lowrank.layers.tt.TTEmbedding` (``mode: tt``) or
    :class:`~optimum_lowrank.layers.tt.TTMatrixEmbedding` (``mode: tt_matrix``).
    The report's metrics give ``init_relative_error`` / ``init_mean_cosine`` (TT-SVD)
    and ``relative_error`` / ``mean_cosine`` after training, and the seconds of
    each phase. See the module docstring for options, decisions and the recipe syntax.
    """

    name = "tt_embedding"
    config_class = TTEmbeddingConfig
    target_types = (nn.Embedding,)
    summary = "tensor-train embedding (per-token MPS or TT-matrix), TT-SVD then trained on the rows"
    example_options = {"targets": ["embeddings.word_embeddings"], "mode": "tt_matrix", "max_rank": 8, "epochs": 2}
    training_defaults: ClassVar[dict[str, dict]] = {
        "tt": {"epochs": 30, "anneal_epochs": 20, "batch_size": 1024, "learning_rate": 1e-2, "lr_step": 4},
        "tt_matrix": {"epochs": 30, "anneal_epochs": 20, "batch_size": None, "learning_rate": 3e-3, "lr_step": 4},
    }

    config: TTEmbeddingConfig

    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        plans = []
        for name, module in targets.items():  # validate every target before changing any
            job = prepare_embedding(self.config, name, module, context, self.config.compression_ratio)
            config = self.config
            if config.compression_ratio is not None:
                config = config.model_copy(update={"compression_ratio": job.ratio})
            plans.append((job, choose_tt_layout(config, job.rows, job.label)))
        return [self._compress(model, job, layout, context) for job, layout in plans]

    def _compress(self, model: nn.Module, job: EmbeddingJob, layout: _Layout, context: PassContext) -> LayerReport:
        cfg = self.config
        options = cfg.training(self.training_defaults[cfg.mode], context.seed)
        target = job.rows
        vocab, dim = target.shape
        padding_idx = None if job.hybrid else job.module.padding_idx
        t0 = time.perf_counter()
        if cfg.mode == "tt":
            layer = TTEmbedding.from_weight(target, layout.shape, layout.max_rank, layout.tolerance, padding_idx)
        else:
            layer = TTMatrixEmbedding.from_weight(target, layout.vocab_shape, layout.shape, layout.max_rank, layout.tolerance, padding_idx)
        decompose_seconds = time.perf_counter() - t0
        whole = isinstance(layer, TTMatrixEmbedding) and (options.batch_size is None or options.batch_size * 4 >= vocab)

        def whole_table(index: Tensor) -> Tensor:  # TT-matrix: one contraction of the whole table per step
            table = layer.full_table()
            return table[:vocab] if index.numel() == vocab else table[index]

        fit = fit_rows(
            layer.rows, layer.parameters(), target, options, desc=f"{self.name} {job.name}", row_weights=job.weights,
            train_with=whole_table if whole else None,
        )
        metrics = {**fit.metrics(), "decompose_seconds": decompose_seconds}
        shape = "x".join(map(str, layer.shape))
        if cfg.mode == "tt_matrix":
            shape = f"({'x'.join(map(str, layer.vocab_shape))}) x ({shape})"
        summary = f"{cfg.mode} {shape}, TT-ranks {list(layer.ranks)}; {fit.describe('TT-SVD')}"
        report = finish_embedding(
            cfg, model, job, layer, context, tied_head=cfg.tied_head, head_factory=MaterializedHead,
            head_description="table contracted from the cores in every forward, logits = h @ table^T",
            rank=max(layer.ranks), summary="; ".join(filter(None, [summary, layout.note])), metrics=metrics,
        )
        report.metrics["seconds"] = time.perf_counter() - t0
        return report


@hookimpl
def lowrank_register_passes(register) -> None:
    register(TTEmbeddingPass)

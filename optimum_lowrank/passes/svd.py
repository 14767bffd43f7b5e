"""Truncated SVD of linear layers and token embeddings: the baseline every other pass is measured against.

``W (out x in) ~= A B`` with ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``, stored as
two linear layers (``in -> r`` without bias, ``r -> out`` with the original bias);
an embedding table ``E (V x d)`` becomes ``nn.Embedding(V, r)`` followed by
``nn.Linear(r, d, bias=False)``.

Recipe
------
.. code-block:: yaml

    - {pass: svd, targets: ["re:.*intermediate\\\\.dense"], rank_ratio: 0.5}
    - {pass: svd, targets: [model.embed_tokens], compression_ratio: 4}   # tied LM head shares the factors
    - {pass: svd, targets: ["re:.*_proj"], target_params_ratio: 0.7}     # 30% fewer, ranks chosen per layer

References
----------
.. [1] Eckart, Young, "The approximation of one matrix by another of lower rank", Psychometrika, 1936.
.. [2] Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for
   Large Language Model Compression", arXiv 2403.07378 (plain SVD as the baseline, Table 1).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from optimum_lowrank.api import CompressionPass, PassContext
from optimum_lowrank.errors import PassError
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.layers.lowrank import LowRankEmbedding, LowRankHead, LowRankLinear, linear_weight
from optimum_lowrank.linalg.budget import (
    DEFAULT_MIN_LAYER_SAVING,
    LayerSpectrum,
    allocate_ranks,
    budget_dense_note,
    factorizes,
    min_saving_note,
)
from optimum_lowrank.linalg.svd import split_factors, weighted_factors, weighted_svd
from optimum_lowrank.passes.embedding.usage import EmbeddingJob, UsageAwareConfig, finish_embedding, prepare_embedding
from optimum_lowrank.progress import bar
from optimum_lowrank.report import LayerReport, Spectrum

__all__ = ["SVDConfig", "SVDPass", "choose_rank"]

RANK_OPTIONS = ("rank", "rank_ratio", "compression_ratio", "energy", "target_params_ratio")


class SVDConfig(UsageAwareConfig):
    """Options of the ``svd`` pass. Exactly one of the five rank options is set.

    Attributes
    ----------
    rank : int >= 1
        The same rank for every target. Refused (error) where it would not reduce
        the layer's parameters or exceeds ``min(out_features, in_features)``.
    rank_ratio : float in (0, 1]
        Rank as a fraction of ``min(out_features, in_features)``, rounded, at least 1.
    compression_ratio : float > 1
        Parameters before / after per layer: ``r = floor(out * in / (ratio * (out + in)))``.
    energy : float in (0, 1]
        Smallest rank keeping this fraction of the sum of squared singular values.
    target_params_ratio : float in (0, 1)
        Global budget: the fraction of all targets' parameters that remain (0.7 = 30%
        fewer). Per-layer ranks are allocated greedily by the marginal squared singular
        value (relative to the layer's total) per parameter, see
        :func:`optimum_lowrank.linalg.budget.allocate_ranks`; layers the allocation
        leaves at or above break-even stay dense (skipped, with a report line).
    tied_head : {"shared", "untie"}
        For an input embedding tied to the output head: ``shared`` (default) makes the
        head reuse the factors, ``logits = (h P) A^T``, so the savings are real;
        ``untie`` keeps a dense copy of the original head (saves only the input side).
    min_layer_saving : float in [0, 1)
        Linear layers only: a layer whose factors would keep more than
        ``1 - min_layer_saving`` of its weights stays dense (skipped, with a report
        line), also for an explicit ``rank``; the budget allocation treats that rank
        as the layer's break-even. Default 0.1: in ONNX Runtime a layer factorised at
        5% fewer parameters ran slower than the dense one, from 10% fewer every
        measured shape was faster (see :mod:`optimum_lowrank.linalg.budget`). 0 turns
        it off.

    With ``rank_ratio``, ``compression_ratio`` or ``energy``, a layer whose rank would
    not reduce its parameters is skipped with a report line.

    Embedding targets also take the usage-aware options of
    :class:`~optimum_lowrank.passes.embedding.usage.UsageAwareConfig`: ``row_weighting``
    (default ``frequency``: the weighted SVD ``min ||D (E - A B)||_F``,
    ``D = diag((count + 1)^(weight_exponent / 2))``), ``keep_top_k`` and ``refine``
    (not with ``target_params_ratio``). Linear targets ignore them.
    """

    rank: int | None = Field(None, ge=1, description=(
        "The same rank for every target. Refused (error) where it would not reduce the layer's parameters or "
        "exceeds `min(out_features, in_features)`."
    ))
    rank_ratio: float | None = Field(None, gt=0, le=1, description="Rank as a fraction of `min(out_features, in_features)`, rounded, at least 1.")
    compression_ratio: float | None = Field(None, gt=1, description="Parameters before / after per layer: `r = floor(out * in / (ratio * (out + in)))`.")
    energy: float | None = Field(None, gt=0, le=1, description="Smallest rank keeping this fraction of the sum of squared singular values.")
    target_params_ratio: float | None = Field(None, gt=0, lt=1, description=(
        "Global budget: the fraction of all targets' parameters that remain (0.7 = 30% fewer). Per-layer "
        "ranks are allocated greedily by the marginal squared singular value (relative to the layer's total) "
        "per parameter, see `allocate_ranks`; layers the allocation leaves at or above break-even stay dense "
        "(skipped, with a report line)."
    ))
    tied_head: Literal["shared", "untie"] = Field("shared", description=(
        "For an input embedding tied to the output head: `shared` (default) makes the head reuse the factors, "
        "`logits = (h P) A^T`, so the savings are real; `untie` keeps a dense copy of the original head "
        "(saves only the input side)."
    ))
    min_layer_saving: float = Field(DEFAULT_MIN_LAYER_SAVING, ge=0, lt=1, description=(
        "Linear layers only: a layer whose factors would keep more than `1 - min_layer_saving` of its weights "
        "stays dense (skipped, with a report line), also for an explicit `rank`; the budget allocation treats "
        "that rank as the layer's break-even. Default 0.1: in ONNX Runtime a layer factorised at 5% fewer "
        "parameters ran slower than the dense one, from 10% fewer every measured shape was faster (see "
        "`budget`). 0 turns it off."
    ))

    @model_validator(mode="after")
    def _exactly_one_rank_option(self) -> SVDConfig:
        given = [name for name in RANK_OPTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(exactly_one_message(given))
        if self.target_params_ratio is not None and (self.keep_top_k or self.refine is not None):
            raise ValueError("keep_top_k and refine apply to one embedding at a given rank; they cannot be combined with target_params_ratio")
        return self


def exactly_one_message(given: list[str]) -> str:
    """The error for zero or several rank options (per-layer options first, then the global budget)."""
    return f"set exactly one of {', '.join(RANK_OPTIONS[:-1])}; got {', '.join(given) or 'none'} (or the global budget {RANK_OPTIONS[-1]} alone)"


def choose_rank(config: SVDConfig, shape: tuple[int, int], singular_values: Tensor | None = None) -> int:
    """The rank ``config`` asks for on an ``(m, n)`` matrix.

    Parameters
    ----------
    config : SVDConfig
    shape : (m, n)
    singular_values : Tensor of shape (min(m, n),), descending
        Needed for ``energy``.

    Returns
    -------
    int, >= 1 (may exceed the break-even rank; the caller decides to skip or refuse).

    Raises
    ------
    PassError
        If ``rank`` exceeds ``min(m, n)``, or ``config`` sets ``target_params_ratio``
        (a global budget: ranks come from :func:`~optimum_lowrank.linalg.budget.allocate_ranks`).
    """
    m, n = shape
    if getattr(config, "target_params_ratio", None) is not None:
        raise PassError("target_params_ratio is a global budget; per-layer ranks come from budget.allocate_ranks, not choose_rank")
    full = min(m, n)
    if config.rank is not None:
        if config.rank > full:
            raise PassError(f"rank {config.rank} exceeds min(out, in) = {full} of a {m}x{n} weight; valid ranks: 1..{full}")
        return config.rank
    if config.rank_ratio is not None:
        return max(1, round(config.rank_ratio * full))
    if config.compression_ratio is not None:
        return max(1, math.floor(m * n / (config.compression_ratio * (m + n))))
    assert singular_values is not None and config.energy is not None
    energy = singular_values.double().square().cumsum(0)
    kept = energy / energy[-1]
    return min(full, int(torch.searchsorted(kept, torch.tensor(config.energy, dtype=kept.dtype) - 1e-12).item()) + 1)




class SVDPass(CompressionPass):
    """Truncated SVD of ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Embedding`` at a chosen rank.

    A factorization pays off only when ``r < out * in / (out + in)``; below that
    break-even the layer is replaced, above it the layer is skipped (or, for an
    explicit ``rank``, refused). See :class:`SVDConfig` for the options and the
    module docstring for the recipe syntax and references.
    """

    name = "svd"
    config_class = SVDConfig
    target_types = (nn.Linear, "Conv1D", nn.Embedding)
    summary = "truncated SVD of Linear / Conv1D / Embedding (rank, rank_ratio, compression_ratio or energy)"
    example_options = {"targets": ["re:.*intermediate\\.dense", "embeddings.word_embeddings"], "rank_ratio": 0.25}

    config: SVDConfig

    supports_sequential = True

    def sequential_problem(self) -> str | None:
        """A global ``target_params_ratio`` ranks every target against all others: it needs the whole model."""
        if self.config.target_params_ratio is not None:
            return "pass 'svd' with target_params_ratio allocates one budget over all blocks; use rank, rank_ratio, compression_ratio or energy"
        return None

    def apply_block(self, model: nn.Module, targets: dict[str, nn.Module], collected, context: PassContext) -> list[LayerReport]:
        """Sequential mode: plain SVD needs no data; the block's targets are factorized as in :meth:`apply`."""
        return self.apply(model, targets, context)

    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        budget = self._allocate(targets) if self.config.target_params_ratio is not None else {}
        jobs = {  # usage statistics and hybrid split of every embedding, validated before any change
            name: self._prepare_embedding(name, module, context)
            for name, module in targets.items()
            if isinstance(module, nn.Embedding)
        }
        reports = []
        for name, module in bar(targets.items(), desc="svd", total=len(targets), unit="layer"):
            if name in jobs:
                reports.append(self._embedding(model, jobs[name], context, budget.get(name)))
            else:
                reports.append(self._linear(model, name, module, budget.get(name)))
        return reports

    def _prepare_embedding(self, name: str, module: nn.Embedding, context: PassContext) -> EmbeddingJob:
        config, note = self.config, ""
        if config.target_params_ratio is not None and config.row_weighting == "frequency":
            config = config.model_copy(update={"row_weighting": "none"})
            note = "rows not weighted: the global budget allocates ranks on the plain spectra"
        job = prepare_embedding(config, name, module, context, self.config.compression_ratio)
        job.notes.extend(filter(None, [note]))
        return job

    def _allocate(self, targets: dict[str, nn.Module]) -> dict[str, tuple[int, tuple[Tensor, Tensor, Tensor]]]:
        """SVD of every target and the ranks :func:`allocate_ranks` gives them under ``target_params_ratio``."""

        svds, spectra = {}, []
        for name, module in targets.items():
            weight = module.weight if isinstance(module, nn.Embedding) else linear_weight(module)[0]
            if not torch.isfinite(weight).all():
                raise PassError(f"{name}: weight contains NaN or inf; cannot factorize")
            svds[name] = torch.linalg.svd(weight.detach().float(), full_matrices=False)
            extra = sum(p.numel() for p in module.parameters()) - weight.numel()
            saving = 0.0 if isinstance(module, nn.Embedding) else self.config.min_layer_saving
            spectra.append(LayerSpectrum(name, tuple(weight.shape), svds[name][1].square(), extra_params=extra, min_saving=saving))
        allocation = allocate_ranks(spectra, self.config.target_params_ratio)
        return {name: (allocation.ranks[name], svds[name]) for name in targets}

    def _decompose(
        self, name: str, weight: Tensor, budgeted: tuple[int, tuple[Tensor, Tensor, Tensor]] | None = None, min_saving: float = 0.0
    ) -> tuple[int, tuple[Tensor, Tensor, Tensor]] | tuple[int, None]:
        m, n = weight.shape
        if budgeted is not None:
            rank, svd = budgeted
            return (rank, svd) if factorizes((m, n), rank, min_saving) else (rank, None)
        if not torch.isfinite(weight).all():
            raise PassError(f"{name}: weight contains NaN or inf; cannot factorize")
        svd = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        rank = choose_rank(self.config, (m, n), svd[1])
        if rank * (m + n) >= m * n:
            if self.config.rank is not None:
                raise PassError(
                    f"{name}: rank {rank} would not reduce a {m}x{n} layer "
                    f"({rank * (m + n):,} >= {m * n:,} parameters); use rank < {m * n / (m + n):.1f}"
                )
            return rank, None
        if not factorizes((m, n), rank, min_saving):
            return rank, None
        return rank, svd

    def _linear(self, model: nn.Module, name: str, module: nn.Module, budgeted=None) -> LayerReport:
        weight, bias = linear_weight(module)
        before = sum(p.numel() for p in module.parameters())
        saving = self.config.min_layer_saving
        rank, svd = self._decompose(name, weight, budgeted, saving)
        if svd is None:
            shape = tuple(weight.shape)
            note = budget_dense_note(shape, saving) if budgeted is not None else min_saving_note(rank, shape, saving) or _break_even_note(rank, shape)
            return LayerReport(
                name=name, module_type=type(module).__name__, action="skipped", params_before=before, params_after=before,
                rank=rank, note=note,
            )
        layer = LowRankLinear(weight.shape[1], weight.shape[0], rank, bias=bias is not None)
        layer.load_factors(*split_factors(*svd, rank), bias).to(weight.dtype)
        model.set_submodule(name, layer)
        error = _relative_error(svd[1], rank)
        return LayerReport(
            name=name, module_type=type(module).__name__, action="factorized", params_before=before,
            params_after=sum(p.numel() for p in layer.parameters()), rank=rank, metrics={"relative_error": error},
            spectrum=Spectrum.from_singular_values(svd[1], rank),
        )

    def _embedding(self, model: nn.Module, job: EmbeddingJob, context: PassContext, budgeted=None) -> LayerReport:
        rows = job.rows
        m, n = rows.shape
        if budgeted is not None:
            rank, svd = budgeted
            if rank * (m + n) >= m * n:
                return LayerReport(
                    name=job.name, module_type="Embedding", action="skipped", params_before=m * n, params_after=m * n, rank=rank,
                    note=_break_even_note(rank, (m, n), True),
                )
        else:
            svd = weighted_svd(rows, job.weights)
            config = self.config
            if config.compression_ratio is not None:
                config = config.model_copy(update={"compression_ratio": job.ratio})
            rank = choose_rank(config, (m, n), svd[1])
            if rank * (m + n) >= m * n:
                if self.config.rank is not None:
                    raise PassError(
                        f"{job.label}: rank {rank} would not reduce a {m}x{n} table "
                        f"({rank * (m + n):,} >= {m * n:,} parameters); use rank < {m * n / (m + n):.1f}"
                    )
                vocab, dim = job.table.shape
                return LayerReport(
                    name=job.name, module_type="Embedding", action="skipped", params_before=vocab * dim, params_after=vocab * dim,
                    rank=rank, note=_break_even_note(rank, (m, n)),
                )
        a, b = weighted_factors(rows, svd[1], svd[2], rank)
        layer = LowRankEmbedding(m, n, rank, padding_idx=None if job.hybrid else job.module.padding_idx)
        with torch.no_grad():
            layer.codes.weight.copy_(a)
            layer.proj.weight.copy_(b.t())
        error = _relative_error(svd[1], rank)
        summary = f"rank {rank}; {'weighted ' if job.weights is not None else ''}relative error of the fitted rows {error:.4f}"
        return finish_embedding(
            self.config, model, job, layer, context, tied_head=self.config.tied_head, head_factory=LowRankHead,
            head_description="logits = (h P) A^T", rank=rank, summary=summary, metrics={"fit_relative_error": error},
            action="factorized", spectrum=Spectrum.from_singular_values(svd[1], rank, "weight" if job.weights is None else "weighted rows"),
        )


def _relative_error(singular_values: Tensor, rank: int) -> float:
    """``||W - W_r||_F / ||W||_F`` from the singular values (Eckart-Young)."""
    energy = singular_values.double().square()
    return float((energy[rank:].sum() / energy.sum()).sqrt())


def _break_even_note(rank: int, shape: tuple[int, int] | torch.Size, budgeted: bool = False) -> str:
    m, n = shape
    if budgeted:
        return f"kept dense by the budget allocation (it reached the break-even rank {m * n / (m + n):.1f} of a {m}x{n} layer)"
    return f"rank {rank} would not reduce a {m}x{n} layer (break-even rank {m * n / (m + n):.1f})"


@hookimpl
def lowrank_register_passes(register) -> None:
    register(SVDPass)

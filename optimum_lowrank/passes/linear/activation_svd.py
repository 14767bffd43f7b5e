"""Activation-aware truncated SVD of linear layers: ASVD and SVD-LLM.

Plain SVD minimises ``||W - W_r||_F``, which ignores what the layer is fed; both
methods here minimise (exactly, or by a heuristic) the error of the layer's
*output* on calibration activations, ``||(W - W_r) X^T||_F`` with the tokens as
the rows of ``X`` (N x in_features). Each factors ``W T`` for an input transform
``T`` (in x in), truncates, and folds ``T^{-1}`` back into the right factor:

    W T = U S V^T,   W_r = (U_r S_r^{1/2}) (S_r^{1/2} V_r^T T^{-1})   (= A B)

``asvd``
    ``T = diag(mean_t |x_t|)^alpha`` (ASVD, [1]_; ``alpha`` 0.5 as in the paper):
    input channels with large activations weigh more. Channel scales below
    ``1e-6`` of the largest are clamped there (a dead channel would make ``T``
    singular).
``svd_llm``
    ``T = L``, the lower Cholesky factor of the Gram matrix ``X^T X`` (SVD-LLM's
    truncation-aware data whitening, [2]_). Then
    ``||(W - W_r) X^T||_F^2 = ||(W - W_r) L||_F^2 = sum_{i > r} s_i^2``: the
    truncation is optimal for the output error and the dropped whitened singular
    values say exactly what is lost. The Gram matrix is accumulated per layer in
    float64 (see :mod:`optimum_lowrank.passes.linear.calibration`). If it is not
    positive definite (fewer calibration tokens than input channels, dead
    channels), ``damping * mean(diag(G))`` is added to its diagonal and the
    Cholesky retried with 10x the damping, up to 6 times; the layer's report says
    which damping was used.

Statistics come from the *original* model (all targets hooked in one streaming
pass over the calibration windows), not from the partly compressed one, unless
``sequential: true``: then the model is compressed block by block, each layer
whitened with its inputs through the already compressed layers and, by default,
refit in closed form against the original model's inputs
(:mod:`optimum_lowrank.passes.linear.sequential`, :mod:`optimum_lowrank.linalg.refit`).

Ranks: the same options as ``svd`` (``rank``, ``rank_ratio``,
``compression_ratio``, ``energy`` of the whitened/scaled spectrum) or the global
budget ``target_params_ratio``, allocated over all targets by the marginal
whitened singular-value energy per parameter (:mod:`optimum_lowrank.linalg.budget`).

Recipe
------
.. code-block:: yaml

    calibration: {data: ../shared/data/wikitext-2/wiki.valid.tokens, num_samples: 64, seq_len: 256}
    passes:
      - pass: activation_svd
        method: svd_llm                      # or asvd (with alpha: 0.5)
        targets: ["re:model\\\\.layers\\\\.\\\\d+\\\\..*_proj"]
        target_params_ratio: 0.7             # 30% fewer parameters in the targets

References
----------
.. [1] Yuan, Shang, Song, Wu, Yan, Sun, "ASVD: Activation-aware Singular Value
   Decomposition for Compressing Large Language Models", arXiv 2312.05821 (2023).
.. [2] Wang, Zheng, Wan, Zhang, "SVD-LLM: Truncation-aware Singular Value
   Decomposition for Large Language Model Compression", arXiv 2403.07378 (2024).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from optimum_lowrank.api import CompressionPass, PassConfig, PassContext
from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.layers.lowrank import LowRankLinear, linear_weight
from optimum_lowrank.linalg.budget import (
    DEFAULT_MIN_LAYER_SAVING,
    LayerSpectrum,
    allocate_ranks,
    budget_dense_note,
    factorizes,
    min_saving_note,
)
from optimum_lowrank.linalg.whitening import InputStatistics, InputTransform, WhitenedSVD, asvd_transform, cholesky_transform, whitened_svd
from optimum_lowrank.passes.linear.calibration import (
    collect_input_statistics,
    collect_output_sensitivity,
    completed_statistics,
    input_statistics_hooks,
)
from optimum_lowrank.passes.linear.sequential import sequential_factorize
from optimum_lowrank.passes.svd import RANK_OPTIONS, choose_rank, exactly_one_message
from optimum_lowrank.progress import bar
from optimum_lowrank.report import LayerReport, Spectrum

__all__ = [
    "ActivationSVDConfig",
    "ActivationSVDPass",
    "InputTransform",
    "WhitenedSVD",
    "asvd_transform",
    "budget_ranks",
    "cholesky_transform",
    "whitened_svd",
]


def budget_ranks(
    targets: dict[str, nn.Module],
    decomps: dict[str, WhitenedSVD],
    target_params_ratio: float,
    allocation: str,
    sensitivity: dict[str, float] | None = None,
    min_rank: int = 1,
    min_layer_saving: float = 0.0,
) -> dict[str, int]:
    """Ranks under a global budget from whitened spectra: :func:`~optimum_lowrank.linalg.budget.allocate_ranks`.

    Parameters
    ----------
    targets : dict name -> module
        For the bias counts.
    decomps : dict name -> WhitenedSVD
    target_params_ratio : float in (0, 1)
    allocation : {"fisher", "relative", "absolute"}
        ``fisher``: gains ``sensitivity[name] * s_i^2`` with ``s`` from the Gram matrix
        normalised per token (an estimate of twice the loss increase of dropping direction i).
    sensitivity : dict name -> float
        Required for ``fisher``.
    min_rank : int
    min_layer_saving : float in [0, 1)
        A layer is factorised only if its factors keep at most ``1 - min_layer_saving`` of
        its weights; the allocation treats that rank as its break-even
        (:func:`~optimum_lowrank.linalg.budget.factorizes`).

    Returns
    -------
    dict name -> rank (``min(out, in)`` for layers the budget keeps dense)

    Raises
    ------
    PassError
        ``fisher`` without sensitivities, or an infeasible budget.
    """

    if allocation == "fisher" and sensitivity is None:
        raise PassError("allocation 'fisher' needs per-layer sensitivities (collect_output_sensitivity)")
    spectra = []
    for name, module in targets.items():
        d = decomps[name]
        shape = (d.u.shape[0], d.v.shape[1])
        extra = sum(p.numel() for p in module.parameters()) - shape[0] * shape[1]
        weight = 1.0
        if allocation == "fisher":
            weight = max(float(sensitivity[name]), 1e-30)
        spectra.append(LayerSpectrum(name, shape, d.s.square(), extra_params=extra, weight=weight, min_saving=min_layer_saving))
    normalize = "relative" if allocation == "relative" else "absolute"
    return allocate_ranks(spectra, target_params_ratio, normalize=normalize, min_rank=min_rank).ranks


class ActivationSVDConfig(PassConfig):
    """Options of the ``activation_svd`` pass. Exactly one rank option is set.

    Attributes
    ----------
    method : {"svd_llm", "asvd"}
        Whitening with the Cholesky factor of ``X^T X`` (default) or ASVD's channel scaling.
    rank, rank_ratio, compression_ratio, energy
        As in :class:`~optimum_lowrank.passes.svd.SVDConfig`; ``energy`` is measured on the
        whitened (``svd_llm``) or scaled (``asvd``) singular values.
    target_params_ratio : float in (0, 1)
        Global budget over all targets (0.7 = 30% fewer parameters); ranks allocated by
        the marginal whitened energy per parameter.
    allocation : {"fisher", "relative", "absolute"}
        How the budget compares layers (see :mod:`optimum_lowrank.linalg.budget`):
        ``fisher`` (default) weighs each layer's whitened energy by its sensitivity, the
        mean squared loss gradient w.r.t. its output on ``sensitivity_samples`` calibration
        windows (:func:`~optimum_lowrank.passes.linear.calibration.collect_output_sensitivity`),
        so the greedy step keeps the direction with the largest estimated loss increase
        per parameter; ``relative``: whitened energy relative to the layer's total;
        ``absolute``: raw whitened energy.
    sensitivity_samples : int >= 1
        Calibration windows (the first ones) with a backward pass for ``fisher``; default 8.
    min_rank : int >= 1
        Smallest rank the budget allocation gives a factorized layer.
    alpha : float in (0, 2], ``asvd`` only
        Exponent of the channel scaling; default 0.5 (the ASVD paper's choice).
    damping : float in (0, 1), ``svd_llm`` only
        First relative ridge tried when the Gram matrix is not positive definite; default 1e-6.
    num_samples : int >= 1, optional
        Use only the first ``num_samples`` calibration windows; more than the calibration
        data provides is an error.
    batch_size : int >= 1
        Calibration windows per forward pass.
    progress : bool
        Progress bars on stderr (calibration batches, sensitivity batches, layers
        decomposed); default on. ``--quiet`` / ``optimize(progress=False)`` turn every bar off.
    min_layer_saving : float in [0, 1)
        A layer whose factors would keep more than ``1 - min_layer_saving`` of its weights
        stays dense (skipped, with a report line), also for an explicit ``rank``; the
        budget allocation treats that rank as the layer's break-even. Default 0.1
        (measured: in ONNX Runtime a layer factorised at 5% fewer parameters was slower
        than the dense one, see :mod:`optimum_lowrank.linalg.budget`); 0 turns it off.
    sequential : bool, ``svd_llm`` only
        Compress block by block, each layer whitened with its inputs through the already
        compressed blocks and layers before it (GPTQ / SVD-LLM sequential update; see
        :mod:`optimum_lowrank.passes.linear.sequential`). Ranks still come from the rank
        option on the original model's statistics. Needs a model whose transformer blocks
        :func:`~optimum_lowrank.blocks.find_blocks` knows; default False.
    refit : bool, optional
        With ``sequential``: truncation-aware refit of each layer against the original
        model's output (:mod:`optimum_lowrank.linalg.refit`); unset means True. Without
        ``sequential`` it is an error (the plain SVD-LLM truncation is already optimal there).
    refit_damping : float in (0, 1)
        Relative ridge of the refit towards the original weight, ``* mean(diag G)``; default 0.01.
    """

    method: Literal["svd_llm", "asvd"] = Field("svd_llm", description="Whitening with the Cholesky factor of `X^T X` (default) or ASVD's channel scaling.")
    rank: int | None = Field(None, ge=1, description=(
        "The same rank for every target. Refused (error) where it would not reduce the layer's parameters or "
        "exceeds `min(out_features, in_features)`."
    ))
    rank_ratio: float | None = Field(None, gt=0, le=1, description="Rank as a fraction of `min(out_features, in_features)`, rounded, at least 1.")
    compression_ratio: float | None = Field(None, gt=1, description="Parameters before / after per layer: `r = floor(out * in / (ratio * (out + in)))`.")
    energy: float | None = Field(None, gt=0, le=1, description=(
        "Smallest rank keeping this fraction of the sum of squared singular values. Measured on the whitened "
        "(svd_llm) or scaled (asvd) singular values."
    ))
    target_params_ratio: float | None = Field(None, gt=0, lt=1, description=(
        "Global budget over all targets (0.7 = 30% fewer parameters); ranks allocated by the marginal "
        "whitened energy per parameter."
    ))
    allocation: Literal["fisher", "relative", "absolute"] = Field("fisher", description=(
        "How the budget compares layers (see `budget`): `fisher` (default) weighs each layer's whitened "
        "energy by its sensitivity, the mean squared loss gradient w.r.t. its output on `sensitivity_samples` "
        "calibration windows (`collect_output_sensitivity`), so the greedy step keeps the direction with the "
        "largest estimated loss increase per parameter; `relative`: whitened energy relative to the layer's "
        "total; `absolute`: raw whitened energy."
    ))
    sensitivity_samples: int = Field(8, ge=1, description="Calibration windows (the first ones) with a backward pass for `fisher`; default 8.")
    min_rank: int = Field(1, ge=1, description="Smallest rank the budget allocation gives a factorized layer.")
    alpha: float | None = Field(None, gt=0, le=2, description="Exponent of the channel scaling; default 0.5 (the ASVD paper's choice).")
    damping: float | None = Field(None, gt=0, lt=1, description="First relative ridge tried when the Gram matrix is not positive definite; default 1e-6.")
    num_samples: int | None = Field(None, ge=1, description=(
        "Use only the first `num_samples` calibration windows; more than the calibration data provides is an "
        "error."
    ))
    batch_size: int = Field(1, ge=1, description="Calibration windows per forward pass.")
    progress: bool = Field(True, description=(
        "Progress bars on stderr (calibration batches, sensitivity batches, layers decomposed); default on. "
        "`--quiet` / `optimize(progress=False)` turn every bar off."
    ))
    min_layer_saving: float = Field(DEFAULT_MIN_LAYER_SAVING, ge=0, lt=1, description=(
        "A layer whose factors would keep more than `1 - min_layer_saving` of its weights stays dense "
        "(skipped, with a report line), also for an explicit `rank`; the budget allocation treats that rank "
        "as the layer's break-even. Default 0.1 (measured: in ONNX Runtime a layer factorised at 5% fewer "
        "parameters was slower than the dense one, see `budget`); 0 turns it off."
    ))
    sequential: bool = Field(False, description=(
        "`svd_llm` only: compress block by block, each layer whitened with its inputs through the already "
        "compressed blocks and layers before it (GPTQ / SVD-LLM sequential update); ranks still come from the "
        "rank option on the original model's statistics."
    ))
    refit: bool | None = Field(None, description=(
        "With `sequential`: truncation-aware refit of each layer against the original model's output "
        "(unset means on); an error without `sequential`, where plain SVD-LLM is already optimal."
    ))
    refit_damping: float = Field(0.01, gt=0, lt=1, description="Relative ridge of the refit towards the original weight, `* mean(diag G)`.")

    @model_validator(mode="after")
    def _check(self) -> ActivationSVDConfig:
        given = [name for name in RANK_OPTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(exactly_one_message(given))
        if self.method == "svd_llm" and self.alpha is not None:
            raise ValueError("alpha applies to method 'asvd' only")
        if self.method == "asvd" and self.damping is not None:
            raise ValueError("damping applies to method 'svd_llm' only")
        if self.sequential and self.method != "svd_llm":
            raise ValueError("sequential applies to method 'svd_llm' only")
        if self.refit and not self.sequential:
            raise ValueError("refit needs sequential: true (on the original model's inputs SVD-LLM's truncation is already the optimum)")
        return self

    @property
    def refits(self) -> bool:
        """Whether the sequential mode refits (``refit`` unset: yes)."""
        return self.sequential and self.refit is not False


class ActivationSVDPass(CompressionPass):
    """Activation-aware truncated SVD (SVD-LLM whitening or ASVD scaling) of ``nn.Linear`` / ``Conv1D``.

    Papers: Wang et al., "SVD-LLM", arXiv 2403.07378; Yuan et al., "ASVD", arXiv
    2312.05821. Needs calibration data (the recipe's ``calibration:`` section).
    See the module docstring for the algorithm and a recipe.

    Recipe::

        - {pass: activation_svd, method: svd_llm, targets: ["re:.*_proj"], target_params_ratio: 0.7}
    """

    name = "activation_svd"
    config_class = ActivationSVDConfig
    target_types = (nn.Linear, "Conv1D")
    summary = "activation-aware SVD (svd_llm whitening or asvd scaling) with a global parameter budget"
    example_options = {"targets": ["re:.*intermediate\\.dense", "re:.*attention\\.self\\.(query|value)"], "target_params_ratio": 0.6}

    config: ActivationSVDConfig

    def collect(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> dict[str, InputStatistics]:
        """Stream the calibration windows and return each target's input statistics.

        Raises
        ------
        DataError
            If ``num_samples`` exceeds the calibration windows available.
        """
        ids = context.calibration_ids
        if self.config.num_samples is not None:
            if ids.shape[0] < self.config.num_samples:
                raise DataError(
                    f"activation_svd asks for num_samples={self.config.num_samples} calibration windows, "
                    f"but the calibration text gives only {ids.shape[0]} windows of {ids.shape[1]} tokens"
                )
            ids = ids[: self.config.num_samples]
        svd_llm = self.config.method == "svd_llm"
        return collect_input_statistics(
            model, targets, ids, kind=context.kind, gram=svd_llm, abs_mean=not svd_llm,
            batch_size=self.config.batch_size, progress=self.config.progress,
        )

    def transform(self, stats: InputStatistics) -> InputTransform:
        """The input transform of one layer from its statistics."""
        if self.config.method == "asvd":
            return asvd_transform(stats, self.config.alpha if self.config.alpha is not None else 0.5)
        return cholesky_transform(stats, self.config.damping if self.config.damping is not None else 1e-6)

    def sensitivity(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> dict[str, float] | None:
        """Per-layer loss sensitivities for ``allocation: fisher`` with a budget; None otherwise."""
        if self.config.target_params_ratio is None or self.config.allocation != "fisher":
            return None
        ids = context.calibration_ids[: self.config.sensitivity_samples]
        return collect_output_sensitivity(model, targets, ids, kind=context.kind, batch_size=self.config.batch_size, seed=context.seed,
                                          progress=self.config.progress)

    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        stats = self.collect(model, targets, context)
        sensitivity = self.sensitivity(model, targets, context)
        if not self.config.sequential:
            return self.apply_with_statistics(model, targets, stats, sensitivity)
        decomps = self.decompose(targets, stats)
        del stats
        ranks = self._ranks(targets, decomps, sensitivity)
        del decomps
        return self.apply_sequential(model, targets, context, ranks)

    def apply_sequential(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext, ranks: dict[str, int]) -> list[LayerReport]:
        """Factorize ``targets`` at ``ranks`` block by block (``sequential``; see :mod:`.sequential`).

        Raises
        ------
        PassError
            Blocks not found (names the model class), targets outside them, a failed refit;
            the model is restored first.
        """
        ids = context.calibration_ids
        if self.config.num_samples is not None:
            ids = ids[: self.config.num_samples]
        saving = self.config.min_layer_saving
        return sequential_factorize(
            model, targets, ids, ranks, kind=context.kind, transform=self.transform, replace=self._replace,
            factorizes=lambda shape, rank: factorizes(shape, rank, saving), refit=self.config.refits,
            refit_damping=self.config.refit_damping, batch_size=self.config.batch_size, progress=self.config.progress,
        )

    def apply_with_statistics(
        self,
        model: nn.Module,
        targets: dict[str, nn.Module],
        stats: dict[str, InputStatistics],
        sensitivity: dict[str, float] | None = None,
    ) -> list[LayerReport]:
        """Factorize ``targets`` from already collected statistics (e.g. reused across budgets).

        Parameters
        ----------
        model : nn.Module
            Modified in place.
        targets : dict name -> module
        stats : dict name -> InputStatistics
            From :meth:`collect` on the same (uncompressed) targets.
        sensitivity : dict name -> float, optional
            From :meth:`sensitivity`; required for ``allocation: fisher`` with a budget.

        Returns
        -------
        list of LayerReport, one per target.
        """
        decomps = self.decompose(targets, stats)
        return self.apply_decomposed(model, targets, decomps, sensitivity, keep=False)

    def decompose(self, targets: dict[str, nn.Module], stats: dict[str, InputStatistics]) -> dict[str, WhitenedSVD]:
        """Input transform and whitened SVD of every target (float64 SVD; factors stored float32).

        Raises
        ------
        PassError
            A target without statistics, a NaN/inf weight or Gram matrix, or a Gram matrix
            that no damping makes positive definite; the message names the layer.
        """
        transforms: dict[int, InputTransform] = {}
        decomps: dict[str, WhitenedSVD] = {}
        for name, module in bar(targets.items(), desc="activation_svd: whitened SVD", total=len(targets), unit="layer",
                                enabled=self.config.progress):
            if name not in stats:
                raise PassError(f"{name}: no calibration statistics")
            key = id(stats[name])
            if key not in transforms:
                try:
                    transforms[key] = self.transform(stats[name])
                except PassError as err:
                    raise PassError(f"{name}: {err}") from None
            weight, _ = linear_weight(module)
            try:
                decomps[name] = whitened_svd(weight, transforms[key])
            except PassError as err:
                raise PassError(f"{name}: {err}") from None
        return decomps

    def apply_decomposed(
        self,
        model: nn.Module,
        targets: dict[str, nn.Module],
        decomps: dict[str, WhitenedSVD],
        sensitivity: dict[str, float] | None = None,
        *,
        keep: bool = True,
    ) -> list[LayerReport]:
        """Choose the ranks (this config's rank option) and replace the targets of ``model``.

        ``decomps`` (from :meth:`decompose`) can be reused for several budgets when
        ``keep`` is True; with ``keep=False`` each entry is dropped once used (saves memory).
        """
        ranks = self._ranks(targets, decomps, sensitivity)
        reports = []
        for name, module in targets.items():
            decomp = decomps[name] if keep else decomps.pop(name)
            reports.append(self._replace(model, name, module, decomp, ranks[name]))
        return reports

    def _ranks(self, targets: dict[str, nn.Module], decomps: dict[str, WhitenedSVD], sensitivity: dict[str, float] | None) -> dict[str, int]:
        if self.config.target_params_ratio is None:
            return {name: choose_rank(self.config, (d.u.shape[0], d.v.shape[1]), d.s) for name, d in decomps.items()}
        return budget_ranks(
            targets, decomps, self.config.target_params_ratio, self.config.allocation, sensitivity, self.config.min_rank, self.config.min_layer_saving
        )

    # ---------------------------------------------------------------- sequential mode

    supports_sequential = True

    def sequential_problem(self) -> str | None:
        """Options that need the whole model: the global budget and ``num_samples`` (set ``calibration.num_samples``)."""
        if self.config.target_params_ratio is not None:
            return ("pass 'activation_svd' with target_params_ratio allocates one budget over all blocks (and 'fisher' "
                    "needs a backward pass through the whole model); use rank, rank_ratio, compression_ratio or energy")
        if self.config.sequential:
            return ("pass 'activation_svd' with sequential: true re-runs the compressed blocks in memory (error-aware "
                    "calibration), while execution mode 'sequential' gives each block the original model's inputs; drop one of the two")
        if self.config.num_samples is not None:
            return "pass 'activation_svd' with num_samples: in sequential mode every calibration window runs; set calibration.num_samples instead"
        return None

    def block_collector(self, targets: dict[str, nn.Module]):
        """The targets' input statistics while the block runs (see :func:`input_statistics_hooks`)."""
        svd_llm = self.config.method == "svd_llm"
        return input_statistics_hooks(targets, gram=svd_llm, abs_mean=not svd_llm)

    def apply_block(self, model: nn.Module, targets: dict[str, nn.Module], collected, context: PassContext) -> list[LayerReport]:
        """Sequential mode: whitened SVD of the block's targets from the statistics the engine collected.

        The decompositions are spread over ranks with :meth:`PassContext.map_layers` (each
        distinct statistics object, i.e. each group of layers reading the same input,
        goes to one rank); ranks are chosen per layer from this config's rank option.
        """
        stats = completed_statistics(collected)
        groups: dict[str, list[str]] = {}
        for name in targets:
            groups.setdefault(min(n for n in targets if stats[n] is stats[name]), []).append(name)

        def decompose_group(first: str) -> dict[str, WhitenedSVD]:
            members = {name: targets[name] for name in groups[first]}
            decomps = self.decompose(members, stats)
            for decomp in decomps.values():  # the factors hold T^-1 already: send only what the report reads
                decomp.transform = InputTransform(decomp.transform.kind, damping=decomp.transform.damping)
            return decomps

        decomps: dict[str, WhitenedSVD] = {}
        for part in context.map_layers(groups, decompose_group).values():
            decomps.update(part)
        return self.apply_decomposed(model, targets, {name: decomps[name] for name in targets}, keep=False)

    def _replace(self, model: nn.Module, name: str, module: nn.Module, decomp: WhitenedSVD | None, rank: int) -> LayerReport:
        """Install the rank-``rank`` factors of ``decomp`` (None only for a layer that stays dense) and report."""
        weight, bias = linear_weight(module)
        m, n = weight.shape
        before = sum(p.numel() for p in module.parameters())
        kind = type(module).__name__
        notes = []
        if decomp is not None and decomp.transform.damping:
            notes.append(f"Gram matrix not positive definite: added damping {decomp.transform.damping:g} * mean(diag)")
        if decomp is not None and decomp.transform.kind == "identity" and self.config.method == "svd_llm":
            notes.append("input was all zeros on the calibration data: plain SVD")
        saving = self.config.min_layer_saving
        spectrum = None
        if decomp is not None:
            basis = {"cholesky": "whitened", "identity": "weight"}.get(decomp.transform.kind, "scaled")
            spectrum = Spectrum.from_singular_values(decomp.s, rank, basis)
        if not factorizes((m, n), rank, saving):
            if self.config.target_params_ratio is not None:
                notes.insert(0, budget_dense_note((m, n), saving))
            elif rank * (m + n) >= m * n:
                if self.config.rank is not None:
                    raise PassError(
                        f"{name}: rank {rank} would not reduce a {m}x{n} layer "
                        f"({rank * (m + n):,} >= {m * n:,} parameters); use rank < {m * n / (m + n):.1f}"
                    )
                notes.insert(0, f"rank {rank} would not reduce a {m}x{n} layer (break-even rank {m * n / (m + n):.1f})")
            else:  # reduces the layer, but by less than min_layer_saving: slower than dense in ORT
                notes.insert(0, min_saving_note(rank, (m, n), saving))
            return LayerReport(
                name=name, module_type=kind, action="skipped", params_before=before, params_after=before, rank=rank, note="; ".join(notes),
                spectrum=spectrum,
            )
        layer = LowRankLinear(n, m, rank, bias=bias is not None)
        layer.load_factors(*decomp.factors(rank), bias).to(weight.dtype)
        model.set_submodule(name, layer)
        error_name = "relative_output_error" if decomp.transform.kind == "cholesky" else "relative_scaled_error"
        return LayerReport(
            name=name, module_type=kind, action="factorized", params_before=before, params_after=sum(p.numel() for p in layer.parameters()),
            rank=rank, note="; ".join(notes), metrics={error_name: decomp.relative_error(rank), "damping": decomp.transform.damping},
            spectrum=spectrum,
        )


@hookimpl
def lowrank_register_passes(register) -> None:
    register(ActivationSVDPass)

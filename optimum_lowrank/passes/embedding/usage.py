"""Usage-aware embedding compression: row weights, a hybrid exact/compressed table, output-aware refinement.

Every embedding pass (``svd`` on an ``nn.Embedding``, ``autoencoder_embedding``,
``tt_embedding``, ``fourier_embedding``) takes the options of
:class:`UsageAwareConfig` and runs through :func:`prepare_embedding` /
:func:`finish_embedding`:

1. **Token counts** of the recipe's calibration text
   (:meth:`~optimum_lowrank.api.PassContext.token_counts`, cached per
   tokenizer and text).
2. **Row weights** ``w_p = (count_p + 1) ** weight_exponent`` (mean 1), used by
   each method where it fits rows: the weighted SVD ``min ||D (E - A B)||_F`` with
   ``D = diag(sqrt(w))``; the autoencoder's SVD initialisation and its loss; the
   TT and Fourier training losses (per-row weights in the batch mean).
3. **Hybrid table** (``keep_top_k: k``): the ``k`` most frequent rows are kept
   exact and the method compresses the other ``V - k`` rows
   (:class:`~optimum_lowrank.layers.hybrid.HybridEmbedding`). The compression
   ratio counts both parts and the int32 index (V ids, 4 bytes each, counted as V
   parameters): the compressed part gets ``V d / ratio - k d - V`` parameters.
4. **Refinement** (``refine:``): only the compressed embedding's parameters are
   trained so that the model's outputs on calibration windows match the
   original's (last hidden states for encoders, next-token distributions for
   decoders), with early stopping on held-back windows (:func:`refine_embedding`).
5. **Vocabulary report** in the layer's metrics
   (:func:`~optimum_lowrank.vocab.usage_report`): the share of calibration tokens
   whose row is exact and the reconstruction error of frequent, rare and unseen rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from optimum_lowrank.api import PassConfig, PassContext
from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.layers.hybrid import HybridEmbedding, HybridHead, frequency_slots
from optimum_lowrank.passes.embedding.install import check_embedding_table, install_embedding, reconstruction_metrics, tied_output_head
from optimum_lowrank.passes.embedding.refine import RefineConfig, refine_embedding
from optimum_lowrank.report import LayerAction, LayerReport, Spectrum
from optimum_lowrank.vocab import row_weights, usage_report

__all__ = [
    "EmbeddingJob",
    "RefineConfig",
    "UsageAwareConfig",
    "finish_embedding",
    "prepare_embedding",
    "refine_embedding",
]




class UsageAwareConfig(PassConfig):
    """Usage-aware options shared by the embedding passes.

    Attributes
    ----------
    row_weighting : {"frequency", "none"}
        ``frequency`` (default): rows weighted by ``(count + 1) ** weight_exponent``
        of the calibration text's token counts; ``none``: every row alike (the
        seed papers). Measured on MiniLM (``docs/usage_aware.md``): weighting
        raises STS-B at every ratio and method where it applies. Without calibration
        data (a pass run outside the pipeline with no context), rows are weighted
        uniformly and the report says so.
    weight_exponent : float in [0, 2]
        Row p's loss is weighted by ``(count_p + 1) ** weight_exponent``. 1 (default)
        weights each row by its use, i.e. the expected error per calibration token;
        for the weighted SVD that is ``D = diag((count + 1)^0.5)``.
    keep_top_k : int >= 0
        Rows of the most frequent tokens kept exact (0: none). Must be below the
        vocabulary size, and small enough that the compression ratio leaves the rest
        some parameters (the error says the largest allowed value).
    refine : RefineConfig or None
        Output-aware refinement after the compression (off by default: it needs a
        forward and backward pass of the whole model per step).
    """

    row_weighting: Literal["frequency", "none"] = Field("frequency", description=(
        "`frequency` (default): rows weighted by `(count + 1) ** weight_exponent` of the calibration text's "
        "token counts; `none`: every row alike (the seed papers). Measured on MiniLM (`docs/usage_aware.md`): "
        "weighting raises STS-B at every ratio and method where it applies. Without calibration data (a pass "
        "run outside the pipeline with no context), rows are weighted uniformly and the report says so."
    ))
    weight_exponent: float = Field(1.0, ge=0, le=2, description=(
        "Row p's loss is weighted by `(count_p + 1) ** weight_exponent`. 1 (default) weights each row by its "
        "use, i.e. the expected error per calibration token; for the weighted SVD that is `D = diag((count + "
        "1)^0.5)`."
    ))
    keep_top_k: int = Field(0, ge=0, description=(
        "Rows of the most frequent tokens kept exact (0: none). Must be below the vocabulary size, and small "
        "enough that the compression ratio leaves the rest some parameters (the error says the largest "
        "allowed value)."
    ))
    refine: RefineConfig | None = Field(None, description=(
        "Output-aware refinement after the compression (off by default: it needs a forward and backward pass "
        "of the whole model per step)."
    ))

    @property
    def usage_aware(self) -> bool:
        """Whether any option needs the calibration token counts."""
        return self.row_weighting == "frequency" or self.keep_top_k > 0


@dataclass
class EmbeddingJob:
    """One embedding table prepared for compression by :func:`prepare_embedding`.

    Attributes
    ----------
    name : str
    module : nn.Embedding
    table : Tensor, shape (V, d), float32
        The original rows (detached).
    counts : Tensor (V,) float64, or None
        Calibration token counts (None when no calibration data was available).
    kept, rest : LongTensor
        Ids of the exact rows (k,) and of the rows the method compresses (V - k,),
        each most frequent first; with ``keep_top_k: 0``, ``kept`` is empty and
        ``rest`` is ``0..V-1`` in id order.
    ratio : float or None
        Compression ratio the method must reach on the ``rest`` rows so that the
        whole layer meets the requested one (None when the size is given directly).
    weights : Tensor (V - k,) or None
        Row weights of the ``rest`` rows (None: uniform).
    notes : list of str
    """

    name: str
    module: nn.Embedding
    table: Tensor
    counts: Tensor | None
    kept: Tensor
    rest: Tensor
    ratio: float | None
    weights: Tensor | None
    notes: list[str] = field(default_factory=list)

    @property
    def hybrid(self) -> bool:
        return self.kept.numel() > 0

    @cached_property
    def rows(self) -> Tensor:
        """The rows the method compresses, shape (V - k, d), in ``rest`` order (gathered once)."""
        return self.table[self.rest] if self.hybrid else self.table

    @property
    def label(self) -> str:
        """The layer's name, plus "(N compressed rows)" for a hybrid table (for error messages)."""
        return f"{self.name} ({self.rest.numel():,} compressed rows)" if self.hybrid else self.name


def prepare_embedding(
    config: UsageAwareConfig,
    name: str,
    module: nn.Embedding,
    context: PassContext,
    ratio: float | None = None,
) -> EmbeddingJob:
    """Counts, weights and the exact/compressed split of one table; validates before anything changes.

    Parameters
    ----------
    config : UsageAwareConfig
    name : str
    module : nn.Embedding
    context : PassContext
    ratio : float > 1, optional
        The compression ratio asked of the whole layer.

    Returns
    -------
    EmbeddingJob

    Raises
    ------
    PassError
        If ``keep_top_k`` is not below the vocabulary size, or leaves the compressed
        part no parameters at ``ratio`` (the message gives the largest valid value);
        or ``keep_top_k`` is set and there is no calibration data to rank tokens by.
    DataError
        If the calibration text produces no tokens or its tokenizer does not match
        the table's vocabulary size.
    """

    check_embedding_table(name, module.weight)
    table = module.weight.detach().float()
    vocab, dim = table.shape
    k = config.keep_top_k
    if k >= vocab:
        raise PassError(f"{name}: keep_top_k {k} must be below the vocabulary size {vocab} (valid: 0..{vocab - 1})")
    notes: list[str] = []
    counts = None
    if context.has_calibration:  # counts also feed the vocabulary report
        try:
            counts = context.token_counts(vocab, f"{name} ({vocab}x{dim})").counts
        except DataError as err:
            if config.usage_aware:
                raise
            notes.append(f"no vocabulary report ({err})")  # only the report needed them
    elif k > 0:
        raise PassError(f"{name}: keep_top_k needs calibration text to rank tokens by frequency, and none was given")
    elif config.row_weighting == "frequency":
        notes.append("no calibration data: rows weighted uniformly")
    if k > 0:
        kept, rest = frequency_slots(counts, k)
    else:
        kept, rest = torch.zeros(0, dtype=torch.long), torch.arange(vocab)
    rest_ratio = ratio
    if ratio is not None and k > 0:
        budget = vocab * dim / ratio - k * dim - vocab  # the int32 index costs V parameters' worth of bytes
        rest_params = (vocab - k) * dim
        if budget <= 0 or budget >= rest_params:
            largest = max(0, int((vocab * dim / ratio - vocab) // dim) - 1)
            raise PassError(
                f"{name}: keep_top_k {k} exact rows ({k * dim:,} parameters) plus the token index ({vocab:,}) leave "
                f"{max(budget, 0):,.0f} parameters for the other {vocab - k:,} rows at compression ratio {ratio:g}; "
                f"use keep_top_k <= {largest} (or a lower compression_ratio)"
            )
        rest_ratio = rest_params / budget
    weights = None
    if counts is not None and config.row_weighting == "frequency" and config.weight_exponent > 0:
        weights = row_weights(counts[rest], config.weight_exponent)
    return EmbeddingJob(name, module, table, counts, kept, rest, rest_ratio, weights, notes)






HeadFactory = Callable[[nn.Module, Tensor | None], nn.Module]


def finish_embedding(
    config: UsageAwareConfig,
    model: nn.Module,
    job: EmbeddingJob,
    layer: nn.Module,
    context: PassContext,
    *,
    tied_head: str,
    head_factory: HeadFactory,
    head_description: str,
    rank: int | None,
    summary: str,
    metrics: dict[str, float],
    action: LayerAction = "replaced",
    spectrum: Spectrum | None = None,
) -> LayerReport:
    """Install the compressed layer (wrapped in a hybrid table if asked), refine it, and report.

    Parameters
    ----------
    config : UsageAwareConfig
    model : nn.Module
        Modified in place.
    job : EmbeddingJob
        From :func:`prepare_embedding`.
    layer : nn.Module
        The method's compressed embedding of ``job.rows`` (``V - k`` rows, float32).
    context : PassContext
    tied_head : str
        ``"untie"`` keeps a dense head; anything else installs ``head_factory``.
    head_factory : callable (layer, bias or None) -> nn.Module
        The method's tied head for ``layer``.
    head_description : str
    rank : int or None
    summary : str
        The method's one-line description (report note).
    metrics : dict
        The method's own metrics (e.g. ``init_*`` of the fitted rows).
    action : {"replaced", "factorized"}
    spectrum : Spectrum, optional
        The singular values the method computed (the report's spectra plot).

    Returns
    -------
    LayerReport
        ``params_after`` includes the hybrid index (V) and what the head adds; the
        metrics hold the whole-table ``relative_error``/``mean_cosine``/``min_cosine``
        in token order, the vocabulary report, and refinement figures.

    Raises
    ------
    PassError
        If refinement meets a non-finite loss (the layer is restored first).
    """

    module, dtype = job.module, job.module.weight.dtype
    index_params = 0
    if job.hybrid:
        inner = layer
        layer = HybridEmbedding.from_ids(job.table[job.kept], job.kept, job.rest, inner, module.padding_idx)
        index_params = job.table.shape[0]

        def factory(embedding: nn.Module, bias: Tensor | None) -> nn.Module:
            return HybridHead(embedding, head_factory(embedding.rest, None), bias)

        description = f"exact rows' logits h E_k^T and compressed rows' ({head_description}), gathered into token order"
    else:
        factory, description = head_factory, head_description
    layer = layer.to(dtype)
    head = tied_output_head(model, module)
    after, head_note = install_embedding(model, job.name, module, layer, tied_head, factory, description)
    notes = [summary, *job.notes]
    if job.hybrid:
        notes.insert(1, f"{job.kept.numel():,} most frequent rows exact (hybrid table; token index of {index_params:,} int32 ids counted)")
    if job.weights is not None:
        notes.append(f"rows weighted by (count + 1)^{config.weight_exponent:g}")
    out = dict(metrics)
    if config.refine is not None:
        originals = {job.name: module}
        if head is not None and tied_head != "untie":
            originals[head[0]] = head[1]
        stats = refine_embedding(model, layer, originals, context, config.refine, desc=f"refine {job.name}")
        out.update(stats)
        notes.append(
            f"refined {int(stats['refine_steps'])} steps ({stats['refine_seconds']:.1f} s): held-out loss "
            f"{stats['refine_loss_before']:.4g} -> {stats['refine_loss_after']:.4g}"
        )
    with torch.no_grad():
        approx = layer.weight.detach().float()
    out.update(reconstruction_metrics(lambda index: approx[index], job.table))
    if job.counts is not None:
        exact = None
        if job.hybrid:
            exact = torch.zeros(job.table.shape[0], dtype=torch.bool)
            exact[job.kept] = True
        usage = usage_report(job.table, approx, job.counts, exact)
        out.update(usage)
        notes.append(_usage_note(usage))
    notes.append(head_note)
    return LayerReport(
        name=job.name, module_type="Embedding", action=action, params_before=job.table.numel(), params_after=after + index_params,
        rank=rank, note="; ".join(filter(None, notes)), metrics=out, spectrum=spectrum,
    )


def _usage_note(usage: dict[str, float]) -> str:
    """One report line from :func:`~optimum_lowrank.vocab.usage_report`."""
    groups = ", ".join(f"{group} {usage[f'{group}_cosine']:.3f}" for group in ("frequent", "rare", "unseen") if f"{group}_cosine" in usage)
    exact = f"exact rows cover {usage['exact_token_share']:.1%} of them; " if usage["exact_rows"] else ""
    return (
        f"calibration: {usage['calibration_tokens']:,.0f} tokens, {usage['seen_rows']:,.0f} distinct; {exact}"
        f"row cosine per calibration token {usage['token_weighted_cosine']:.3f} (mean over rows: {groups})"
    )


# --------------------------------------------------------------------------- refinement











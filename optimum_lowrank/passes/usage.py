"""Usage-aware embedding compression: row weights, a hybrid exact/compressed table, output-aware refinement.

Every embedding pass (``svd`` on an ``nn.Embedding``, ``autoencoder_embedding``,
``tt_embedding``, ``fourier_embedding``) takes the options of
:class:`UsageAwareConfig` and runs through :func:`prepare_embedding` /
:func:`finish_embedding`:

1. **Token counts** of the recipe's calibration text
   (:meth:`~optimum_lowrank.passes.base.PassContext.token_counts`, cached per
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

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.passes.base import PassConfig, PassContext
from optimum_lowrank.report import LayerReport

__all__ = [
    "EmbeddingJob",
    "RefineConfig",
    "UsageAwareConfig",
    "finish_embedding",
    "prepare_embedding",
    "refine_embedding",
    "refinement_windows",
    "weighted_factors",
    "weighted_svd",
]


class RefineConfig(BaseModel):
    """Output-aware refinement of a compressed embedding (see :func:`refine_embedding`).

    Attributes
    ----------
    steps : int >= 1
        Most optimiser steps (early stopping may end sooner).
    lr : float > 0
        Adam learning rate of the compressed embedding's parameters.
    batch_size : int >= 1
        Calibration windows per step.
    holdout : float in (0, 1)
        Share of the calibration windows held back for early stopping (at least one).
    eval_every : int >= 1
        Steps between evaluations on the held-back windows.
    patience : int >= 1
        Evaluations in a row without improvement before stopping; the best state is kept.
    lr_decay : float in (0, 1]
        After every evaluation without improvement the best parameters so far are
        restored and the learning rate is multiplied by this (reduce on plateau; 1
        keeps it constant). Measured on MiniLM at ratio 10: at a constant 3e-3 the
        held-out loss stopped improving after 40 steps.
    seq_len : int >= 4, optional
        Cut the calibration windows into pieces of this many tokens (e.g. 32 for a
        sentence encoder used on short sentences); default: the windows as they are.
    frame : bool
        Frame every window as the model sees its inputs: ``[CLS] ... [SEP]`` for
        encoders, BOS first for decoders (when the tokenizer has those tokens; the
        window is shortened to keep its length). Calibration windows are cut from
        raw text without special tokens.
    loss : {"auto", "hidden", "logits"}
        ``auto``: ``hidden`` (relative MSE of the last hidden states) for encoders,
        ``logits`` (KL divergence of the next-token distributions) for decoders.
    progress : bool
        tqdm bar on stderr.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1, le=100_000)
    lr: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(4, ge=1, le=1024)
    holdout: float = Field(0.125, gt=0, lt=1)
    eval_every: int = Field(20, ge=1)
    patience: int = Field(3, ge=1)
    lr_decay: float = Field(0.5, gt=0, le=1)
    seq_len: int | None = Field(None, ge=4)
    frame: bool = True
    loss: Literal["auto", "hidden", "logits"] = "auto"
    progress: bool = True


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

    row_weighting: Literal["frequency", "none"] = "frequency"
    weight_exponent: float = Field(1.0, ge=0, le=2)
    keep_top_k: int = Field(0, ge=0)
    refine: RefineConfig | None = None

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
    from optimum_lowrank.layers.hybrid import frequency_slots
    from optimum_lowrank.passes.embedding_training import check_embedding_table
    from optimum_lowrank.vocab import row_weights

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


def weighted_svd(rows: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``D E`` with ``D = diag(sqrt(weights))``: the basis of the weighted low-rank fit.

    Minimising ``sum_p w_p ||e_p - a_p B||^2`` over rank-r ``A B`` is the truncated
    SVD of ``D E``; its right singular vectors ``V_r`` give ``B = V_r`` and the rows'
    least-squares codes ``A = E V_r^T`` (= ``D^-1 U_r S_r``).

    Parameters
    ----------
    rows : Tensor, shape (V, d)
    weights : Tensor, shape (V,), positive, or None (plain SVD)

    Returns
    -------
    u (V, q), s (q,), vh (q, d) with q = min(V, d), of ``D E``.
    """
    matrix = rows.float() if weights is None else rows.float() * weights.sqrt().unsqueeze(1)
    return torch.linalg.svd(matrix, full_matrices=False)


def weighted_factors(rows: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``A = E V_r^T S_r^-1/2`` (V, r) and ``B = S_r^1/2 V_r`` (r, d) from :func:`weighted_svd`.

    ``A B = E V_r^T V_r`` (every row projected on the weighted basis). With uniform
    weights of mean 1 this is :func:`~optimum_lowrank.layers.lowrank.split_factors`:
    the singular values are split between the factors, which keeps both in a
    similar range for int8.
    """
    root = s[:rank].clamp_min(torch.finfo(s.dtype).tiny).sqrt()
    return (rows.float() @ vh[:rank].t()) / root, root[:, None] * vh[:rank]


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
    action: str = "replaced",
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
    action : str

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
    from optimum_lowrank.layers.hybrid import HybridEmbedding, HybridHead
    from optimum_lowrank.passes.embedding_training import install_embedding, reconstruction_metrics
    from optimum_lowrank.passes.svd import tied_output_head
    from optimum_lowrank.vocab import usage_report

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
        job.name, "Embedding", action, job.table.numel(), after + index_params, rank, "; ".join(filter(None, notes)), out
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


class _Original(nn.Module):
    """The original model, seen through ``model`` with the original modules swapped back in for each call."""

    def __init__(self, model: nn.Module, originals: dict[str, nn.Module]):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a child: no parameters of its own
        object.__setattr__(self, "_originals", originals)

    def forward(self, **inputs):
        with _swapped(self._model, self._originals):
            return self._model(**inputs)


@contextmanager
def _swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    current = {name: model.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            model.set_submodule(name, module)
        yield
    finally:
        for name, module in current.items():
            model.set_submodule(name, module)


def refinement_windows(ids: Tensor, tokenizer, kind: str, config: RefineConfig) -> Tensor:
    """The calibration windows (N, L) as refinement inputs: cut to ``config.seq_len``, framed (see :class:`RefineConfig`)."""
    if config.seq_len is not None and config.seq_len < ids.shape[1]:
        pieces = ids.shape[1] // config.seq_len
        ids = ids[:, : pieces * config.seq_len].reshape(-1, config.seq_len)
    if not config.frame or tokenizer is None:
        return ids
    cls, sep, bos = (getattr(tokenizer, name, None) for name in ("cls_token_id", "sep_token_id", "bos_token_id"))
    column = lambda token: torch.full((ids.shape[0], 1), token, dtype=ids.dtype)  # noqa: E731
    if kind == "encoder" and cls is not None and sep is not None:
        return torch.cat([column(cls), ids[:, : ids.shape[1] - 2], column(sep)], dim=1)
    if kind == "decoder" and bos is not None and not bool((ids[:, 0] == bos).all()):
        return torch.cat([column(bos), ids[:, : ids.shape[1] - 1]], dim=1)
    return ids


def refine_embedding(
    model: nn.Module,
    layer: nn.Module,
    originals: dict[str, nn.Module],
    context: PassContext,
    config: RefineConfig,
    desc: str = "refine",
) -> dict[str, float]:
    """Train only ``layer``'s parameters so that ``model`` reproduces the original's outputs.

    The teacher is ``model`` with ``originals`` (the original embedding and tied
    head, by qualified name) swapped back in for each forward, so no second copy
    of the model is held. The calibration windows are split: the last
    ``holdout`` share (at least one window) is held back; every ``eval_every``
    steps the mean loss on it is measured, the best parameters are kept; after an
    evaluation without improvement the best parameters are restored and the
    learning rate is multiplied by ``lr_decay``; training stops after ``patience``
    of those in a row. Adam;
    dropout off; every other parameter frozen.

    Parameters
    ----------
    model : nn.Module
        The compressed model (``layer`` installed); modified in place.
    layer : nn.Module
        The compressed embedding (its tied head shares its parameters).
    originals : dict, name -> nn.Module
    context : PassContext
        Supplies ``kind`` and ``calibration_ids`` (num_windows, seq_len).
    config : RefineConfig
    desc : str

    Returns
    -------
    dict of float: ``refine_steps``, ``refine_seconds``, ``refine_loss_before`` and
    ``refine_loss_after`` (held-out loss of the initial and the kept parameters),
    ``refine_train_windows``, ``refine_holdout_windows``.

    Raises
    ------
    DataError
        If the calibration text gives fewer than 2 windows.
    PassError
        If the loss becomes NaN/inf (the parameters are restored first) or the loss
        does not fit the model kind.
    """
    from optimum_lowrank.finetune import load_values, make_loss

    ids = refinement_windows(context.calibration_ids, context.tokenizer, context.kind, config)
    if ids.shape[0] < 2:
        raise DataError(f"refinement needs at least 2 calibration windows (one held back), got {ids.shape[0]}; raise calibration.num_samples")
    n_hold = max(1, round(config.holdout * ids.shape[0]))
    train, held = ids[:-n_hold], ids[-n_hold:]
    loss_name = config.loss if config.loss != "auto" else ("logits" if context.kind == "decoder" else "hidden")
    loss_fn = make_loss(model, context.kind, loss_name, reference_model=_Original(model, originals))
    params = [p for p in layer.parameters()]
    initial = [p.detach().clone() for p in params]
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    batch = min(config.batch_size, train.shape[0])

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_fn(held[i : i + batch])) * held[i : i + batch].shape[0] for i in range(0, held.shape[0], batch)) / held.shape[0]

    model.eval()
    start = time.perf_counter()
    steps = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        best = before = held_loss()
        best_state = [p.detach().clone() for p in params]
        optimizer = torch.optim.Adam(params, lr=config.lr)
        generator = torch.Generator().manual_seed(context.seed)
        order, cursor, stale = torch.randperm(train.shape[0], generator=generator), 0, 0
        bar = _progress(config.steps, desc, config.progress)
        try:
            for step in range(1, config.steps + 1):
                if cursor + batch > train.shape[0]:
                    order, cursor = torch.randperm(train.shape[0], generator=generator), 0
                loss = loss_fn(train[order[cursor : cursor + batch]])
                cursor += batch
                if not torch.isfinite(loss):
                    raise PassError(f"{desc}: non-finite loss at step {step}; the compressed embedding was restored")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps = step
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4g}", best=f"{best:.4g}")
                if step % config.eval_every == 0 or step == config.steps:
                    current = held_loss()
                    if current < best:
                        best, stale = current, 0
                        best_state = [p.detach().clone() for p in params]
                    else:
                        stale += 1
                        if stale >= config.patience:
                            break
                        load_values(params, best_state)  # back to the best state, at a lower learning rate
                        for group in optimizer.param_groups:
                            group["lr"] *= config.lr_decay
        finally:
            if bar is not None:
                bar.close()
        load_values(params, best_state)
    except BaseException:
        load_values(params, initial)
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {
        "refine_steps": float(steps),
        "refine_seconds": time.perf_counter() - start,
        "refine_loss_before": before,
        "refine_loss_after": best,
        "refine_train_windows": float(train.shape[0]),
        "refine_holdout_windows": float(n_hold),
    }


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)

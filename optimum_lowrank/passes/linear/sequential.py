"""Sequential (error-aware) calibration of ``activation_svd``: compress block by block, through the compressed blocks.

The plain pass whitens every layer with statistics of the *original* model. Here the
model is compressed one transformer block at a time (as GPTQ [2]_ and SVD-LLM's
sequential update [1]_ do): the calibration windows are run block by block
(:mod:`optimum_lowrank.blocks`), and a layer of block ``i`` is calibrated on its inputs
``X_s`` *through the already compressed blocks and layers before it*, next to its
inputs ``X_o`` in the original model. Within a block the targets are compressed in
forward order, in groups of layers that read the same tensor (Llama: q/k/v, o, gate/up,
down), so ``down_proj`` also sees the error of the block's compressed ``gate``/``up``.

Per layer, with ``G = X_s^T X_s / N``, ``C = X_o^T X_s / N``:

- ``refit: false`` — SVD-LLM on the sequential inputs: whitened truncation of ``W``
  with the Cholesky factor of ``G`` (minimises ``||(W - M) X_s^T||``);
- ``refit: true`` (default with ``sequential``) — truncation-aware refit
  (:mod:`optimum_lowrank.linalg.refit`): whitened truncation of the corrected weight
  ``W' = W (C + lam I)(G + lam I)^{-1}``, the rank-r optimum of
  ``||W X_o^T - M X_s^T||`` (the layer reproduces the original's output from the
  inputs it now gets). Both candidates are computed; the one with the smaller
  measured error ``||W X_o^T - M X_s^T|| / ||W X_o^T||`` is kept (the report's
  ``relative_output_error``; the plain one is ``truncation_output_error``), so the
  refit never increases the calibration output error over plain truncation.

Ranks are fixed before the loop, by the pass's rank option (e.g. the global Fisher
budget) on the original model's statistics; the loop only changes the factors.

Memory: the calibration windows' hidden states twice (sequential and original:
``2 * num_samples * seq_len * hidden_size`` floats), a copy of the current block's
original weights, and the statistics of one group of layers (three ``in x in`` float64
matrices). The rank choice before it holds the plain pass's statistics.

Bad input: a model whose blocks cannot be found (:func:`~optimum_lowrank.blocks.find_blocks`
names its class), targets outside the blocks, a failed refit: :class:`PassError`.
On any error every layer already replaced is put back, so the model is as it was.

References
----------
.. [1] SVD-LLM, arXiv 2403.07378, and .. [2] GPTQ, arXiv 2210.17323: cited in full in
   :mod:`optimum_lowrank.linalg.refit`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from optimum_lowrank.blocks import BlockInput, capture_block_inputs, find_blocks, run_block
from optimum_lowrank.errors import PassError
from optimum_lowrank.layers.lowrank import linear_weight
from optimum_lowrank.linalg.refit import CrossStatistics, output_error, refit_weight
from optimum_lowrank.linalg.whitening import InputStatistics, InputTransform, WhitenedSVD, whitened_svd
from optimum_lowrank.progress import bar
from optimum_lowrank.report import LayerReport

__all__ = ["block_groups", "group_statistics", "sequential_factorize"]

Replace = Callable[[nn.Module, str, nn.Module, WhitenedSVD, int], LayerReport]


class _Stop(Exception):
    """Raised by a capture hook once the layer's input is recorded (the rest of the block is not needed)."""


def _capture(module: nn.Module, block: nn.Module, item: BlockInput) -> Tensor:
    """Run ``block`` on ``item`` until ``module`` is called; return ``module``'s first input."""
    seen: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            block(*item.args, **item.kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise PassError(f"a {type(module).__name__} target never ran inside its block")
    return seen[0]


def block_groups(block: nn.Module, prefix: str, names: Sequence[str], item: BlockInput) -> list[list[str]]:
    """The targets of one block in forward order, grouped by the input tensor they read.

    Parameters
    ----------
    block : nn.Module
    prefix : str
        The block's qualified name, e.g. ``"model.layers.3"``.
    names : sequence of str
        Qualified names of the targets inside ``block``.
    item : BlockInput
        One batch of the block's inputs (the block runs once on it).

    Returns
    -------
    list of list of str
        E.g. ``[[q, k, v], [o], [gate, up], [down]]`` for a Llama block.

    Raises
    ------
    PassError
        If a target did not run.
    """
    order: list[tuple[str, Tensor]] = []
    handles = []
    for name in names:
        module = block.get_submodule(name[len(prefix) + 1 :])
        handles.append(module.register_forward_pre_hook(lambda _m, args, name=name: order.append((name, args[0])) and None))
    try:
        with torch.no_grad():
            block(*item.args, **item.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    last = None
    for name, x in order:
        if any(name in g for g in groups):
            continue
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    missing = [n for n in names if not any(n in g for g in groups)]
    if missing:
        raise PassError(f"target(s) never ran inside their block: {', '.join(missing[:5])}")
    return groups


def group_statistics(
    block: nn.Module, original: nn.Module, relative: str, sequential: Sequence[BlockInput], originals: Sequence[BlockInput]
) -> CrossStatistics:
    """Sequential and original input statistics of the layer ``relative`` (a name inside the block).

    ``block`` (possibly partly compressed) runs on the ``sequential`` inputs, ``original``
    (the block's unmodified copy) on the ``originals``; each stops once the layer's input is recorded.
    """
    current, reference = block.get_submodule(relative), original.get_submodule(relative)
    stats: CrossStatistics | None = None
    for seq_item, orig_item in zip(sequential, originals, strict=True):
        xs = _capture(current, block, seq_item)
        xo = _capture(reference, original, orig_item)
        if stats is None:
            stats = CrossStatistics(xs.shape[-1])
        stats.update(xs, xo)
    assert stats is not None
    return stats


def _factorize(
    model: nn.Module, name: str, module: nn.Module, stats: CrossStatistics, rank: int, *,
    transform: Callable[[InputStatistics], InputTransform], replace: Replace, refit: bool, refit_damping: float,
) -> LayerReport:
    weight, _ = linear_weight(module)
    gram, cross, gram_original = stats.normalized()
    plain_stats = InputStatistics(stats.in_features, count=stats.count, gram=stats.gram)
    try:
        plain = whitened_svd(weight, transform(plain_stats))
        errors = {"plain": output_error(weight, plain.u[:, :rank] @ (plain.s[:rank, None].float() * plain.v[:rank]), gram, cross, gram_original)}
        chosen, kept = plain, "plain"
        refit_damping_used = 0.0
        if refit:
            corrected = refit_weight(weight, gram, cross, refit_damping)
            fitted = whitened_svd(corrected.weight, InputTransform("cholesky", lower=corrected.lower, damping=corrected.damping))
            errors["refit"] = output_error(weight, fitted.u[:, :rank] @ (fitted.s[:rank, None].float() * fitted.v[:rank]), gram, cross, gram_original)
            refit_damping_used = corrected.damping
            if errors["refit"] <= errors["plain"]:
                chosen, kept = fitted, "refit"
    except PassError as err:
        raise PassError(f"{name}: {err}") from None
    report = replace(model, name, module, chosen, rank)
    if report.action == "factorized":
        report.metrics.update(
            relative_output_error=errors[kept], truncation_output_error=errors["plain"], refit=float(kept == "refit"), refit_damping=refit_damping_used
        )
        if refit and kept == "plain":
            report.note = "; ".join(filter(None, [report.note, f"refit error {errors['refit']:.4g} > truncation {errors['plain']:.4g}: kept the truncation"]))
    return report


def sequential_factorize(
    model: nn.Module,
    targets: dict[str, nn.Module],
    calibration_ids: Tensor,
    ranks: dict[str, int],
    *,
    kind: Literal["encoder", "decoder"],
    transform: Callable[[InputStatistics], InputTransform],
    replace: Replace,
    factorizes: Callable[[tuple[int, int], int], bool],
    refit: bool = True,
    refit_damping: float = 0.01,
    batch_size: int = 1,
    progress: bool = False,
) -> list[LayerReport]:
    """Factorize ``targets`` block by block on inputs through the already compressed blocks.

    Parameters
    ----------
    model : nn.Module
        Modified in place; restored on error.
    targets : dict name -> module
        All inside the model's transformer blocks.
    calibration_ids : LongTensor, shape (num_samples, seq_len)
    ranks : dict name -> int
        Fixed ranks (e.g. the global budget's, from the original model's statistics).
    kind : {"encoder", "decoder"}
    transform : callable InputStatistics -> InputTransform
        The plain whitening (the pass's Cholesky with its damping).
    replace : callable (model, name, module, decomposition, rank) -> LayerReport
        Installs the factors (or skips the layer) and reports.
    factorizes : callable ((out, in), rank) -> bool
        False: the layer stays dense (it is reported by ``replace`` without statistics).
    refit : bool
        Truncation-aware refit against the original inputs (module docstring).
    refit_damping : float, > 0
        Relative ridge of the refit (:func:`~optimum_lowrank.linalg.refit.refit_weight`).
    batch_size : int, >= 1
    progress : bool
        A bar over the blocks on stderr.

    Returns
    -------
    list of LayerReport, in the order of ``targets``.

    Raises
    ------
    PassError
        Blocks not found (names the model class), a target outside the blocks, a failed
        decomposition or refit (names the layer). The model is restored first.
    DataError
        Malformed ``calibration_ids``.
    """
    stack = find_blocks(model)
    prefixes = stack.names()
    per_block: dict[int, list[str]] = {}
    outside = []
    for name in targets:
        index = next((i for i, p in enumerate(prefixes) if name.startswith(p + ".")), None)
        if index is None:
            outside.append(name)
        else:
            per_block.setdefault(index, []).append(name)
    if outside:
        raise PassError(
            f"sequential calibration compresses layers inside the blocks of {type(model).__name__} ({stack.path}.N); "
            f"{len(outside)} target(s) lie outside: {', '.join(outside[:5])}"
        )
    reports: dict[str, LayerReport] = {}
    replaced: dict[str, nn.Module] = {}
    try:
        sequential = capture_block_inputs(model, stack, calibration_ids, kind=kind, batch_size=batch_size)
        originals = list(sequential)
        last = max(per_block)
        for i in bar(range(last + 1), desc="sequential calibration", unit="block", enabled=progress):
            block = stack.blocks[i]
            original = copy.deepcopy(block)
            for group in block_groups(block, prefixes[i], per_block.get(i, []), originals[0]) if i in per_block else []:
                todo = [n for n in group if factorizes(tuple(linear_weight(targets[n])[0].shape), ranks[n])]
                stats = group_statistics(block, original, todo[0][len(prefixes[i]) + 1 :], sequential, originals) if todo else None
                for name in group:
                    replaced[name] = targets[name]
                    if stats is None or name not in todo:
                        reports[name] = replace(model, name, targets[name], None, ranks[name])
                    else:
                        reports[name] = _factorize(model, name, targets[name], stats, ranks[name], transform=transform, replace=replace,
                                                   refit=refit, refit_damping=refit_damping)
                del stats
            if i < last:
                sequential = run_block(block, sequential)
                originals = run_block(original, originals)
            del original
    except BaseException:
        for name, module in replaced.items():
            model.set_submodule(name, module)
        raise
    return [reports[name] for name in targets]

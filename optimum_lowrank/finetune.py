"""A short fine-tune of a compressed model on its calibration windows, to recover accuracy after a low-rank pass.

Losses (``loss``)
-----------------
``auto`` (default)
    ``lm`` for decoders, ``hidden`` for encoders.
``lm``
    Next-token cross-entropy of a causal LM on the windows (``labels = input_ids``).
``hidden``
    Distillation: ``mean((h - h_ref)^2) / mean(h_ref^2)`` between the last hidden states
    of the model and of ``reference_model`` (the uncompressed original), all positions.
``logits``
    Distillation for decoders: ``KL(p_ref || p)`` of the next-token distributions
    (mean over positions, nats), needs ``reference_model``.

Training choices (all options of :func:`finetune`): AdamW (betas 0.9/0.999, weight
decay 0), linear warm-up over the first 10% of the steps then cosine decay to 0,
gradients clipped at norm 1, dropout off (the model stays in eval mode: with a
few hundred steps on a few thousand tokens, dropout only adds noise), windows
drawn in a fixed random order (``seed``) and re-shuffled each epoch. By default
only the low-rank factors are trained (:class:`~optimum_lowrank.layers.LowRankLinear`
``down``/``up`` and :class:`~optimum_lowrank.layers.LowRankEmbedding` ``codes``/``proj``,
biases included); ``train="all"`` trains every parameter.

Budget: ``steps`` optimizer steps, or ``max_minutes`` of this process's CPU time
(user + system, all threads; on a shared machine wall time would count the other
users' work), or both (whichever ends first). With ``max_minutes`` the schedule runs on
the fraction of the budget spent, ``max(step / steps, cpu / budget)``, so warm-up and
cosine decay fit the time; a step that starts before the budget is spent finishes.
The progress bar shows the running loss (exponential average, 0.9) and the CPU minutes.

A non-finite loss stops training, restores the parameters as they were before
the fine-tune and raises :class:`~optimum_lowrank.errors.PassError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.progress import bar

__all__ = ["LOSSES", "finetune", "fresh_windows", "load_values", "lowrank_parameters", "make_loss", "next_token_kl"]

LOSSES = ("auto", "lm", "hidden", "logits")


@torch.no_grad()
def load_values(params: list[nn.Parameter], values: list[Tensor]) -> None:
    """Copy saved ``values`` back into ``params`` (same order and shapes), without autograd."""
    for p, value in zip(params, values, strict=True):
        p.copy_(value)


def lowrank_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the low-rank layers of ``model`` (LowRankLinear, LowRankEmbedding), each once."""
    from optimum_lowrank.layers.lowrank import LowRankEmbedding, LowRankLinear

    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (LowRankLinear, LowRankEmbedding)):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def next_token_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """``KL(p_ref || p)`` of the next-token distributions, mean over positions (nats); both ``(..., vocab)``,
    ``ref_logits`` without gradient. The ``logits`` loss here and ``structured_prune`` on decoders use it."""
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    out = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(out.flatten(0, -2), ref.flatten(0, -2), log_target=True, reduction="batchmean")


def _hidden(output: Any) -> Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = getattr(output, "hidden_states", None)
        hidden = hidden[-1] if hidden is not None else output[0]
    return hidden


def _forward(model: nn.Module, ids: Tensor, kind: str, **extra: Any) -> Any:
    if kind == "decoder":
        return model(input_ids=ids, use_cache=False, **extra)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)


def make_loss(
    model: nn.Module,
    kind: Literal["encoder", "decoder"],
    loss: str = "auto",
    reference_model: nn.Module | None = None,
) -> Callable[[Tensor], Tensor]:
    """The training loss of ``model`` on one batch of windows, as a function ``ids -> scalar``.

    Parameters
    ----------
    model : nn.Module
    kind : {"encoder", "decoder"}
    loss : {"auto", "lm", "hidden", "logits"}
        See the module docstring.
    reference_model : nn.Module, optional
        The original model; required by ``hidden`` and ``logits`` (run without gradients).

    Returns
    -------
    callable (LongTensor (batch, seq_len) -> scalar Tensor)

    Raises
    ------
    PassError
        If the loss does not fit ``kind`` or needs a missing ``reference_model``.
    """
    if loss not in LOSSES:
        raise PassError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
    if loss == "auto":
        loss = "lm" if kind == "decoder" else "hidden"
    if loss in ("lm", "logits") and kind != "decoder":
        raise PassError(f"loss {loss!r} needs a decoder (causal LM); use 'hidden' for encoders")
    if loss in ("hidden", "logits") and reference_model is None:
        raise PassError(f"loss {loss!r} distils from the original model: pass reference_model")
    if reference_model is not None:
        reference_model.eval()

    if loss == "lm":
        def lm(ids: Tensor) -> Tensor:
            return _forward(model, ids, kind, labels=ids).loss
        return lm

    if loss == "logits":
        def logits_kl(ids: Tensor) -> Tensor:
            with torch.no_grad():
                ref = _forward(reference_model, ids, kind).logits
            return next_token_kl(_forward(model, ids, kind).logits, ref)
        return logits_kl

    base = getattr(model, "base_model", model) if kind == "decoder" else model
    ref_base = getattr(reference_model, "base_model", reference_model) if kind == "decoder" else reference_model

    def hidden(ids: Tensor) -> Tensor:
        with torch.no_grad():
            ref = _hidden(_forward(ref_base, ids, kind)).float()
        out = _hidden(_forward(base, ids, kind)).float()
        return (out - ref).square().mean() / ref.square().mean().clamp_min(1e-12)
    return hidden


def fresh_windows(tokenizer: Any, text: str, seq_len: int, skip: int, num_samples: int) -> Tensor:
    """``num_samples`` windows of ``seq_len`` tokens cut from ``text`` after its first ``skip`` windows.

    For fine-tuning on text the calibration did not use: the calibration takes the
    first ``skip`` windows of the same text (:func:`~optimum_lowrank.data.token_windows`),
    these are the next ones.

    Returns
    -------
    LongTensor, shape (num_samples, seq_len)

    Raises
    ------
    DataError
        If the text gives fewer than ``skip + num_samples`` windows (the message says how many).
    """
    from optimum_lowrank.data import token_windows

    try:
        windows = token_windows(tokenizer, text, seq_len, skip + num_samples, strict=True)
    except DataError as err:
        raise DataError(f"fine-tune num_samples={num_samples} needs {num_samples} windows after the {skip} calibration windows: {err}") from None
    return windows[skip:]


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _schedule_fraction(fraction: float, warmup_ratio: float) -> float:
    """Learning-rate factor at ``fraction`` of the budget spent: linear warm-up, then cosine to 0."""
    if fraction < warmup_ratio:
        return max(fraction / warmup_ratio, 1e-3)
    progress = (fraction - warmup_ratio) / max(1e-12, 1 - warmup_ratio)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _mean_loss(loss_fn: Callable[[Tensor], Tensor], batches: list[Tensor]) -> float:
    with torch.no_grad():
        return float(sum(float(loss_fn(ids)) for ids in batches) / len(batches))


def finetune(
    model: nn.Module,
    calibration_ids: Tensor,
    *,
    kind: Literal["encoder", "decoder"],
    steps: int | None = None,
    lr: float = 1e-4,
    reference_model: nn.Module | None = None,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 1,
    train: Literal["lowrank", "all"] = "lowrank",
    loss: str = "auto",
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.1,
    max_grad_norm: float = 1.0,
    eval_samples: int = 4,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place for ``steps`` optimizer steps or ``max_minutes`` of CPU time.

    Parameters
    ----------
    model : nn.Module
        The compressed model (modified in place; left in eval mode with its ``requires_grad``
        flags as they were).
    calibration_ids : LongTensor, shape (num_samples, seq_len)
        Training windows (e.g. ``PassContext.calibration_ids``).
    kind : {"encoder", "decoder"}
    steps : int, >= 1, optional
        Optimizer steps (each on ``batch_size`` windows); at least one of ``steps`` and
        ``max_minutes`` is given.
    lr : float, > 0
        Peak learning rate (typical: 1e-4 for the factors of a 135M decoder).
    reference_model : nn.Module, optional
        The uncompressed original; required for encoders (distillation) and ``loss="logits"``.
    seed : int
        Order of the windows.
    progress : bool
        A tqdm bar on stderr over the steps, with the running loss.
    batch_size : int, >= 1
    train : {"lowrank", "all"}
        Only the low-rank factors (default) or every parameter.
    loss : {"auto", "lm", "hidden", "logits"}
        See the module docstring.
    weight_decay : float, >= 0
    warmup_ratio : float in [0, 1)
        Fraction of the steps with a linear warm-up.
    max_grad_norm : float, > 0
        Gradient clipping (total norm).
    eval_samples : int, >= 1
        The first ``eval_samples`` windows measure the loss before and after (no gradients).
    max_minutes : float, > 0, optional
        CPU-time budget of the training loop (module docstring); the evaluations before and
        after are not counted.

    Returns
    -------
    dict
        ``loss_before``, ``loss_after`` (mean loss on the evaluation windows, the training
        loss's unit: nats per token for ``lm``), ``loss`` (the loss used), ``steps`` (taken),
        ``stopped_by`` (``"steps"`` or ``"max_minutes"``), ``trained_parameters`` (count),
        ``seconds`` (wall), ``cpu_seconds`` (training loop), ``tokens`` (seen in training).

    Raises
    ------
    ValueError
        If ``steps``, ``max_minutes`` (<= 0), ``lr``, ``batch_size`` or ``warmup_ratio`` is out
        of range, or neither ``steps`` nor ``max_minutes`` is given.
    DataError
        If ``calibration_ids`` is not a non-empty (num_samples, seq_len) integer tensor.
    PassError
        If there is nothing to train, the loss does not fit the model, or the loss
        becomes NaN/inf (the parameters are restored first).
    """
    if steps is None and max_minutes is None:
        raise ValueError("finetune needs steps or max_minutes (or both)")
    if max_minutes is not None and not (max_minutes > 0 and math.isfinite(max_minutes)):
        raise ValueError(f"max_minutes must be a finite number > 0, got {max_minutes}")
    if (steps is not None and steps < 1) or lr <= 0 or batch_size < 1 or not 0 <= warmup_ratio < 1 or eval_samples < 1:
        raise ValueError(f"need steps >= 1, lr > 0, batch_size >= 1, 0 <= warmup_ratio < 1, eval_samples >= 1; got {steps}, {lr}, {batch_size}, {warmup_ratio}, {eval_samples}")
    if calibration_ids.ndim != 2 or calibration_ids.numel() == 0 or calibration_ids.is_floating_point():
        raise DataError(f"calibration ids must be a non-empty (num_samples, seq_len) integer tensor, got shape {tuple(calibration_ids.shape)}")
    if train == "lowrank":
        params = lowrank_parameters(model)
        if not params:
            raise PassError("the model has no low-rank layers to fine-tune; run a low-rank pass first or use train='all'")
    elif train == "all":
        params = [p for p in model.parameters()]
    else:
        raise PassError(f"unknown train {train!r}; allowed: lowrank, all")
    loss_fn = make_loss(model, kind, loss, reference_model)
    resolved = loss if loss != "auto" else ("lm" if kind == "decoder" else "hidden")

    snapshot = [p.detach().clone() for p in params]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    n = calibration_ids.shape[0]
    eval_batches = [calibration_ids[i : i + batch_size] for i in range(0, min(eval_samples, n), batch_size)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    limit = steps if steps is not None else 10**9
    budget = max_minutes * 60 if max_minutes is not None else math.inf
    warmup = int(warmup_ratio * steps) if steps is not None else 0
    t0 = time.perf_counter()
    order: list[int] = []
    steps_bar = bar(total=steps, desc="finetune", unit="step", enabled=progress)
    taken, running, stopped_by, cpu = 0, None, "steps", 0.0
    try:
        before = _mean_loss(loss_fn, eval_batches)
        cpu0 = time.process_time()
        for step in range(limit):
            cpu = time.process_time() - cpu0
            if cpu >= budget:
                stopped_by = "max_minutes"
                break
            if len(order) < batch_size:
                order += torch.randperm(n, generator=generator).tolist()
            batch, order = order[:batch_size], order[batch_size:]
            if max_minutes is None:
                factor = _schedule(step, steps, warmup)
            else:
                factor = _schedule_fraction(max(step / steps if steps else 0.0, cpu / budget), warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            value = loss_fn(calibration_ids[batch])
            if not torch.isfinite(value):
                raise PassError(f"fine-tune loss became {float(value.detach())} at step {step + 1} (lr {lr:g}); parameters restored")
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            taken += 1
            running = float(value.detach()) if running is None else 0.9 * running + 0.1 * float(value.detach())
            if not steps_bar.disable:
                steps_bar.set_postfix(loss=f"{running:.4f}", cpu=f"{cpu / 60:.1f}m", refresh=False)
            steps_bar.update(1)
        cpu = time.process_time() - cpu0
        after = _mean_loss(loss_fn, eval_batches)
        if not math.isfinite(after):
            raise PassError(f"fine-tune loss after training is {after}; parameters restored")
    except BaseException:
        load_values(params, snapshot)
        raise
    finally:
        steps_bar.close()
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.eval()
    return {
        "loss": resolved,
        "loss_before": before,
        "loss_after": after,
        "steps": taken,
        "stopped_by": stopped_by,
        "max_minutes": max_minutes,
        "lr": lr,
        "batch_size": batch_size,
        "train": train,
        "trained_parameters": sum(p.numel() for p in params),
        "tokens": taken * batch_size * calibration_ids.shape[1],
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": cpu,
    }

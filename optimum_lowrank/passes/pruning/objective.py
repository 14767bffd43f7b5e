"""The training objective shared by the pruning passes: task loss plus distillation.

Two settings, chosen by what the model and the config provide:

- **task** (a ``...ForSequenceClassification`` model and a labelled TSV): cross-entropy
  on the labels mixed with the KL divergence to the unpruned model's logits at
  temperature ``T`` (CoFi's prediction-layer distillation), optionally plus an MSE
  between the student's and the teacher's hidden states layer by layer;
- **distillation** (a bare encoder, or no labels): the MSE between the student's and
  the teacher's mean-pooled last hidden states (and optionally every layer's), on
  the texts of ``data`` or, without data, on the pipeline's calibration windows;
- **decoders** (a causal LM, distillation only): ``KL(p_teacher || p_student)`` of the
  next-token distributions at every position
  (:func:`optimum_lowrank.finetune.next_token_kl`, the fine-tune's ``logits`` loss),
  optionally plus the layer-wise hidden-state MSE, on ``max_length``-token windows cut
  from the plain text file ``data`` or on the calibration windows.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from optimum_lowrank.api import PassContext
from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.evaluation.base import hidden_state, mean_pool
from optimum_lowrank.exporters.onnx import is_causal_lm
from optimum_lowrank.finetune import next_token_kl
from optimum_lowrank.progress import bar
from optimum_lowrank.tasks import LabelledData, check_num_labels, encode_batches, load_labelled_tsv

__all__ = ["NonFiniteLossError", "TaskObjective", "TrainingOptions", "check_finite", "finetune_weights", "warmup_schedule"]


class NonFiniteLossError(PassError):
    """The training loss became NaN or infinite; the caller's model was left as it was."""


class TrainingOptions(BaseModel):
    """Options shared by ``structured_prune`` and ``token_downsampling`` (recipe keys).

    Attributes
    ----------
    data : str or None
        Encoders: a labelled TSV with a header (see :func:`optimum_lowrank.tasks.load_labelled_tsv`),
        e.g. SST-2 ``train.tsv``. Decoders: a plain text file, cut into ``max_length``-token
        windows. None: distil on the calibration windows.
    max_examples : int >= 1 or None
        Read only the first ``max_examples`` rows of ``data`` (decoders: windows).
    steps : int >= 1
        Optimisation steps.
    batch_size : int >= 1
    lr : float > 0
        Learning rate of the model's weights (AdamW, weight decay 0.01, 10% warm-up).
    max_length : int, 8..512
        Tokens per example.
    objective : {"auto", "task", "distill"}
        ``auto``: ``task`` when the model has a classification head and ``data`` is
        given, else ``distill``.
    distill_temperature : float > 0
    distill_alpha : float in [0, 1]
        Weight of the logit KL against the task cross-entropy (task objective).
    distill_hidden : float >= 0
        Weight of the layer-wise hidden-state MSE to the teacher (0: off).
    anti_windup : bool
        Reset the first Lagrange multiplier when the constrained quantity crosses its target
        (see :class:`~optimum_lowrank.passes.pruning.hard_concrete.Lagrangian`).
    seed : int
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str | None = Field(None, description=(
        "Encoders: a labelled TSV with a header (see `load_labelled_tsv`), e.g. SST-2 `train.tsv`. Decoders: a plain "
        "text file, cut into `max_length`-token windows. None: distil on the calibration windows."
    ))
    max_examples: int | None = Field(None, ge=1, description="Read only the first `max_examples` rows of `data` (decoders: windows).")
    steps: int = Field(200, ge=1, le=1_000_000, description="Optimisation steps.")
    batch_size: int = Field(32, ge=1, le=4096, description="Examples per optimisation step.")
    lr: float = Field(3e-5, gt=0, le=1, description="Learning rate of the model's weights (AdamW, weight decay 0.01, 10% warm-up).")
    max_length: int = Field(64, ge=8, le=512, description="Tokens per example.")
    objective: Literal["auto", "task", "distill"] = Field("auto", description=(
        "`auto`: `task` when the model has a classification head and `data` is given, else `distill` (decoders: "
        "always `distill`, the next-token KL to the unpruned model)."))
    distill_temperature: float = Field(2.0, gt=0, description="Softmax temperature of the logit distillation.")
    distill_alpha: float = Field(0.5, ge=0, le=1, description="Weight of the logit KL against the task cross-entropy (task objective).")
    distill_hidden: float = Field(0.0, ge=0, description="Weight of the layer-wise hidden-state MSE to the teacher (0: off).")
    anti_windup: bool = Field(True, description=(
        "Reset the first Lagrange multiplier (and its optimizer state) when the constrained quantity (expected "
        "sparsity, kept-token fraction) crosses its target, so a short training ends near the target instead of past it."))
    seed: int = Field(0, description="Seed of the example order and of the stochastic parts of training.")


class TaskObjective:
    """Batches and the loss of :class:`TrainingOptions` for ``model``.

    Parameters
    ----------
    model : nn.Module
        The model to train (a BERT-like encoder, with or without a classification head, or a
        causal LM); a frozen copy is taken as the teacher.
    options : TrainingOptions
    context : PassContext
        Its tokenizer tokenizes ``data``; its calibration windows feed ``distill``
        without data.

    Raises
    ------
    PassError
        ``objective: task`` without a classification head or without ``data``, or no
        tokenizer for ``data``.
    DataError
        A malformed task file, labels that do not fit the head, or a decoder's text too
        short for one window.
    """

    def __init__(self, model: nn.Module, options: TrainingOptions, context: PassContext) -> None:
        self.options = options
        self.decoder = context.kind == "decoder" or is_causal_lm(model)
        has_head = hasattr(model, "classifier") and hasattr(getattr(model, "config", None), "num_labels")
        mode = options.objective
        if mode == "auto":
            mode = "task" if has_head and options.data is not None else "distill"
        if mode == "task" and not has_head:
            raise PassError(f"objective 'task' needs a ...ForSequenceClassification model, got {type(model).__name__}; use objective: distill")
        if mode == "task" and options.data is None:
            raise PassError("objective 'task' needs 'data': a labelled TSV (e.g. sst2/train.tsv)")
        self.mode = mode
        self.has_head = has_head
        self._rng = random.Random(options.seed)
        self._order: list[int] = []
        self.data: LabelledData | None = None
        self._windows: torch.Tensor | None = None
        if options.data is not None:
            if context.tokenizer is None:
                raise PassError("training on 'data' needs the model's tokenizer, but the pipeline gave none")
            if self.decoder:
                self._windows = _text_windows(context.tokenizer, options)
            else:
                self.data = load_labelled_tsv(options.data, max_rows=options.max_examples)
            if has_head and self.data is not None:
                check_num_labels(model, self.data)
            self.tokenizer = context.tokenizer
        else:
            self._windows = context.calibration_ids
        source = (self.data.source if self.data is not None else f"{len(self._windows)} windows of {options.data}"
                  if options.data is not None else f"{len(self._windows)} calibration windows")
        self.description = ("next-token KL distillation" if self.decoder else f"{mode} objective") + f" on {source}"
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def _size(self) -> int:
        return len(self.data) if self.data is not None else len(self._windows)

    def batches(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        """Endless batches ``(inputs, labels or None)`` from a seeded reshuffle per epoch."""
        size = self.options.batch_size
        while True:
            if len(self._order) < size:
                extra = list(range(self._size()))
                self._rng.shuffle(extra)
                self._order.extend(extra)
            idx, self._order = self._order[:size], self._order[size:]
            if self.data is not None:
                part = LabelledData([self.data.texts[i] for i in idx], [self.data.labels[i] for i in idx], self.data.columns, "")
                (inputs, labels, _), = encode_batches(self.tokenizer, part, size, self.options.max_length)
                yield inputs, labels
            else:
                ids = self._windows[idx][:, : self.options.max_length]
                yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None

    def loss(self, student: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
             extra_hidden: bool = True) -> torch.Tensor:
        """The objective's loss on one batch (scalar); ``extra_hidden=False`` skips the layer-wise MSE."""
        opts = self.options
        want_hidden = opts.distill_hidden > 0 and extra_hidden
        extra = {"use_cache": False} if self.decoder else {}
        with torch.no_grad():
            teacher = self.teacher(**inputs, output_hidden_states=want_hidden, **extra)
        out = student(**inputs, output_hidden_states=want_hidden, **extra)
        if self.decoder:
            loss = next_token_kl(out.logits, teacher.logits)
        elif self.mode == "task":
            t = opts.distill_temperature
            ce = F.cross_entropy(out.logits, labels)
            kd = F.kl_div(F.log_softmax(out.logits / t, -1), F.log_softmax(teacher.logits / t, -1),
                          log_target=True, reduction="batchmean") * t * t
            loss = (1 - opts.distill_alpha) * ce + opts.distill_alpha * kd
        else:
            mask = inputs["attention_mask"]
            if self.has_head:  # a classifier without labels: distil its logits
                loss = F.mse_loss(out.logits, teacher.logits)
            else:
                loss = F.mse_loss(mean_pool(hidden_state(out), mask), mean_pool(hidden_state(teacher), mask))
        if want_hidden:
            pairs = list(zip(out.hidden_states[1:], teacher.hidden_states[1:]))
            loss = loss + opts.distill_hidden * sum(F.mse_loss(s, t) for s, t in pairs) / len(pairs)
        return loss


def _text_windows(tokenizer, options: TrainingOptions) -> torch.Tensor:
    """``max_length``-token windows of the plain text file ``options.data`` (at most ``max_examples``)."""
    from pathlib import Path

    from optimum_lowrank.data import token_windows

    path = Path(options.data)
    if not path.is_file():
        raise DataError(f"structured_prune data {options.data!r}: no such file (decoders take a plain text file)")
    windows = token_windows(tokenizer, path.read_text(encoding="utf-8", errors="replace"), options.max_length,
                            options.max_examples or 1_000_000)
    if len(windows) == 0:
        raise DataError(f"structured_prune data {options.data!r}: shorter than one window of {options.max_length} tokens")
    return windows


def check_finite(loss: torch.Tensor, step: int, what: str) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what}: the training loss became {value} at step {step}; "
                                 "training stopped and the model was left as it was (lower lr?)")


def warmup_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup * steps`` steps, then linear decay to 0."""
    warm = max(1, int(warmup * steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))


def lagrangian_step(loss: torch.Tensor, step: int, what: str, optimizers: tuple[torch.optim.Optimizer, ...], lagrangian,
                    weights, schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One step of a constrained objective: check ``loss`` is finite, backpropagate, flip the Lagrange
    multipliers' gradients (they ascend while the weights descend), clip the weights' gradients to norm 1,
    step every optimizer and the schedule.

    Raises
    ------
    NonFiniteLossError
        If ``loss`` is NaN or infinite (nothing is stepped).
    """
    check_finite(loss, step, what)
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    lagrangian.flip_gradients()
    torch.nn.utils.clip_grad_norm_(weights, 1.0)
    for optimizer in optimizers:
        optimizer.step()
    lagrangian.reset_on_crossing(optimizers)
    schedule.step()


def finetune_weights(work: nn.Module, objective: TaskObjective, steps: int, lr: float, what: str,
                     frozen: list[nn.Parameter] = (), extra_hidden: bool = True, progress: bool = False) -> list[float]:
    """``steps`` steps of ``objective`` alone on ``work``'s trainable weights except ``frozen``;
    returns the losses.

    AdamW (weight decay 0.01) at ``lr`` with :func:`warmup_schedule`, gradients clipped to
    norm 1; ``work`` in train mode while it runs and in eval mode after (also on an error).
    ``extra_hidden=False`` leaves out the layer-wise hidden-state MSE (see
    :meth:`TaskObjective.loss`). The fine-tune after ``structured_prune``'s removal and after
    ``token_downsampling``'s training; any compressed model can be healed the same way against
    the objective's teacher (the model the objective was built from).

    Raises
    ------
    NonFiniteLossError
        If a loss is NaN or infinite (``what`` names the phase in the message); the
        parameters keep the updates of the steps before it.
    """
    skip = {id(p) for p in frozen}
    weights = [p for p in work.parameters() if p.requires_grad and id(p) not in skip]
    optimizer = torch.optim.AdamW(weights, lr=lr, weight_decay=0.01)
    schedule = warmup_schedule(optimizer, steps)
    batches = objective.batches()
    losses = []
    work.train()
    try:
        for step in bar(range(steps), desc=what, unit="step", enabled=progress):
            inputs, labels = next(batches)
            loss = objective.loss(work, inputs, labels, extra_hidden=extra_hidden)
            check_finite(loss, step, what)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
    finally:
        work.eval()
    return losses

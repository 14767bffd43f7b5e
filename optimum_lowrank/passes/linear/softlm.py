"""SoftLMs: per-layer ranks learned by soft-thresholding singular values under a global parameter budget.

Each target ``W`` (out x in) is reparametrised as

    W(tau) = U diag(ReLU(s - tau)) V,

with ``U, s, V`` from an SVD of ``W`` (or of ``W T`` for an activation-aware
input transform ``T``, with ``T^{-1}`` folded into ``V``, see ``basis``) and one
learnable threshold ``tau`` per layer. The thresholds (and the singular values,
see ``train``) are trained on the calibration windows with the model's own loss
plus a differentiable parameter count pushed to the budget:

    loss = task_loss + penalty_weight * |P(tau) / P_target - 1|
    P(tau) = sum_l min((out_l + in_l) * sum_i sigmoid((s_li - tau_l) / (temperature * m_l)), out_l * in_l) + biases

(``m_l``: the median singular value of layer l)

so the training decides how much each layer is compressed. Afterwards every
layer keeps the singular directions with ``s_i > tau``: the layer becomes a
:class:`~optimum_lowrank.layers.LowRankLinear` computing exactly what the
soft-threshold layer computed at the end of training. A layer whose surviving
rank would not reduce its parameters, or would keep more than ``1 -
min_layer_saving`` of its weights (default 0.1: such factors ran slower than the
dense layer in ONNX Runtime, see :mod:`optimum_lowrank.linalg.budget`), stays a
dense ``nn.Linear`` holding the trained ``W(tau)`` (the report says so); the hard
parameter count and the projection below treat that rank as the layer's break-even. If the hard count still exceeds the
budget after training, the smallest surviving directions per parameter (relative
to their layer's energy) are removed until it fits ("projection", reported).

Task loss (``loss``): ``auto`` is the LM loss for decoders and distillation to the
original's last hidden states for encoders (see :mod:`optimum_lowrank.finetune`).

Choices the paper leaves open, and what is done here (each is an option)
------------------------------------------------------------------------
``basis`` (default ``svd_llm``)
    The paper factors ``W`` itself (``svd``). Thresholding whitened singular values
    (``svd_llm``: Cholesky of the calibration Gram matrix, as in SVD-LLM) makes the
    singular values measure output error, so one threshold per layer discards the
    right directions; ``asvd`` uses ASVD's channel scaling. All three are offered.
``tau_init`` (default ``budget``)
    ``budget``: each ``tau_l`` starts at the first singular value the greedy
    whitened-energy allocation (:mod:`optimum_lowrank.linalg.budget`) drops for the
    target, and the kept singular values are shifted up by ``tau_l`` so that the
    start equals that truncated factorization (no shrinkage) and meets the budget;
    training then moves ranks between layers. ``zero``: ``tau = 0`` (the dense model);
    the penalty then has to drive every threshold up (use ``penalty_warmup``).
``train`` (default ``singular_values``)
    ``threshold``: only the ``tau_l`` (soft-thresholding also shrinks every kept value
    by ``tau_l``); ``singular_values``: ``tau_l`` and the ``s_i`` (compensates the
    shrinkage; k + 1 numbers per layer); ``factors``: also ``U`` and ``V`` (memory and
    time of a full fine-tune of the targets).
``penalty_weight`` (default 10), ``penalty_warmup`` (default 0)
    lambda, constant after a linear ramp from 0 over the first ``penalty_warmup``
    fraction of the steps. Two-sided (absolute deviation): the count is pulled to the
    budget from above and from below, so training neither overshoots much (the rest is
    removed by the projection) nor gives away parameters it is allowed to keep.
    Measured on tiny models and SmolLM2-135M, the final count lands within 2
    percentage points below the budget, never above it.
``temperature`` (default 0.02)
    Sigmoid width in units of the layer's median singular value (scale-free across layers;
    the median rather than the largest value because whitened spectra have a few outliers
    hundreds of times larger than the rest).
``steps`` (default 100), ``lr`` (default 5e-3), ``batch_size`` (default 1)
    Adam on ``s / m_l`` and ``tau / m_l`` (learning rate in units of the layer's median
    singular value); ``factor_lr`` (default 1e-4) for ``U``, ``V`` with ``train: factors``.
    ``tau`` is clamped to ``>= 0`` after each step. Windows in a seeded random order.

A NaN/inf loss stops training, puts the original layers back and raises
:class:`~optimum_lowrank.errors.PassError`.

Recipe
------
.. code-block:: yaml

    calibration: {data: ../shared/data/wikitext-2/wiki.valid.tokens, num_samples: 64, seq_len: 128}
    passes:
      - pass: softlm
        targets: ["re:encoder\\\\.layer\\\\.\\\\d+\\\\..*dense", "re:.*attention\\\\.self\\\\.(query|key|value)"]
        target_params_ratio: 0.5          # half the parameters of the targets
        steps: 100

References
----------
.. [1] Bhatnagar, Wen, Kang, "SoftLMs: Efficient Adaptive Low-Rank Approximation of
   Language Models using Soft-Thresholding Mechanism", arXiv 2411.10543 (2024).
.. [2] Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
   Language Model Compression", arXiv 2403.07378 (2024) (the ``svd_llm`` basis).
"""

from __future__ import annotations

import copy
import time
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from optimum_lowrank.api import CompressionPass, PassConfig, PassContext
from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.finetune import make_loss
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.layers.lowrank import LowRankLinear, linear_weight
from optimum_lowrank.linalg.budget import DEFAULT_MIN_LAYER_SAVING, dense_rank, factorizes, layer_cost, min_saving_note
from optimum_lowrank.linalg.whitening import InputTransform, asvd_transform, cholesky_transform, whitened_svd
from optimum_lowrank.passes.linear.activation_svd import budget_ranks
from optimum_lowrank.passes.linear.calibration import collect_input_statistics, collect_output_sensitivity
from optimum_lowrank.passes.linear.soft_threshold import SoftLMState, SoftThresholdLinear
from optimum_lowrank.progress import bar
from optimum_lowrank.report import LayerReport, Spectrum

__all__ = ["SoftLMConfig", "SoftLMPass", "SoftLMState", "SoftThresholdLinear"]


class SoftLMConfig(PassConfig):
    """Options of the ``softlm`` pass; see the module docstring for what each choice means.

    Attributes
    ----------
    target_params_ratio : float in (0, 1), required
        Fraction of the targets' parameters kept (0.7 = 30% fewer).
    basis : {"svd_llm", "asvd", "svd"}
    tau_init : {"budget", "zero"}
    train : {"singular_values", "threshold", "factors"}
    steps : int >= 1
    lr : float > 0
        Adam learning rate of ``s`` and ``tau`` (relative to each layer's median singular value).
    factor_lr : float > 0
        Learning rate of ``U``, ``V`` with ``train: factors``.
    temperature : float > 0
    penalty_weight : float > 0
    penalty_warmup : float in [0, 1)
    batch_size : int >= 1
    loss : {"auto", "lm", "hidden", "logits"}
    allocation : {"fisher", "relative", "absolute"}
        How the ``budget`` initialisation compares layers (as in ``activation_svd``).
    sensitivity_samples : int >= 1
        Calibration windows with a backward pass for ``allocation: fisher``.
    alpha : float in (0, 2]
        ASVD exponent (``basis: asvd``).
    damping : float in (0, 1)
        First ridge for a singular Gram matrix (``basis: svd_llm``).
    num_samples : int >= 1, optional
        Calibration windows used (first ones); more than available is an error.
    seed : int, optional
        Window order; the recipe's seed when None.
    progress : bool
        tqdm bars on stderr (default on): calibration batches, and the training steps with the
        running task loss and the soft and hard parameter ratios. ``--quiet`` turns every bar off.
    min_layer_saving : float in [0, 1)
        A layer whose surviving rank would keep more than ``1 - min_layer_saving`` of its
        weights is kept dense (the trained weight); the initial allocation, the hard count
        and the projection treat that rank as its break-even. Default 0.1 (measured: a
        layer factorised at 5% fewer parameters ran slower than the dense one in ONNX
        Runtime, see :mod:`optimum_lowrank.linalg.budget`); 0 turns it off.
    """

    target_params_ratio: float = Field(gt=0, lt=1, description="Fraction of the targets' parameters kept (0.7 = 30% fewer).")
    basis: Literal["svd_llm", "asvd", "svd"] = Field("svd_llm", description=(
        "What is soft-thresholded: `svd_llm` (default; the weight whitened by the Cholesky factor of the "
        "calibration Gram matrix, as in SVD-LLM), `asvd` (ASVD's channel scaling) or `svd` (the weight "
        "itself, as in the paper)."
    ))
    tau_init: Literal["budget", "zero"] = Field("budget", description=(
        "`budget` (default): each threshold starts where the greedy whitened-energy allocation cuts its "
        "layer, so training starts at the budget; `zero`: the dense model (then use penalty_warmup)."
    ))
    train: Literal["singular_values", "threshold", "factors"] = Field("singular_values", description=(
        "What training moves: `threshold` (only tau, which also shrinks every kept value), `singular_values` "
        "(default; tau and the singular values) or `factors` (also U and V: a full fine-tune of the targets)."
    ))
    steps: int = Field(100, ge=1, le=1_000_000, description="Training steps (Adam), on calibration windows in a seeded random order.")
    lr: float = Field(5e-3, gt=0, le=1, description="Adam learning rate of `s` and `tau` (relative to each layer's median singular value).")
    factor_lr: float = Field(1e-4, gt=0, le=1, description="Learning rate of `U`, `V` with `train: factors`.")
    temperature: float = Field(0.02, gt=0, le=1, description="Sigmoid width of the differentiable rank, in units of each layer's median singular value.")
    penalty_weight: float = Field(10.0, gt=0, description="Weight lambda of the budget penalty |P(tau) / P_target - 1| (two-sided).")
    penalty_warmup: float = Field(0.0, ge=0, lt=1, description="Fraction of the steps over which lambda ramps up linearly from 0.")
    batch_size: int = Field(1, ge=1, description="Calibration windows per training step.")
    loss: Literal["auto", "lm", "hidden", "logits"] = Field("auto", description=(
        "Task loss: `auto` (the LM loss for decoders, distillation to the original's last hidden states for "
        "encoders), `lm`, `hidden` or `logits`."
    ))
    allocation: Literal["fisher", "relative", "absolute"] = Field("fisher", description="How the `budget` initialisation compares layers (as in `activation_svd`).")
    sensitivity_samples: int = Field(8, ge=1, description="Calibration windows with a backward pass for `allocation: fisher`.")
    alpha: float = Field(0.5, gt=0, le=2, description="ASVD exponent (`basis: asvd`).")
    damping: float = Field(1e-6, gt=0, lt=1, description="First ridge for a singular Gram matrix (`basis: svd_llm`).")
    num_samples: int | None = Field(None, ge=1, description="Calibration windows used (first ones); more than available is an error.")
    seed: int | None = Field(None, description="Window order; the recipe's seed when None.")
    progress: bool = Field(True, description=(
        "tqdm bars on stderr (default on): calibration batches, and the training steps with the running task "
        "loss and the soft and hard parameter ratios. `--quiet` turns every bar off."
    ))
    min_layer_saving: float = Field(DEFAULT_MIN_LAYER_SAVING, ge=0, lt=1, description=(
        "A layer whose surviving rank would keep more than `1 - min_layer_saving` of its weights is kept "
        "dense (the trained weight); the initial allocation, the hard count and the projection treat that "
        "rank as its break-even. Default 0.1 (measured: a layer factorised at 5% fewer parameters ran slower "
        "than the dense one in ONNX Runtime, see `budget`); 0 turns it off."
    ))


class SoftLMPass(CompressionPass):
    """SoftLMs (Bhatnagar, Wen, Kang, arXiv 2411.10543): learned per-layer ranks by soft-thresholding singular values.

    Recipe::

        - {pass: softlm, targets: ["re:.*_proj"], target_params_ratio: 0.7, steps: 100}

    See the module docstring for the algorithm, the choices made where the paper is silent,
    and a full recipe.
    """

    name = "softlm"
    config_class = SoftLMConfig
    target_types = (nn.Linear, "Conv1D")
    summary = "SoftLMs: learned per-layer ranks by soft-thresholded singular values under a global parameter budget"
    example_options = {"targets": ["re:.*intermediate\\.dense", "re:.*attention\\.self\\.(query|value)"], "target_params_ratio": 0.6, "steps": 5}

    config: SoftLMConfig

    # ------------------------------------------------------------------ building the soft layers

    def _calibration(self, context: PassContext) -> Tensor:
        ids = context.calibration_ids
        if self.config.num_samples is not None:
            if ids.shape[0] < self.config.num_samples:
                raise DataError(
                    f"softlm asks for num_samples={self.config.num_samples} calibration windows, "
                    f"but the calibration text gives only {ids.shape[0]} windows of {ids.shape[1]} tokens"
                )
            ids = ids[: self.config.num_samples]
        return ids

    def _decompose(self, model: nn.Module, targets: dict[str, nn.Module], ids: Tensor, kind: str) -> dict:

        stats = {}
        if self.config.basis != "svd":
            svd_llm = self.config.basis == "svd_llm"
            stats = collect_input_statistics(model, targets, ids, kind=kind, gram=svd_llm, abs_mean=not svd_llm, progress=self.config.progress)
        transforms: dict[int, InputTransform] = {}
        decomps = {}
        for name, module in targets.items():
            if self.config.basis == "svd":
                transform = InputTransform("identity")
            else:
                key = id(stats[name])
                if key not in transforms:
                    try:
                        transforms[key] = (
                            cholesky_transform(stats[name], self.config.damping)
                            if self.config.basis == "svd_llm"
                            else asvd_transform(stats[name], self.config.alpha)
                        )
                    except PassError as err:
                        raise PassError(f"{name}: {err}") from None
                transform = transforms[key]
            try:
                decomps[name] = whitened_svd(linear_weight(module)[0], transform)
            except PassError as err:
                raise PassError(f"{name}: {err}") from None
        return decomps

    def _initial_thresholds(
        self, model: nn.Module, targets: dict[str, nn.Module], decomps: dict, ids: Tensor, context: PassContext, sensitivity: dict[str, float] | None
    ) -> dict[str, int]:
        """Ranks of the starting point: the greedy allocation (``budget``) or full (``zero``)."""

        if self.config.tau_init == "zero":
            return {name: d.s.numel() for name, d in decomps.items()}
        if self.config.allocation == "fisher" and sensitivity is None:
            sensitivity = collect_output_sensitivity(model, targets, ids[: self.config.sensitivity_samples], kind=context.kind, seed=context.seed,
                                                     progress=self.config.progress)
        return budget_ranks(
            targets, decomps, self.config.target_params_ratio, self.config.allocation, sensitivity, min_layer_saving=self.config.min_layer_saving
        )

    # ------------------------------------------------------------------ the pass

    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        state = self.train_soft(model, targets, context)
        reports = self.truncate(model, state)
        context.notes.append(state.summary())
        return reports

    def train_soft(
        self,
        model: nn.Module,
        targets: dict[str, nn.Module],
        context: PassContext,
        *,
        decomposition: dict | None = None,
        sensitivity: dict[str, float] | None = None,
    ) -> SoftLMState:
        """Replace the targets by :class:`SoftThresholdLinear` layers, train them, and fit the budget.

        After this call ``model`` holds the trained soft-threshold layers; :meth:`truncate`
        turns them into their (exactly equivalent) low-rank or dense layers.

        Parameters
        ----------
        model, targets, context
            As in :meth:`apply`.
        decomposition : dict name -> WhitenedSVD, optional
            Precomputed bases of the targets in this config's ``basis`` (e.g. from
            :meth:`ActivationSVDPass.decompose` with the same method), to reuse calibration
            across runs; computed here when None. Not modified.
        sensitivity : dict name -> float, optional
            Precomputed sensitivities for ``allocation: fisher``.

        Raises
        ------
        PassError
            A non-finite training loss (the original layers are put back first), a bad
            weight/Gram matrix, or an infeasible budget.
        DataError
            ``num_samples`` exceeds the calibration windows.
        """

        cfg = self.config
        ids = self._calibration(context)
        decomps = dict(decomposition) if decomposition is not None else self._decompose(model, targets, ids, context.kind)
        ranks = self._initial_thresholds(model, targets, decomps, ids, context, sensitivity)
        loss_name = cfg.loss if cfg.loss != "auto" else ("lm" if context.kind == "decoder" else "hidden")
        reference = copy.deepcopy(model).eval() if loss_name in ("hidden", "logits") else None

        state = SoftLMState(loss=loss_name, steps=cfg.steps, target_params_ratio=cfg.target_params_ratio, initial_ranks=ranks)
        for name, module in targets.items():
            d = decomps.pop(name)
            r, k = ranks[name], d.s.numel()
            s = d.s.float().clone()
            tau = 0.0
            if r < k:  # start at the truncation: tau = first dropped value, kept values shifted up by tau
                tau = float(s[r])
                s[:r] += tau
            bias = linear_weight(module)[1]
            state.soft[name] = SoftThresholdLinear(d.u, s, d.v, bias, tau=tau, train_factors=cfg.train == "factors")
            state.shapes[name] = (d.u.shape[0], d.v.shape[1])
            state.extras[name] = _extra(module, state.shapes[name])
            state.originals[name] = module
        for name, layer in state.soft.items():
            model.set_submodule(name, layer)
        before = sum(m * n + state.extras[name] for name, (m, n) in state.shapes.items())
        try:
            state.log = self._train(model, state.soft, state.shapes, state.extras, before, ids, make_loss(model, context.kind, cfg.loss, reference), context)
        except BaseException:
            for name, module in state.originals.items():
                model.set_submodule(name, module)
            raise
        state.projected = _project(state.soft, state.shapes, state.extras, int(cfg.target_params_ratio * before), cfg.min_layer_saving)
        return state

    def truncate(self, model: nn.Module, state: SoftLMState) -> list[LayerReport]:
        """Replace each soft-threshold layer of ``model`` by its surviving directions; one report per layer.

        A layer becomes a :class:`~optimum_lowrank.layers.LowRankLinear` computing exactly
        what the soft layer computed, or, where the surviving rank would not reduce its
        parameters, a dense ``nn.Linear`` holding the trained weight (action ``replaced``,
        with a note).
        """
        reports = []
        for name, layer in state.soft.items():
            m, n = state.shapes[name]
            original = state.originals[name]
            before_layer = sum(p.numel() for p in original.parameters())
            replacement = layer.to_lowrank(self.config.min_layer_saving).to(linear_weight(original)[0].dtype)
            model.set_submodule(name, replacement)
            metrics = {
                "tau_relative": float(layer.tau.detach()),
                "initial_rank": float(state.initial_ranks[name]),
                "projected_out": float(state.projected.get(name, 0)),
            }
            after_layer = sum(p.numel() for p in replacement.parameters())
            trained = (layer.s.detach() * layer.scale).sort(descending=True).values
            spectrum = Spectrum.from_singular_values(trained, layer.hard_rank(), "soft-threshold (trained)")
            if isinstance(replacement, LowRankLinear):
                reports.append(LayerReport(
                    name=name, module_type=type(original).__name__, action="factorized", params_before=before_layer,
                    params_after=after_layer, rank=replacement.rank, metrics=metrics, spectrum=spectrum,
                ))
            else:
                r = layer.hard_rank()
                saving_note = min_saving_note(r, (m, n), self.config.min_layer_saving)
                if saving_note is not None:
                    note = f"kept dense: surviving {saving_note.replace('kept dense, since', 'since')}; weight = the trained soft-threshold layer"
                else:
                    note = (
                        f"kept dense: surviving rank {r} would not reduce a {m}x{n} layer (break-even {m * n / (m + n):.1f}); "
                        "weight = the trained soft-threshold layer"
                    )
                reports.append(LayerReport(
                    name=name, module_type=type(original).__name__, action="replaced", params_before=before_layer,
                    params_after=after_layer, rank=r, note=note, metrics=metrics, spectrum=spectrum,
                ))
        return reports

    def _train(self, model, soft, shapes, extras, before, ids, loss_fn, context) -> dict[str, float]:
        cfg = self.config
        groups = [{"params": [p for layer in soft.values() for p in (layer.s, layer.tau)], "lr": cfg.lr}]
        if cfg.train == "threshold":
            for layer in soft.values():
                layer.s.requires_grad_(False)
            groups = [{"params": [layer.tau for layer in soft.values()], "lr": cfg.lr}]
        elif cfg.train == "factors":
            groups.append({"params": [p for layer in soft.values() for p in (layer.u, layer.v, layer.bias) if p is not None], "lr": cfg.factor_lr})
        flags = {id(p): p.requires_grad for p in model.parameters()}
        trained = {id(p) for g in groups for p in g["params"]}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        optimizer = torch.optim.Adam(groups)
        seed = cfg.seed if cfg.seed is not None else context.seed
        generator = torch.Generator().manual_seed(seed)
        n = ids.shape[0]
        order: list[int] = []
        warm = int(cfg.penalty_warmup * cfg.steps)
        log: dict[str, float] = {}
        t0 = time.perf_counter()
        model.eval()
        steps_bar = bar(total=cfg.steps, desc="softlm", unit="step", enabled=cfg.progress)
        try:
            for step in range(cfg.steps):
                if len(order) < cfg.batch_size:
                    order += torch.randperm(n, generator=generator).tolist()
                batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
                task = loss_fn(ids[batch])
                ratio = self._soft_params(soft, shapes, extras) / before
                lam = cfg.penalty_weight * min(1.0, (step + 1) / warm) if warm else cfg.penalty_weight
                penalty = lam * (ratio / cfg.target_params_ratio - 1).abs()
                total = task + penalty
                if not torch.isfinite(total):
                    raise PassError(
                        f"softlm: the training loss became {float(total.detach())} at step {step + 1}/{cfg.steps} "
                        f"(task {float(task.detach())}, penalty {float(penalty.detach())}); the original layers were restored. "
                        "Lower lr, or check the calibration data and the model's weights"
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                with torch.no_grad():
                    for layer in soft.values():
                        layer.tau.clamp_(min=0)
                if step == 0:
                    log["loss_first"] = float(task.detach())
                log["loss_last"], log["ratio_last"] = float(task.detach()), float(ratio.detach())
                if not steps_bar.disable:
                    hard = self._hard_params(soft, shapes, extras, cfg.min_layer_saving) / before
                    steps_bar.set_postfix(
                        loss=f"{log['loss_last']:.4f}", soft_ratio=f"{log['ratio_last']:.4f}", hard_ratio=f"{hard:.4f}", refresh=False
                    )
                steps_bar.update(1)
        finally:
            steps_bar.close()
            optimizer.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), True))
        log["seconds"] = time.perf_counter() - t0
        return log

    def _soft_params(self, soft, shapes, extras) -> Tensor:
        total = torch.zeros(())
        for name, layer in soft.items():
            m, n = shapes[name]
            count = layer.soft_rank(self.config.temperature) * (m + n)
            total = total + torch.clamp(count, max=float(m * n)) + extras[name]
        return total

    @staticmethod
    def _hard_params(soft, shapes, extras, min_saving: float = 0.0) -> int:
        """Parameters after truncation: factors, or the dense weight where the rank does not factorize."""
        return sum(layer_cost(shapes[name], layer.hard_rank(), min_saving) + extras[name] for name, layer in soft.items())


def _extra(module: nn.Module, shape: tuple[int, int]) -> int:
    return sum(p.numel() for p in module.parameters()) - shape[0] * shape[1]


def _project(soft: dict[str, SoftThresholdLinear], shapes: dict, extras: dict, budget: int, min_saving: float = 0.0) -> dict[str, int]:
    """Drop surviving directions until the hard parameter count fits ``budget``; returns drops per layer.

    Greedy in reverse: the direction (or, for a layer kept dense, the block of
    directions down to the largest rank that :func:`factorizes` with ``min_saving``) with the least relative energy
    per parameter saved goes first. A dropped direction gets ``s_i = tau`` (exactly zero).
    """
    dropped: dict[str, int] = {}

    def hard() -> int:
        return SoftLMPass._hard_params(soft, shapes, extras, min_saving)

    with torch.no_grad():
        while hard() > budget:
            best = None
            for name, layer in soft.items():
                m, n = shapes[name]
                values = (layer.s - layer.tau).clamp_min(0).double()
                alive = (values > 0).nonzero().flatten()
                r = alive.numel()
                if r <= 1:
                    continue
                order = alive[values[alive].argsort()]  # ascending
                energy = float(values.square().sum())
                if not factorizes((m, n), r, min_saving):  # dense: drop down to the largest factorizable rank
                    target_rank = max(1, dense_rank((m, n), min_saving) - 1)
                    drop = order[: r - target_rank]
                    saved = m * n - target_rank * (m + n)
                else:
                    drop = order[:1]
                    saved = m + n
                if saved <= 0:
                    continue
                score = float(values[drop].square().sum()) / max(energy, 1e-300) / saved
                if best is None or score < best[0]:
                    best = (score, name, drop)
            if best is None:
                break
            _, name, drop = best
            layer = soft[name]
            layer.s[drop] = layer.tau.detach()
            dropped[name] = dropped.get(name, 0) + drop.numel()
    return dropped


@hookimpl
def lowrank_register_passes(register) -> None:
    register(SoftLMPass)

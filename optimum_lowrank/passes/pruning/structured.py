"""``structured_prune``: CoFi-style structured pruning with hard-concrete (L0) gates.

Gates over attention heads, FFN intermediate dimensions and (optionally) whole
attention / FFN blocks are trained together with the model, under a Lagrangian
penalty that drives the expected sparsity to the target, while the model is
distilled from its unpruned copy. The closed units are then physically removed.
BERT encoder layers, and Llama-like decoder layers (query-head slots within the
key/value groups, FFN dimensions and whole MLPs, distilled on the next-token
distribution; see :mod:`~optimum_lowrank.passes.pruning.decoder`).

References
----------
.. [1] Xia, Zhong, Chen, "Structured Pruning Learns Compact and Accurate Models"
   (CoFi), arXiv:2204.00408.
.. [2] Louizos, Welling, Kingma, "Learning Sparse Neural Networks through L0
   Regularization", arXiv:1712.01312.
.. [3] Tan, "Infor-Coef: Information Bottleneck-based Dynamic Token Downsampling for
   Compact and Efficient language model", arXiv:2305.12458 (uses [1] as its static half).
"""

from __future__ import annotations

import copy
import time

import torch
from pydantic import Field, field_validator
from torch import nn

from optimum_lowrank.api import CompressionPass, PassConfig, PassContext, count_parameters
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.passes.pruning.hard_concrete import Lagrangian
from optimum_lowrank.passes.pruning.objective import (
    TaskObjective,
    TrainingOptions,
    lagrangian_step,
    train_steps,
    warmup_schedule,
)
from optimum_lowrank.passes.pruning.structure import SUPPORTED_LAYERS, expected_sparsity, install_gates, remove_closed, set_gate_values
from optimum_lowrank.progress import bar
from optimum_lowrank.report import LayerReport

__all__ = ["StructuredPruneConfig", "StructuredPrunePass"]


class StructuredPruneConfig(PassConfig, TrainingOptions):
    """Recipe entry of ``structured_prune`` (plus the training keys of :class:`TrainingOptions`).

    Attributes
    ----------
    targets : BERT layers, e.g. ``["re:.*encoder\\.layer\\.\\d+"]``, or Llama-like decoder layers,
        e.g. ``["re:model\\.layers\\.\\d+"]`` (query-head slots and FFN dimensions; see
        :mod:`~optimum_lowrank.passes.pruning.decoder`).
    target_sparsity : float, 0 <= target_sparsity < 1
        Fraction of the targeted layers' attention + FFN weights to remove.
    prune_sublayers : bool
        Also gate whole attention and FFN blocks (decoders: the whole MLP only).
    droprate_init : float in (0, 1)
        Initial closing probability of every gate (CoFi: 0.5).
    mask_lr : float > 0
        Learning rate of the gates' ``log_alpha`` and of the Lagrange multipliers (CoFi: 0.1).
    sparsity_warmup : float in [0, 1]
        Fraction of ``steps`` over which the target rises linearly from 0.
    finetune_steps : int >= 0
        Steps of the same objective after the units are removed (gates gone).

    Sample yaml::

        - pass: structured_prune
          targets: ["re:.*encoder\\\\.layer\\\\.\\\\d+"]
          target_sparsity: 0.6
          data: ../shared/data/sst2/train.tsv
          steps: 600
    """

    target_sparsity: float = Field(description="Fraction of the targeted layers' attention + FFN weights to remove.")
    prune_sublayers: bool = Field(True, description="Also gate whole attention and FFN blocks (decoders: the whole MLP only).")
    droprate_init: float = Field(0.5, gt=0, lt=1, description="Initial closing probability of every gate (CoFi: 0.5).")
    mask_lr: float = Field(0.1, gt=0, description="Learning rate of the gates' `log_alpha` and of the Lagrange multipliers (CoFi: 0.1).")
    sparsity_warmup: float = Field(0.5, ge=0, le=1, description="Fraction of `steps` over which the target rises linearly from 0.")
    finetune_steps: int = Field(0, ge=0, description="Steps of the same objective after the units are removed (gates gone).")

    @field_validator("target_sparsity")
    @classmethod
    def _in_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1) (fraction of attention + FFN weights removed), got {value}")
        return value


class StructuredPrunePass(CompressionPass):
    """Learn which heads, FFN dimensions and blocks to remove, then remove them.

    The pass trains a copy of the model; the caller's model is only changed (its
    children replaced by the pruned ones) once everything succeeded. A non-finite
    loss stops training with :class:`~optimum_lowrank.passes.pruning.objective.NonFiniteLossError`
    and leaves the model as it was.

    Raises
    ------
    TargetError
        A target that is neither a BERT layer nor a Llama-like decoder layer (the message
        names the supported layer classes).
    PassError
        A target already pruned or compressed, a ``task`` objective without a head or
        data (decoders are always distilled), or a non-finite loss.
    DataError
        A malformed task file, or labels that do not fit the head.

    References
    ----------
    Xia et al., CoFi, arXiv:2204.00408; Louizos et al., arXiv:1712.01312.
    """

    name = "structured_prune"
    config_class = StructuredPruneConfig
    target_types = SUPPORTED_LAYERS
    summary = ("CoFi-style L0 structured pruning of heads, FFN dimensions and blocks (Lagrangian sparsity target, distillation); "
               "BERT encoders and Llama-like decoders")
    example_options = {"targets": ["re:encoder\\.layer\\.\\d+"], "target_sparsity": 0.5, "steps": 4, "batch_size": 2,
                       "max_length": 16, "mask_lr": 0.5}

    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        cfg: StructuredPruneConfig = self.config
        work = copy.deepcopy(model)
        names = list(targets)
        layers = {name: work.get_submodule(name) for name in names}
        before = {name: count_parameters(layer) for name, layer in layers.items()}
        started = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            objective = TaskObjective(work, cfg, context)
            gates = install_gates(layers, cfg.droprate_init, cfg.prune_sublayers)
            try:
                history = self._train(work, gates, objective)
            finally:
                for g in gates:
                    g.remove_hooks()
            set_gate_values(gates, "off")
            shapes = remove_closed(gates)
            if cfg.finetune_steps:
                self._finetune(work, objective)
        work.eval()
        seconds = time.perf_counter() - started
        for child, module in list(work.named_children()):
            setattr(model, child, module)
        model.eval()
        reports = []
        for name, shape in zip(names, shapes):
            after = count_parameters(model.get_submodule(name))
            note = (f"heads {shape['heads_kept']}/{shape['heads_total']}, FFN dims {shape['intermediate_kept']}/{shape['intermediate_total']}"
                    + (", attention block removed" if shape["mha_removed"] else "") + (", FFN block removed" if shape["ffn_removed"] else ""))
            reports.append(LayerReport(name=name, module_type=type(targets[name]).__name__, action="replaced",
                                       params_before=before[name], params_after=after, note=note,
                                       metrics={k: float(v) for k, v in shape.items()}))
        context.notes.append(
            f"structured_prune: {objective.description}, {cfg.steps} steps + {cfg.finetune_steps} after removal in {seconds:.0f} s; "
            f"expected sparsity {history['expected_sparsity']:.3f} (target {cfg.target_sparsity}); "
            f"layer weights {sum(before.values())} -> {sum(r.params_after for r in reports)}")
        return reports

    def _train(self, work: nn.Module, gates, objective: TaskObjective) -> dict:
        cfg: StructuredPruneConfig = self.config
        lagrangian = Lagrangian()
        weights = [p for p in work.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=0.01)
        schedule = warmup_schedule(optimizer, cfg.steps)
        gate_params = [p for g in gates for m in g.modules() for p in m.parameters()]
        mask_optimizer = torch.optim.AdamW([{"params": gate_params}, {"params": list(lagrangian.parameters())}],
                                           lr=cfg.mask_lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(cfg.seed)
        work.train()
        batches = objective.batches()
        ramp = max(1, int(cfg.sparsity_warmup * cfg.steps))
        sparsity = expected_sparsity(gates)
        for step in bar(range(cfg.steps), desc="structured_prune", unit="step"):
            inputs, labels = next(batches)
            set_gate_values(gates, "sample", generator)
            loss = objective.loss(work, inputs, labels)
            sparsity = expected_sparsity(gates)
            target = cfg.target_sparsity * min(1.0, (step + 1) / ramp)
            total = loss + lagrangian(sparsity, target)
            lagrangian_step(total, step, "structured_prune", (optimizer, mask_optimizer), lagrangian, weights, schedule)
        work.eval()
        return {"expected_sparsity": float(sparsity.detach())}

    def _finetune(self, work: nn.Module, objective: TaskObjective) -> None:
        cfg: StructuredPruneConfig = self.config
        train_steps(work, objective, cfg.finetune_steps, cfg.lr, "structured_prune (fine-tuning after removal)")


@hookimpl
def lowrank_register_passes(register) -> None:
    register(StructuredPrunePass)

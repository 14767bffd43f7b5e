"""``token_downsampling``: Infor-Coef's information-bottleneck dynamic token dropping.

One small predictor per layer decides which tokens the layer (and every later one)
still processes; see :mod:`optimum_lowrank.layers.token_dropping` for the training
and inference semantics and the exported graph. Training loss::

    task (or distillation) loss
      + beta_norm   * mean_l ||H_l * m_l||_F          (information-bottleneck compression term)
      + beta_binary * mean_l mean_tokens p (1 - p)     (pushes keep probabilities to 0 or 1)
      + keep term on the kept-token fraction k          (beta_skim * k, or a Lagrangian towards target_keep)

where ``p`` is a predictor's soft keep probability. The public Infor-Coef code's
"entropy" term is the negative entropy, which pushes ``p`` towards 0.5; the term
here, ``p (1 - p)``, is zero at 0 and 1 and largest at 0.5, so minimising it drives
decisions to 0 or 1.

References
----------
.. [1] Tan, "Infor-Coef: Information Bottleneck-based Dynamic Token Downsampling for
   Compact and Efficient language model", arXiv:2305.12458.
.. [2] Jang, Gu, Poole, "Categorical Reparameterization with Gumbel-Softmax", arXiv:1611.01144.
"""

from __future__ import annotations

import copy
import time

import torch
from pydantic import Field
from torch import nn

from optimum_lowrank.api import CompressionPass, PassConfig, PassContext, count_parameters
from optimum_lowrank.errors import PassError
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.layers.token_dropping import TokenDroppingEncoder, TokenKeepPredictor
from optimum_lowrank.passes.pruning.hard_concrete import Lagrangian
from optimum_lowrank.passes.pruning.objective import TaskObjective, TrainingOptions, finetune_weights, lagrangian_step, warmup_schedule
from optimum_lowrank.progress import bar
from optimum_lowrank.report import LayerReport

__all__ = ["TokenDownsamplingConfig", "TokenDownsamplingPass"]


class TokenDownsamplingConfig(PassConfig, TrainingOptions):
    """Recipe entry of ``token_downsampling`` (plus the training keys of :class:`TrainingOptions`).

    Attributes
    ----------
    targets : the encoder, e.g. ``[bert.encoder]`` (a ``BertEncoder``).
    layers : list of int or None
        Indices of the layers that get a predictor (None: every layer).
    temperature : float > 0
        Gumbel-softmax temperature.
    beta_norm : float >= 0
        Weight of the information-bottleneck norm term (Infor-Coef: 4e-4).
    beta_binary : float >= 0
        Weight of the term that drives keep probabilities to 0 or 1.
    beta_skim : float >= 0
        Weight of the kept-token fraction (used when ``target_keep`` is None).
    target_keep : float in (0, 1] or None
        Drive the mean kept-token fraction (over predicted layers and non-padding
        tokens) to this value with a Lagrangian instead of ``beta_skim``.
    predictor_lr : float > 0
        Learning rate of the predictors and the Lagrange multipliers.
    predictor_hidden : int >= 0 or None
        Width of the predictor's hidden layer. None: the hidden size ``D`` (Infor-Coef's
        ``D -> D -> 2``); e.g. 64: ``D -> 64 -> 2``; 0: a single ``Linear(D, 2)`` after a
        LayerNorm. On short sentences the predictor's cost matters: ``D -> D`` per token
        is a twelfth of a BERT layer's multiply-adds (12 D^2).
    calibrate_keep : bool
        After training, shift each predictor's keep bias so that the inference decisions
        keep ``target_keep`` of the tokens (without it: the fraction the sampled training
        decisions kept over the last fifth of the steps), layer by layer on 16 training
        batches. With several predicted layers the training per-layer profile is scaled
        to mean ``target_keep``.
    predictor_init_bias : float >= 0
        The predictors' output bias starts at (drop ``-b``, keep ``+b``), so every token is
        kept at first (Infor-Coef: 5). A smaller ``b`` lets a short training move
        decisions sooner.
    finetune_steps : int >= 0
        Steps of the task (or distillation) loss alone after training (and after
        ``calibrate_keep``), with the predictors frozen and the inference decisions
        (keep iff the keep logit wins) in place of Gumbel samples: the weights adapt to
        the tokens the exported graph actually drops. Learning rate ``lr``.

    Sample yaml::

        - pass: token_downsampling
          targets: [bert.encoder]
          data: ../shared/data/sst2/train.tsv
          layers: [2]
          predictor_hidden: 64
          target_keep: 0.5
          steps: 300
    """

    layers: tuple[int, ...] | None = Field(None, description="Indices of the layers that get a predictor (None: every layer).")
    temperature: float = Field(1.0, gt=0, description="Gumbel-softmax temperature.")
    beta_norm: float = Field(4e-4, ge=0, description="Weight of the information-bottleneck norm term (Infor-Coef: 4e-4).")
    beta_binary: float = Field(0.1, ge=0, description="Weight of the term that drives keep probabilities to 0 or 1.")
    beta_skim: float = Field(0.5, ge=0, description="Weight of the kept-token fraction (used when `target_keep` is None).")
    target_keep: float | None = Field(None, gt=0, le=1, description=(
        "Drive the mean kept-token fraction (over predicted layers and non-padding tokens) to this value with "
        "a Lagrangian instead of `beta_skim`."
    ))
    predictor_lr: float = Field(1e-3, gt=0, description="Learning rate of the predictors and the Lagrange multipliers.")
    predictor_hidden: int | None = Field(None, ge=0, le=65536, description=(
        "Width of the predictor's hidden layer. None: the hidden size D (Infor-Coef's D -> D -> 2); e.g. 64: "
        "D -> 64 -> 2; 0: a single Linear(D, 2) after a LayerNorm (cheapest on short sentences)."
    ))
    calibrate_keep: bool = Field(False, description=(
        "After training, shift each predictor's keep bias so that the inference decisions (keep when the keep "
        "logit wins) keep `target_keep` of the tokens (without `target_keep`: the fraction the Gumbel-sampled "
        "training decisions kept over the last fifth of the steps), measured on 16 training batches, layer by "
        "layer. Without it, tokens whose keep probability is above 0.5 but far from 1 are dropped often in "
        "training and always kept at inference."
    ))
    predictor_init_bias: float = Field(5.0, ge=0, description=(
        "The predictors' output bias starts at (drop -b, keep +b), so every token is kept at first (Infor-Coef: 5); "
        "a smaller b lets a short training move decisions sooner."
    ))
    finetune_steps: int = Field(0, ge=0, description=(
        "Steps of the task (or distillation) loss alone after training and `calibrate_keep`, predictors frozen, "
        "with the inference decisions (keep iff the keep logit wins) instead of Gumbel samples, so the weights "
        "adapt to the tokens the exported graph drops."
    ))


class TokenDownsamplingPass(CompressionPass):
    """Train per-layer token-keep predictors and install the token-dropping encoder.

    Encoders only. The pass trains a copy of the model; the caller's model changes only
    when training succeeded. The predictors add parameters (one ``D x H`` and one
    ``H x 2`` linear per predicted layer, ``H = predictor_hidden``) and save compute:
    later layers run on fewer tokens.

    Raises
    ------
    PassError
        A decoder model (token dropping breaks causal generation), a target that is not
        a ``BertEncoder``, a layer index out of range, or a non-finite loss.
    DataError
        A malformed task file, or labels that do not fit the head.

    References
    ----------
    Tan, Infor-Coef, arXiv:2305.12458.
    """

    name = "token_downsampling"
    config_class = TokenDownsamplingConfig
    target_types = ("BertEncoder",)
    summary = "Infor-Coef: per-layer token-keep predictors (Gumbel straight-through, information-bottleneck loss); dropped tokens are removed"
    example_options = {"targets": ["encoder"], "steps": 3, "batch_size": 2, "max_length": 16}
    reduces_parameters = False

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        config = getattr(model, "config", None)
        name = type(model).__name__
        if getattr(config, "is_decoder", False) or name.endswith(("ForCausalLM", "LMHeadModel")):
            raise PassError(f"token_downsampling works on encoders only; {name} is a decoder "
                            "(dropping tokens would break causal generation and the key/value cache)")
        return super().select(model)

    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        cfg: TokenDownsamplingConfig = self.config
        if context.kind == "decoder":
            raise PassError("token_downsampling works on encoders only; the pipeline says this model is a decoder")
        work = copy.deepcopy(model)
        started = time.perf_counter()
        reports = []
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            objective = TaskObjective(work, cfg, context)
            encoders = {name: self._install(work, name) for name in targets}
            history = self._train(work, list(encoders.values()), objective)
            if cfg.calibrate_keep:
                fractions = history["per_layer"]
                if cfg.target_keep is not None and fractions:  # the constraint, not the (oscillating) sampled fraction
                    scale = cfg.target_keep / max(sum(fractions) / len(fractions), 1e-6)
                    fractions = [min(1.0, f * scale) for f in fractions]
                history["calibration"] = self._calibrate(work, list(encoders.values()), objective, fractions)
            if cfg.finetune_steps:
                self._finetune(work, list(encoders.values()), objective)
            restore = not hasattr(work, "classifier")
            for encoder in encoders.values():
                encoder.restore_positions = restore
        work.eval()
        seconds = time.perf_counter() - started
        for child, module in list(work.named_children()):
            setattr(model, child, module)
        model.eval()
        for name, encoder in encoders.items():
            reports.append(LayerReport(
                name=name, module_type=type(targets[name]).__name__, action="replaced",
                params_before=count_parameters(targets[name]), params_after=count_parameters(encoder),
                note=f"token-keep predictors before layers {self._layer_indices(len(encoder.layer))}; "
                     f"training kept fraction {history['kept_fraction']:.3f}"
                     + (f"; keep-bias shifts {[round(x, 3) for x in history['calibration']]}" if "calibration" in history else ""),
                metrics={"kept_fraction_train": history["kept_fraction"],
                         **{f"kept_fraction_train_tail_{i}": f for i, f in enumerate(history["per_layer"])}}))
        context.notes.append(f"token_downsampling: {objective.description}, {cfg.steps} steps + {cfg.finetune_steps} on the "
                             f"inference decisions in {seconds:.0f} s, "
                             f"kept-token fraction at the end of training {history['kept_fraction']:.3f}")
        return reports

    def _layer_indices(self, count: int) -> list[int]:
        indices = list(range(count)) if self.config.layers is None else list(self.config.layers)
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            raise PassError(f"token_downsampling: layers {bad} out of range; the encoder has layers 0..{count - 1}")
        return indices

    def _install(self, work: nn.Module, name: str) -> TokenDroppingEncoder:
        encoder = work.get_submodule(name)
        layers = getattr(encoder, "layer", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise PassError(f"{name}: expected a BertEncoder with a 'layer' list, got {type(encoder).__name__}")
        if isinstance(encoder, TokenDroppingEncoder):
            raise PassError(f"{name}: token dropping is already installed")
        hidden = work.config.hidden_size
        wanted = set(self._layer_indices(len(layers)))
        cfg: TokenDownsamplingConfig = self.config
        predictors = nn.ModuleList([TokenKeepPredictor(hidden, cfg.predictor_init_bias, cfg.predictor_hidden) if i in wanted
                                    else nn.Identity() for i in range(len(layers))])
        dropping = TokenDroppingEncoder(layers, predictors, self.config.temperature)
        work.set_submodule(name, dropping)
        return dropping

    def _train(self, work: nn.Module, encoders: list[TokenDroppingEncoder], objective: TaskObjective) -> dict:
        cfg: TokenDownsamplingConfig = self.config
        predictor_params = [p for e in encoders for p in e.predictors.parameters()]
        ids = {id(p) for p in predictor_params}
        weights = [p for p in work.parameters() if p.requires_grad and id(p) not in ids]
        lagrangian = Lagrangian(cfg.anti_windup)
        optimizer = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=0.01)
        schedule = warmup_schedule(optimizer, cfg.steps)
        side = torch.optim.AdamW([{"params": predictor_params}, {"params": list(lagrangian.parameters())}],
                                 lr=cfg.predictor_lr, weight_decay=0.0)
        batches = objective.batches()
        work.train()
        kept = torch.tensor(1.0)
        tail = max(1, cfg.steps // 5)
        per_layer: list[list[float]] = []
        for step in bar(range(cfg.steps), desc="token_downsampling", unit="step"):
            inputs, labels = next(batches)
            loss = objective.loss(work, inputs, labels, extra_hidden=False)
            terms = [e.stats for e in encoders if e.stats.get("keep")]
            if terms:
                valid = inputs["attention_mask"].to(torch.float32)
                fractions = torch.stack([k.sum() / valid.sum() for s in terms for k in s["keep"]])
                kept = fractions.mean()
                if step >= cfg.steps - tail:
                    per_layer.append(fractions.detach().tolist())
                norm = torch.stack([n for s in terms for n in s["masked_norm"]]).mean()
                binary = torch.stack([(p * (1 - p)).sum() / valid.sum() for s in terms for p in s["keep_prob"]]).mean()
                skim = lagrangian(kept, cfg.target_keep) if cfg.target_keep is not None else cfg.beta_skim * kept
                loss = loss + cfg.beta_norm * norm + cfg.beta_binary * binary + skim
            lagrangian_step(loss, step, "token_downsampling", (optimizer, side), lagrangian, weights, schedule)
        work.eval()
        mean = [sum(col) / len(col) for col in zip(*per_layer)] if per_layer else []
        return {"kept_fraction": float(kept.detach()), "per_layer": mean}

    def _finetune(self, work: nn.Module, encoders: list[TokenDroppingEncoder], objective: TaskObjective) -> None:
        """``finetune_steps`` of the objective alone, on the decisions inference takes (predictors frozen)."""
        cfg: TokenDownsamplingConfig = self.config
        for encoder in encoders:
            encoder.hard_decisions = True
        try:
            finetune_weights(work, objective, cfg.finetune_steps, cfg.lr, "token_downsampling (fine-tuning on the inference decisions)",
                             frozen=[p for e in encoders for p in e.predictors.parameters()], extra_hidden=False)
        finally:
            for encoder in encoders:
                encoder.hard_decisions = False

    @torch.no_grad()
    def _calibrate(self, work: nn.Module, encoders: list[TokenDroppingEncoder], objective: TaskObjective,
                   fractions: list[float], batches: int = 16) -> list[float]:
        """Shift each predictor's keep bias (earliest layer first) so that, in eval mode on ``batches``
        training batches, the cumulative kept fraction after it equals ``fractions`` (training's)."""
        batch_iter = objective.batches()
        data = [next(batch_iter)[0] for _ in range(batches)]
        located = [(e, j, p) for e in encoders for j, p in enumerate(q for q in e.predictors if isinstance(q, TokenKeepPredictor))]
        shifts = []
        work.eval()
        for (encoder, j, predictor), fraction in zip(located, fractions):
            margins, valid, rows = [], 0.0, 0.0
            for inputs in data:
                work(**inputs)
                margins.append(encoder.stats["margins"][j])
                valid += encoder.stats["valid_tokens"]
                rows += encoder.stats["rows"]
            scores = torch.cat(margins).sort(descending=True).values
            wanted = int(round(fraction * valid - rows))  # [CLS] is always kept
            if scores.numel() == 0 or not 0 <= wanted <= scores.numel():
                shifts.append(0.0)
                continue
            upper = scores[wanted - 1] if wanted > 0 else scores[0] + 1.0
            lower = scores[wanted] if wanted < scores.numel() else scores[-1] - 1.0
            shift = float((upper + lower) / 2)  # keep iff margin > shift
            predictor.net[-1].bias[1] -= shift
            shifts.append(shift)
        return shifts


@hookimpl
def lowrank_register_passes(register) -> None:
    register(TokenDownsamplingPass)

"""Dynamic token dropping for BERT-like encoders (the Infor-Coef / Transkimmer layout).

:class:`TokenKeepPredictor` scores every token before a layer; :class:`TokenDroppingEncoder`
replaces a ``BertEncoder`` and runs its layers on the tokens still kept.

- Training mode: a kept/dropped decision per token from a Gumbel-softmax with
  straight-through hard samples; decisions multiply across layers (a dropped token
  stays dropped), [CLS] (position 0) is always kept, padding is never kept. Dropped
  tokens are masked out as attention keys (with the detached decision) and keep the
  hidden state they had when dropped: ``h <- m * layer(h) + (1 - m) * h``, so the
  gradient reaches the predictors through ``m``.
- Eval mode: a token is kept when its keep-logit exceeds its drop-logit. Kept tokens
  are gathered to the front of the sequence (in order), so each layer runs on
  ``k = max kept count over the batch`` tokens, not the full length. In a padded
  batch a row with fewer than ``k`` kept tokens fills its tail with dropped tokens,
  masked out as keys, whose outputs are discarded: rows are exact, they just do
  some wasted work. Batch size 1 has no filler at all. The graph exports to ONNX as
  TopK (a full descending sort of a unique score), Range and GatherElements.

The ``last_hidden_state`` returned keeps the input length when ``restore_positions``
(dropped tokens keep the state they had when dropped, scattered back to their
positions; padding positions keep their embedding output), which mean pooling needs; a classifier that reads [CLS] only can skip it.

References
----------
.. [1] Tan, "Infor-Coef: Information Bottleneck-based Dynamic Token Downsampling for
   Compact and Efficient language model", arXiv:2305.12458.
.. [2] Guan et al., "Transkimmer: Transformer Learns to Layer-wise Skim", arXiv:2205.07324.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenDroppingEncoder", "TokenKeepPredictor"]


class TokenKeepPredictor(nn.Module):
    """``LayerNorm -> Linear(D, H) -> LayerNorm -> GELU -> Linear(H, 2)``: logits (drop, keep) per token.

    Parameters
    ----------
    hidden_size : int >= 1
    init_bias : float
        The output bias starts at ``(-init_bias, +init_bias)`` and the output weight at
        zero, so every token is kept at first (Infor-Coef: 5).
    inner : int >= 0 or None
        ``H``, the width of the hidden layer. None: ``D`` (Infor-Coef's predictor,
        ``~D^2`` multiply-adds per token); a smaller ``H`` costs ``~D H``; 0: no hidden
        layer, ``LayerNorm -> Linear(D, 2)`` (``2 D`` per token).

    ``forward(hidden)``: (batch, seq_len, hidden_size) -> (batch, seq_len, 2).
    """

    def __init__(self, hidden_size: int, init_bias: float = 5.0, inner: int | None = None) -> None:
        super().__init__()
        self.hidden_size, self.init_bias, self.inner = hidden_size, init_bias, inner
        width = hidden_size if inner is None else inner
        if width:
            self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.LayerNorm(width),
                                     nn.GELU(), nn.Linear(width, 2))
        else:
            self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, 2))
        with torch.no_grad():
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.copy_(torch.tensor([-init_bias, init_bias]))

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"hidden_size": self.hidden_size, "init_bias": self.init_bias, "inner": self.inner}

    def macs_per_token(self) -> int:
        """Multiply-adds of the predictor's linear layers for one token (LayerNorms and GELU left out)."""
        return sum(m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


class TokenDroppingEncoder(nn.Module):
    """A ``BertEncoder`` replacement that drops tokens before the layers that have a predictor.

    Parameters
    ----------
    layers : nn.ModuleList
        The encoder's layers (``BertLayer``), reused as they are.
    predictors : nn.ModuleList
        One entry per layer: a :class:`TokenKeepPredictor`, or ``nn.Identity()`` for a
        layer that keeps every token it receives.
    temperature : float > 0
        Gumbel-softmax temperature (training only).
    restore_positions : bool
        Return a full-length ``last_hidden_state`` (see the module docstring).

    Attributes
    ----------
    hard_decisions : bool
        Training only (not saved): take the inference decisions (keep iff the keep logit
        wins) instead of Gumbel samples, so a training step sees exactly the tokens the
        exported graph keeps; the predictors get no gradient then. Default False.
    stats : dict
        After a forward pass: ``keep`` (list of (batch, seq_len) decisions per predicted
        layer, training: straight-through, differentiable), ``keep_prob`` (the soft keep
        probabilities), ``masked_norm`` (per-layer mean over the batch of
        ``||H_l * m_l||_F``), ``kept_tokens`` (eval: per layer, kept tokens summed over
        the batch, as floats), ``margins`` (eval: per predicted layer, the keep-minus-drop
        logit margins of the non-[CLS] tokens it decided on), ``rows`` (eval: the batch size)
        and ``valid_tokens`` (non-padding tokens in the batch).
    """

    def __init__(self, layers: nn.ModuleList, predictors: nn.ModuleList, temperature: float = 1.0,
                 restore_positions: bool = True) -> None:
        super().__init__()
        if len(layers) != len(predictors):
            raise ValueError(f"need one predictor entry per layer, got {len(predictors)} for {len(layers)} layers")
        self.layer = layers
        self.predictors = predictors
        self.temperature = temperature
        self.restore_positions = restore_positions
        self.hard_decisions = False
        self.gradient_checkpointing = False
        self.stats: dict = {}

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"layers": self.layer, "predictors": self.predictors, "temperature": self.temperature,
                "restore_positions": self.restore_positions}

    @staticmethod
    def _valid(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        """Non-padding keys, (batch, seq_len) bool, from BERT's additive mask (B, 1, 1|L, L) or None."""
        if attention_mask is None:
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if attention_mask.dtype == torch.bool:
            return attention_mask[:, 0, 0, :]
        return attention_mask[:, 0, 0, :] > -1.0

    @staticmethod
    def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(batch, seq_len) keep (bool or 0/1) -> additive key mask (batch, 1, 1, seq_len)."""
        dropped = (~keep) if keep.dtype == torch.bool else (1.0 - keep)
        return (dropped.to(dtype) * torch.finfo(dtype).min)[:, None, None, :]

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, head_mask=None,
                encoder_hidden_states=None, encoder_attention_mask=None, past_key_values=None, use_cache=None,
                output_attentions: bool = False, output_hidden_states: bool = False, return_dict: bool = True,
                cache_position=None):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        valid = self._valid(attention_mask, hidden_states)
        if self.training:
            hidden, all_hidden = self._forward_train(hidden_states, valid, output_hidden_states)
        else:
            hidden, all_hidden = self._forward_eval(hidden_states, valid), None
        if not return_dict:
            return (hidden,)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden, hidden_states=all_hidden)

    def _forward_train(self, hidden: torch.Tensor, valid: torch.Tensor, output_hidden_states: bool):
        keep = valid.to(hidden.dtype)
        cls = torch.zeros_like(keep)
        cls[:, 0] = 1.0
        stats = {"keep": [], "keep_prob": [], "masked_norm": [], "valid_tokens": float(valid.sum())}
        all_hidden = (hidden,) if output_hidden_states else None
        for layer, predictor in zip(self.layer, self.predictors):
            if isinstance(predictor, TokenKeepPredictor):
                logits = predictor(hidden)
                if self.hard_decisions:
                    hard = (logits[..., 1] > logits[..., 0]).to(hidden.dtype)
                else:
                    hard = F.gumbel_softmax(logits, tau=self.temperature, hard=True)[..., 1]
                decision = cls + (1.0 - cls) * hard  # [CLS] always kept
                keep = keep * decision
                stats["keep"].append(keep)
                stats["keep_prob"].append(torch.softmax(logits, -1)[..., 1] * valid.to(hidden.dtype))
            new = layer(hidden, self._additive(keep.detach(), hidden.dtype))[0]
            m = keep.unsqueeze(-1)
            if isinstance(predictor, TokenKeepPredictor):
                stats["masked_norm"].append((new * m).flatten(1).norm(dim=1).mean())
            hidden = m * new + (1.0 - m) * hidden
            if output_hidden_states:
                all_hidden = all_hidden + (hidden,)
        self.stats = stats
        return hidden, all_hidden

    def _forward_eval(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        positions = torch.arange(length, device=hidden.device).unsqueeze(0).expand(batch, length)
        full = hidden
        current, current_valid = hidden, valid
        kept_tokens, margins = [], []
        for layer, predictor in zip(self.layer, self.predictors):
            if isinstance(predictor, TokenKeepPredictor):
                logits = predictor(current)
                decision = logits[..., 1] > logits[..., 0]
                first = torch.zeros_like(decision)
                first[:, 0] = True
                if not torch.jit.is_tracing():  # keep-minus-drop margins of the tokens this predictor decides on
                    margins.append((logits[..., 1] - logits[..., 0])[current_valid & ~first])
                current_valid = current_valid & (decision | first)
                # Kept tokens first, in order: a unique score, sorted descending (TopK in ONNX).
                n = current_valid.shape[1]
                rank = torch.arange(n, device=hidden.device).unsqueeze(0)
                score = current_valid.to(torch.int64) * (2 * n) - rank
                order = torch.argsort(score, dim=1, descending=True)
                k = current_valid.sum(1).max()
                index = order.gather(1, torch.arange(k, device=hidden.device).unsqueeze(0).expand(batch, -1))
                current = current.gather(1, index.unsqueeze(-1).expand(-1, -1, width))
                current_valid = current_valid.gather(1, index)
                positions = positions.gather(1, index)
                if not torch.jit.is_tracing():
                    kept_tokens.append(float(current_valid.sum()))
            current = layer(current, self._additive(current_valid, hidden.dtype))[0]
            if self.restore_positions:
                spread = positions.unsqueeze(-1).expand(-1, -1, width)
                previous = full.gather(1, spread)
                full = full.scatter(1, spread, torch.where(current_valid.unsqueeze(-1), current, previous))
        if not torch.jit.is_tracing():
            self.stats = {"kept_tokens": kept_tokens, "valid_tokens": float(valid.sum()), "margins": margins,
                          "rows": float(valid.shape[0])}
        if self.restore_positions:
            return full
        return current

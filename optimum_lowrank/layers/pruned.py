"""Stand-ins for transformer sublayers removed entirely by structured pruning.

When every head of an attention block (or every intermediate dimension of a
feed-forward block) is pruned, what is left of the residual branch is the output
projection's bias; these modules compute ``LayerNorm(input + bias)`` with the
signatures of the BERT modules they replace, so the layer around them runs as before.
:class:`BiasOnlyMLP` stands in for a Llama-style MLP (no LayerNorm of its own).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BiasOnlyAttention", "BiasOnlyMLP", "BiasOnlyOutput", "PassThrough"]


class _BiasLayerNorm(nn.Module):
    """``LayerNorm(residual + bias)``: what is left of a residual branch whose sublayer was pruned away.

    Parameters
    ----------
    bias : Tensor, shape (hidden_size,)
    layer_norm : nn.LayerNorm
    """

    def __init__(self, bias: torch.Tensor, layer_norm: nn.LayerNorm) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.LayerNorm = layer_norm

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"bias": self.bias, "layer_norm": self.LayerNorm}


class BiasOnlyAttention(_BiasLayerNorm):
    """Replaces a ``BertAttention`` whose heads were all pruned.

    Parameters
    ----------
    bias : Tensor, shape (hidden_size,)
        What the attention branch still adds (the folded output-projection bias).
    layer_norm : nn.LayerNorm
        The block's post-residual LayerNorm (kept as is).

    ``forward(hidden_states, *args, **kwargs) -> (LayerNorm(hidden_states + bias),)``,
    shape (batch, seq_len, hidden_size).
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        return (self.LayerNorm(hidden_states + self.bias),)


class PassThrough(nn.Module):
    """Replaces a ``BertIntermediate`` whose dimensions were all pruned: returns its input unchanged."""

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


class BiasOnlyOutput(_BiasLayerNorm):
    """Replaces a ``BertOutput`` whose intermediate dimensions were all pruned.

    ``forward(intermediate, input_tensor) -> LayerNorm(input_tensor + bias)``; the first
    argument (what :class:`PassThrough` returned) is ignored.
    """

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(input_tensor + self.bias)


class BiasOnlyMLP(nn.Module):
    """Replaces a Llama-style MLP (``down(act(gate(x)) * up(x))``) whose intermediate dimensions were all pruned.

    Parameters
    ----------
    bias : Tensor, shape (hidden_size,)
        What the branch still adds: the folded ``down_proj`` bias (zeros when it had none).

    ``forward(x) -> zeros_like(x) + bias``, shape (batch, seq_len, hidden_size): the decoder
    layer adds it to the residual stream, so a zero bias makes the layer's MLP half a no-op.
    """

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def layer_config(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (see :mod:`optimum_lowrank.saving`)."""
        return {"bias": self.bias}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states) + self.bias

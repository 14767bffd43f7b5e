"""Hard-concrete gates installed on BERT layers (and, through
:mod:`~optimum_lowrank.passes.pruning.decoder`, on Llama-like decoder layers), their
expected size, and the physical removal of what they close.

Gates per BERT layer (CoFi's structure, without hidden dimensions):

- one per attention head, applied to that head's slice of the attention context;
- one per FFN intermediate dimension, applied after the activation;
- optionally one for the whole attention block and one for the whole FFN block,
  applied to the block's output projection (bias included).

:func:`remove_closed` folds the inference gate values into the output projections
(``W[:, unit] *= z``), so the pruned model computes exactly what the gated model
computes, and then deletes the closed heads and dimensions (smaller matrices, fewer
heads per layer); a block with nothing left becomes a bias-only stand-in
(:mod:`optimum_lowrank.layers.pruned`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers.pruned import BiasOnlyAttention, BiasOnlyOutput, PassThrough
from optimum_lowrank.passes.pruning.decoder import DECODER_LAYERS, decoder_sizes, gate_decoder, keep_columns, keep_rows, remove_decoder
from optimum_lowrank.passes.pruning.hard_concrete import HardConcrete

__all__ = ["LayerGates", "expected_sparsity", "install_gates", "remove_closed", "set_gate_values"]

#: Encoder layer classes this pass knows how to gate and shrink.
ENCODER_LAYERS = ("BertLayer",)
#: Every layer class this pass knows how to gate and shrink (encoders, then Llama-like decoders).
SUPPORTED_LAYERS = ENCODER_LAYERS + DECODER_LAYERS


@dataclass
class LayerGates:
    """The gates of one layer and the hooks that apply them.

    Attributes
    ----------
    name : str
        Qualified name of the layer.
    heads, intermediate : HardConcrete
        Sizes (num_heads,) and (intermediate_size,); on a decoder layer ``heads`` has one
        gate per query-head slot, size (num_attention_heads / num_key_value_heads,).
    mha, ffn : HardConcrete or None
        One gate each for the whole blocks (``prune_sublayers``); a decoder layer has no ``mha``.
    values : dict
        The gate values the hooks apply now (set by :func:`set_gate_values`).
    """

    name: str
    layer: nn.Module
    heads: HardConcrete | None = None
    intermediate: HardConcrete | None = None
    mha: HardConcrete | None = None
    ffn: HardConcrete | None = None
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    @property
    def decoder(self) -> bool:
        return type(self.layer).__name__ in DECODER_LAYERS

    def modules(self) -> list[HardConcrete]:
        return [g for g in (self.heads, self.intermediate, self.mha, self.ffn) if g is not None]

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _check_layer(name: str, layer: nn.Module) -> tuple[int, int, int, int]:
    """(hidden, heads, head_dim, intermediate) of a plain BERT layer, or PassError."""
    if type(layer).__name__ not in ENCODER_LAYERS:
        raise PassError(f"{name}: structured_prune supports {', '.join(ENCODER_LAYERS)} layers (encoders) and "
                        f"{', '.join(DECODER_LAYERS)} layers (Llama-like decoders), got {type(layer).__name__}")
    attn = getattr(layer.attention, "self", None)
    if attn is None or not isinstance(getattr(layer, "intermediate", None), nn.Module) or not hasattr(layer.intermediate, "dense"):
        raise PassError(f"{name}: already pruned or modified (no attention.self / intermediate.dense); prune an unpruned model")
    if getattr(layer.attention, "pruned_heads", None):
        raise PassError(f"{name}: heads {sorted(layer.attention.pruned_heads)} were already pruned; prune an unpruned model")
    return layer.attention.output.dense.out_features, attn.num_attention_heads, attn.attention_head_size, layer.intermediate.dense.out_features


def install_gates(layers: dict[str, nn.Module], droprate_init: float, sublayers: bool) -> list[LayerGates]:
    """Create gates for each layer and register the forward hooks that apply ``values``.

    Raises
    ------
    PassError
        If a layer is not a plain BERT or Llama-like layer (see :data:`SUPPORTED_LAYERS`).
    """
    out = []
    for name, layer in layers.items():
        if type(layer).__name__ in DECODER_LAYERS:
            gates = LayerGates(name, layer)
            gates.heads, gates.intermediate, gates.mha, gates.ffn = gate_decoder(gates, droprate_init, sublayers)
            out.append(gates)
            continue
        _, heads, head_dim, inter = _check_layer(name, layer)
        gates = LayerGates(name, layer, HardConcrete(heads, droprate_init), HardConcrete(inter, droprate_init),
                           HardConcrete(1, droprate_init) if sublayers else None,
                           HardConcrete(1, droprate_init) if sublayers else None)

        def on_context(module, args, output, g=gates, h=heads, d=head_dim):
            context = output[0]
            z = g.values.get("heads")
            if z is None:
                return output
            shape = context.shape
            context = (context.view(*shape[:-1], h, d) * z.view(h, 1)).view(shape)
            return (context, *output[1:])

        def scale(name_: str, g=gates):
            def hook(module, args, output):
                z = g.values.get(name_)
                return output if z is None else output * z
            return hook

        gates.handles += [
            layer.attention.self.register_forward_hook(on_context),
            layer.intermediate.register_forward_hook(scale("intermediate")),
        ]
        if sublayers:
            gates.handles += [
                layer.attention.output.dense.register_forward_hook(scale("mha")),
                layer.output.dense.register_forward_hook(scale("ffn")),
            ]
        out.append(gates)
    return out


def set_gate_values(all_gates: list[LayerGates], mode: str, generator: torch.Generator | None = None) -> None:
    """Set what the hooks apply: ``"sample"`` (training), ``"deterministic"`` (inference) or ``"off"``."""
    for gates in all_gates:
        gates.values = {}
        if mode == "off":
            continue
        for key in ("heads", "intermediate", "mha", "ffn"):
            gate = getattr(gates, key)
            if gate is not None:
                gates.values[key] = gate.sample(generator) if mode == "sample" else gate.deterministic()


def expected_sparsity(all_gates: list[LayerGates]) -> torch.Tensor:
    """Expected fraction of the gated layers' attention and FFN weights removed, in [0, 1].

    Per BERT layer, each head holds ``4 * hidden * head_dim`` weights (Q, K, V, output) and
    each intermediate dimension ``2 * hidden``; a head counts with ``P(head open) *
    P(block open)``. Biases and LayerNorms are ignored (as in CoFi). Decoder layers: see
    :func:`~optimum_lowrank.passes.pruning.decoder.decoder_sizes`.
    """
    full, kept = 0.0, 0.0
    for g in all_gates:
        if g.decoder:
            layer_full, layer_kept = decoder_sizes(g)
            full, kept = full + layer_full, kept + layer_kept
            continue
        hidden, heads, head_dim, inter = _check_layer(g.name, g.layer)
        per_head, per_dim = 4 * hidden * head_dim, 2 * hidden
        full += heads * per_head + inter * per_dim
        mha = g.mha.prob_open()[0] if g.mha is not None else 1.0
        ffn = g.ffn.prob_open()[0] if g.ffn is not None else 1.0
        kept = kept + mha * g.heads.prob_open().sum() * per_head + ffn * g.intermediate.prob_open().sum() * per_dim
    return 1.0 - kept / full


@torch.no_grad()
def remove_closed(all_gates: list[LayerGates]) -> list[dict]:
    """Fold the inference gate values into the weights and delete closed units (in place).

    Removes the hooks first. Returns one dict per layer: ``heads_kept``,
    ``heads_total``, ``intermediate_kept``, ``intermediate_total``, ``mha_removed``, ``ffn_removed``.
    """
    summary = []
    for g in all_gates:
        g.remove_hooks()
        if g.decoder:
            summary.append(remove_decoder(g))
            continue
        layer = g.layer
        _, heads, head_dim, inter = _check_layer(g.name, layer)
        z_heads = g.heads.deterministic()
        z_mha = g.mha.deterministic()[0] if g.mha is not None else torch.tensor(1.0)
        z_int = g.intermediate.deterministic()
        z_ffn = g.ffn.deterministic()[0] if g.ffn is not None else torch.tensor(1.0)

        out_proj = layer.attention.output.dense
        out_proj.weight.mul_((z_heads * z_mha).repeat_interleave(head_dim).view(1, -1))
        out_proj.bias.mul_(z_mha)
        closed = [h for h in range(heads) if float(z_heads[h] * z_mha) == 0.0]
        if len(closed) == heads:
            layer.attention = BiasOnlyAttention(out_proj.bias, layer.attention.output.LayerNorm)
        else:
            layer.attention.prune_heads(closed)

        down = layer.output.dense
        down.weight.mul_((z_int * z_ffn).view(1, -1))
        down.bias.mul_(z_ffn)
        keep = torch.nonzero(z_int * z_ffn).flatten()
        if keep.numel() == 0:
            layer.intermediate = PassThrough()
            layer.output = BiasOnlyOutput(down.bias, layer.output.LayerNorm)
        elif keep.numel() < inter:
            up = layer.intermediate.dense
            layer.intermediate.dense = keep_rows(up, keep)
            layer.output.dense = keep_columns(down, keep)
        summary.append({
            "heads_kept": heads - len(closed), "heads_total": heads,
            "intermediate_kept": int(keep.numel()), "intermediate_total": inter,
            "mha_removed": len(closed) == heads, "ffn_removed": keep.numel() == 0,
        })
    return summary


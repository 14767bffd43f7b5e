"""Hard-concrete gates on Llama-like decoder layers (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``).

Gates per layer:

- **query-head slots**: one gate per slot ``j`` in ``0 .. n_rep - 1`` (``n_rep =
  num_attention_heads / num_key_value_heads``); slot ``j`` is query head ``j`` of every
  key/value group (query head ``g * n_rep + j``). Closing a slot removes those query
  heads (rows of ``q_proj``, columns of ``o_proj``) and lowers the attention module's
  ``num_key_value_groups`` by one. Every layer keeps all its key/value heads and every
  group the same number of query heads, so grouped-query attention stays regular and
  the key/value cache keeps the shape ``config.num_key_value_heads`` gives every layer
  (what Optimum's ``text-generation-with-past`` export builds ``past_key_values``
  from). A layer whose slots all close keeps one slot whose ``o_proj`` columns are 0:
  the attention adds nothing, yet the layer still writes its keys and values to the cache.
- **FFN intermediate dimensions**: one gate per unit, applied to the input of
  ``down_proj`` (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``);
- optionally (``prune_sublayers``) one gate for the whole MLP, applied to its output;
  an MLP with nothing left becomes :class:`~optimum_lowrank.layers.pruned.BiasOnlyMLP`.

:func:`remove_decoder` folds the inference gate values into ``o_proj`` and ``down_proj``
(and the MLP gate into ``down_proj``'s bias, if any), so the pruned layer computes exactly
what the gated layer computed.
"""

from __future__ import annotations

import torch
from torch import nn

from optimum_lowrank.errors import PassError
from optimum_lowrank.layers.pruned import BiasOnlyMLP
from optimum_lowrank.passes.pruning.hard_concrete import HardConcrete

__all__ = ["DECODER_LAYERS", "decoder_shape", "decoder_sizes", "gate_decoder", "keep_columns", "keep_rows", "remove_decoder"]

#: Decoder layer classes with Llama's attention / MLP structure.
DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")


def decoder_shape(name: str, layer: nn.Module) -> tuple[int, int, int, int, int]:
    """``(hidden, kv_heads, n_rep, head_dim, intermediate)`` of an unpruned Llama-like layer, or PassError."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    projections = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections) or not hasattr(attn, "num_key_value_groups"):
        raise PassError(f"{name}: expected a Llama-like layer (self_attn.q/k/v/o_proj and mlp.gate/up/down_proj as "
                        f"nn.Linear, self_attn.num_key_value_groups); already pruned or compressed? prune an unpruned model")
    config = attn.config
    head_dim = attn.head_dim
    kv_heads = attn.k_proj.out_features // head_dim
    n_rep = attn.num_key_value_groups
    inter = mlp.gate_proj.out_features
    if (kv_heads != config.num_key_value_heads or n_rep * kv_heads != config.num_attention_heads
            or attn.q_proj.out_features != n_rep * kv_heads * head_dim or inter != config.intermediate_size):
        raise PassError(f"{name}: its heads or FFN dimensions differ from the model config (already pruned?); prune an unpruned model")
    return attn.o_proj.out_features, kv_heads, n_rep, head_dim, inter


def gate_decoder(gates, droprate_init: float, sublayers: bool) -> tuple[HardConcrete, HardConcrete, None, HardConcrete | None]:
    """The gates of one decoder layer, ``(slots, intermediate, None, mlp)``, with hooks added to ``gates.handles``.

    ``gates`` is the :class:`~optimum_lowrank.passes.pruning.structure.LayerGates` being
    built (its ``values`` are read by the hooks at run time).
    """
    _, kv_heads, n_rep, head_dim, inter = decoder_shape(gates.name, gates.layer)
    layer = gates.layer

    def on_heads(module, args):
        z = gates.values.get("heads")
        if z is None:
            return None
        x = args[0]
        shape = x.shape
        x = (x.view(*shape[:-1], kv_heads, n_rep, head_dim) * z.view(n_rep, 1)).view(shape)
        return (x, *args[1:])

    def on_intermediate(module, args):
        z = gates.values.get("intermediate")
        return None if z is None else (args[0] * z, *args[1:])

    def on_mlp(module, args, output):
        z = gates.values.get("ffn")
        return output if z is None else output * z

    gates.handles += [
        layer.self_attn.o_proj.register_forward_pre_hook(on_heads),
        layer.mlp.down_proj.register_forward_pre_hook(on_intermediate),
    ]
    if sublayers:
        gates.handles.append(layer.mlp.register_forward_hook(on_mlp))
    return (HardConcrete(n_rep, droprate_init), HardConcrete(inter, droprate_init), None,
            HardConcrete(1, droprate_init) if sublayers else None)


def decoder_sizes(gates) -> tuple[float, torch.Tensor]:
    """``(weights, expected weights kept)`` of one decoder layer's attention + MLP projections.

    A query-head slot holds ``2 * hidden * head_dim * kv_heads`` weights (its rows of
    ``q_proj``, its columns of ``o_proj``), an FFN dimension ``3 * hidden``; ``k_proj`` and
    ``v_proj`` (never removed) count as always kept.
    """
    hidden, kv_heads, n_rep, head_dim, inter = decoder_shape(gates.name, gates.layer)
    per_slot, per_dim, fixed = 2 * hidden * head_dim * kv_heads, 3 * hidden, 2 * hidden * head_dim * kv_heads
    ffn = gates.ffn.prob_open()[0] if gates.ffn is not None else 1.0
    kept = fixed + gates.heads.prob_open().sum() * per_slot + ffn * gates.intermediate.prob_open().sum() * per_dim
    return float(fixed + n_rep * per_slot + inter * per_dim), kept


@torch.no_grad()
def remove_decoder(gates) -> dict:
    """Fold the inference gates of one decoder layer into its weights and delete the closed units (in place).

    Returns the layer's summary: ``heads_kept`` / ``heads_total`` (query heads),
    ``intermediate_kept`` / ``intermediate_total``, ``mha_removed`` (every slot closed:
    the attention's output is 0), ``ffn_removed``.
    """
    layer = gates.layer
    _, kv_heads, n_rep, head_dim, inter = decoder_shape(gates.name, layer)
    attn, mlp = layer.self_attn, layer.mlp
    z_slots = gates.heads.deterministic()
    open_slots = [j for j in range(n_rep) if float(z_slots[j]) != 0.0]
    kept_slots = open_slots or [int(torch.argmax(gates.heads.log_alpha))]  # one zeroed slot keeps the KV cache layout
    heads = [g * n_rep + j for g in range(kv_heads) for j in kept_slots]
    units = torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)])
    scale = z_slots.repeat(kv_heads).repeat_interleave(head_dim)  # per column of o_proj, head g * n_rep + j -> z[j]
    attn.o_proj.weight.mul_(scale.view(1, -1))
    if len(kept_slots) < n_rep:
        attn.q_proj = keep_rows(attn.q_proj, units)
        attn.o_proj = keep_columns(attn.o_proj, units)
        attn.num_key_value_groups = len(kept_slots)

    z_int = gates.intermediate.deterministic()
    z_ffn = gates.ffn.deterministic()[0] if gates.ffn is not None else torch.tensor(1.0)
    down = mlp.down_proj
    down.weight.mul_((z_int * z_ffn).view(1, -1))
    if down.bias is not None:
        down.bias.mul_(z_ffn)
    keep = torch.nonzero(z_int * z_ffn).flatten()
    if keep.numel() == 0:
        bias = down.bias if down.bias is not None else torch.zeros(down.out_features, dtype=down.weight.dtype)
        layer.mlp = BiasOnlyMLP(bias)
    elif keep.numel() < inter:
        mlp.gate_proj = keep_rows(mlp.gate_proj, keep)
        mlp.up_proj = keep_rows(mlp.up_proj, keep)
        mlp.down_proj = keep_columns(down, keep)
        mlp.intermediate_size = int(keep.numel())
    return {
        "heads_kept": kv_heads * len(open_slots), "heads_total": kv_heads * n_rep,
        "intermediate_kept": int(keep.numel()), "intermediate_total": inter,
        "mha_removed": not open_slots, "ffn_removed": keep.numel() == 0,
    }


def keep_rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """A new Linear with the output units (rows) ``keep`` of ``linear``, same dtype."""
    new = nn.Linear(linear.in_features, keep.numel(), bias=linear.bias is not None, dtype=linear.weight.dtype)
    new.weight.copy_(linear.weight[keep])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[keep])
    return new


def keep_columns(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """A new Linear with the input units (columns) ``keep`` of ``linear`` and its whole bias, same dtype."""
    new = nn.Linear(keep.numel(), linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
    new.weight.copy_(linear.weight[:, keep])
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new

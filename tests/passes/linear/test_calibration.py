"""Streaming calibration statistics and output sensitivity of linear layers.

Tiny random models and random calibration ids (seconds, no real data).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from optimum_lowrank.errors import DataError
from optimum_lowrank.passes.linear.calibration import collect_input_statistics, collect_output_sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")


def test_streaming_statistics_match_a_direct_computation(tiny_llama, llama_ids):
    targets = {n: m for n, m in tiny_llama.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "down_proj"))}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].detach().clone())) for n, m in targets.items()]
    with torch.no_grad():
        for row in llama_ids:
            tiny_llama(row[None], use_cache=False)
    for h in handles:
        h.remove()

    stats = collect_input_statistics(tiny_llama, targets, llama_ids, kind="decoder", gram=True, abs_mean=True, batch_size=4)
    for name, module in targets.items():
        x = torch.cat(seen[name]).reshape(-1, module.in_features).double()
        assert stats[name].count == llama_ids.numel()
        gram = x.t() @ x  # float64 here; the hook multiplies each batch in float32 and sums batches in float64
        assert stats[name].gram.dtype == torch.float64
        assert_close(stats[name].gram, gram, rtol=1e-5, atol=1e-6 * float(gram.abs().max()))
        assert_close(stats[name].abs_mean, x.abs().mean(0), rtol=1e-6, atol=1e-8)
    # q/k/v read the same tensor: one statistics object, computed once
    layer0 = "model.layers.0.self_attn."
    assert stats[layer0 + "q_proj"] is stats[layer0 + "k_proj"] is stats[layer0 + "v_proj"]
    assert stats[layer0 + "q_proj"] is not stats["model.layers.1.self_attn.q_proj"]
    # the hooks are gone and only sums are kept (no activation tensors)
    assert all(not m._forward_pre_hooks for m in targets.values())
    for value in stats.values():
        assert value.gram.shape == (value.in_features, value.in_features)


def test_sensitivity_is_positive_and_leaves_the_model_alone(tiny_llama, llama_ids):
    targets = {n: m for n, m in tiny_llama.named_modules() if n.endswith("_proj")}
    flags = [p.requires_grad for p in tiny_llama.parameters()]
    sens = collect_output_sensitivity(tiny_llama, targets, llama_ids[:2], kind="decoder")
    assert set(sens) == set(targets) and all(v > 0 for v in sens.values())
    assert [p.requires_grad for p in tiny_llama.parameters()] == flags
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert all(not m._forward_hooks for m in targets.values())


def test_calibration_ids_must_be_2d_integers(tiny_llama):
    targets = {"model.layers.0.mlp.up_proj": tiny_llama.model.layers[0].mlp.up_proj}
    with pytest.raises(DataError, match="non-empty"):
        collect_input_statistics(tiny_llama, targets, torch.zeros(0, 8, dtype=torch.long), kind="decoder")

"""The activation_svd pass (ASVD, SVD-LLM) on tiny Llama and GPT-2.

Tiny random models and random calibration ids (seconds, no real data).
"""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.layers import LowRankLinear
from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
from optimum_lowrank.plugins import get_registry
from tests.helpers import LLAMA_TARGETS, decoder_context

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", ["svd_llm", "asvd"])
def test_activation_svd_pass_on_llama(tiny_llama, llama_ids, method):
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = tiny_llama(ids).logits
    reports = ActivationSVDPass(ActivationSVDConfig(targets=LLAMA_TARGETS, method=method, rank_ratio=0.25)).run(
        tiny_llama, decoder_context(llama_ids)
    )
    assert len(reports) == 14
    assert all(isinstance(tiny_llama.get_submodule(r.name), LowRankLinear) for r in reports if r.action == "factorized")
    with torch.no_grad():
        assert tiny_llama(ids).logits.shape == expected.shape


def test_activation_svd_on_gpt2_conv1d(tiny_gpt2):
    ids = torch.randint(0, 100, (4, 16))
    reports = ActivationSVDPass(ActivationSVDConfig(targets=["transformer.h.*.mlp.c_fc"], rank=4)).run(tiny_gpt2, decoder_context(ids))
    assert [r.module_type for r in reports] == ["Conv1D", "Conv1D"] and all(r.rank == 4 for r in reports)


def test_rank_that_would_grow_is_skipped_or_refused(tiny_llama, llama_ids):
    context = decoder_context(llama_ids)
    reports = ActivationSVDPass(ActivationSVDConfig(targets=["model.layers.0.self_attn.q_proj"], rank_ratio=1.0)).run(
        copy.deepcopy(tiny_llama), context
    )
    assert reports[0].action == "skipped" and "would not reduce" in reports[0].note
    with pytest.raises(PassError, match="rank 20 would not reduce a 32x32 layer"):
        ActivationSVDPass(ActivationSVDConfig(targets=["model.layers.0.self_attn.q_proj"], rank=20)).run(tiny_llama, context)


def test_too_few_calibration_windows_is_a_data_error(tiny_llama, llama_ids):
    config = ActivationSVDConfig(targets=LLAMA_TARGETS, rank=2, num_samples=100)
    with pytest.raises(DataError, match="num_samples=100 .* only 6 windows"):
        ActivationSVDPass(config).run(tiny_llama, decoder_context(llama_ids))


def test_passes_are_registered():
    names = get_registry().names()
    assert {"svd", "activation_svd", "softlm"} <= set(names)

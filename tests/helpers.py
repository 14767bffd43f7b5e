"""Plain helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from optimum_lowrank.api import PassContext

LLAMA_TARGETS = ["re:model\\.layers\\.\\d+\\..*_proj"]
SOFTLM_TOLERANCE = 0.02  # softlm ends within 2 percentage points below its budget, never above

# q_proj of the tiny Llama is 32x32: break-even rank 16; rank 15 saves 6.25% of the weights (< 10%), rank 14 saves 12.5%.
ZONE_RANK, SAVING_RANK = 15, 14


class WordTokenizer:
    """'w17' -> 17 (mod 128); enough of a tokenizer for token_windows and the pipeline."""

    bos_token_id = None

    def __call__(self, text, **_):
        return {"input_ids": [int(word[1:]) % 128 for word in text.split()]}


def decoder_context(ids: torch.Tensor) -> PassContext:
    return PassContext(kind="decoder", calibration_loader=lambda: ids)


def correlated_inputs(n_tokens: int = 2000, features: int = 24, seed: int = 0) -> torch.Tensor:
    """Tokens (n_tokens, features) with correlated channels of very different scales."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) * torch.logspace(-2, 1, features)[:, None]
    return torch.randn(n_tokens, features, generator=g) @ mixing


def params_ratio(reports) -> float:
    return sum(r.params_after for r in reports) / sum(r.params_before for r in reports)

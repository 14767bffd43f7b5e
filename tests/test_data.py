"""Calibration text windows.

Tiny random models and random calibration ids (seconds, no real data).
"""

from __future__ import annotations

import pytest

from optimum_lowrank.api import PassContext
from optimum_lowrank.errors import DataError
from optimum_lowrank.passes.linear.activation_svd import ActivationSVDConfig, ActivationSVDPass
from tests.helpers import LLAMA_TARGETS, WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_short_calibration_text_raises_data_error_from_token_windows(tiny_llama):
    from optimum_lowrank.data import token_windows

    class Tok:
        def __call__(self, text, **_):
            return {"input_ids": list(range(len(text.split())))}

    context = PassContext(kind="decoder", calibration_loader=lambda: token_windows(Tok(), "too short", 128, 4))
    with pytest.raises(DataError, match="fewer than one window"):
        ActivationSVDPass(ActivationSVDConfig(targets=LLAMA_TARGETS, rank=2)).run(tiny_llama, context)


def test_token_windows_strict_names_how_many_windows_the_text_gives():
    from optimum_lowrank.data import token_windows

    text = " ".join(f"w{i}" for i in range(56))  # 56 tokens: 7 windows of 8
    assert token_windows(WordTokenizer(), text, 8, 10).shape == (7, 8)  # lenient: fewer, silently
    assert token_windows(WordTokenizer(), text, 8, 7, strict=True).shape == (7, 8)
    with pytest.raises(DataError, match="asked for 10 windows of 8 tokens .* 56 tokens: only 7 windows"):
        token_windows(WordTokenizer(), text, 8, 10, strict=True)

"""Decoding speed measurement: the cached greedy loop decodes exactly what full forward passes do."""

from __future__ import annotations

import numpy as np
import pytest

from optimum_lowrank.errors import ExportError
from optimum_lowrank.exporters.latency import measure_decode
from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
from optimum_lowrank.exporters.runtime import feeds_for_input_ids, make_session


def test_cached_greedy_decoding_matches_full_forward_passes(tiny_llama, tmp_path):
    path = export_onnx(tiny_llama, tmp_path / "onnx", onnx_task(tiny_llama))
    prompt = np.random.default_rng(0).integers(0, 128, (1, 10))
    result = measure_decode(path, prompt, new_tokens=6, threads=1)
    assert result.new_tokens == 6 and result.tokens_per_second > 0 and result.prefill_ms > 0
    session = make_session(path)
    sequence = np.concatenate([prompt, np.array([result.generated[:-1]])], axis=1)
    logits = session.run(["logits"], feeds_for_input_ids(session, sequence))[0]
    assert logits[0, prompt.shape[1] - 1 :].argmax(-1).tolist() == result.generated
    assert "generated" not in result.to_dict()


def test_decoding_needs_a_graph_with_past(tiny_bert, tmp_path):
    path = export_onnx(tiny_bert, tmp_path / "onnx", onnx_task(tiny_bert))
    with pytest.raises(ExportError, match="past_key_values"):
        measure_decode(path, np.zeros((1, 4), dtype=np.int64), 2)

"""Harmless third-party export messages are held back and summarised in one line; anything else passes through."""

from __future__ import annotations

import logging
import warnings

import torch

from optimum_lowrank.exporters.noise import ExportNoise, held_back


def test_tolerance_lines_and_tracer_warnings_are_held_back_other_messages_pass(capsys, caplog):
    noise = ExportNoise()
    logger = logging.getLogger("optimum.exporters.onnx.convert")
    shown = []
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
    try:
        with caplog.at_level(logging.WARNING), held_back(noise):
            for i in range(3):
                logger.error("\t\t-[x] values not close enough, max diff: 0.0%d (atol: 1e-05)", i + 1)
            logger.warning("The ONNX export succeeded with the warning: The maximum absolute difference ... "
                           "is not within the set tolerance 1e-05:\n- logits: max diff = 0.01")
            logger.warning("something else from optimum")
            warnings.warn("Converting a tensor to a Python boolean might cause the trace to be incorrect", torch.jit.TracerWarning)
            warnings.warn("a user warning that is not ours to hide", UserWarning)
    finally:
        warnings.showwarning = previous
    assert len(noise.tolerance) == 4 and len(noise.tracer) == 1
    assert noise.tolerance[0] == "-[x] values not close enough, max diff: 0.01 (atol: 1e-05)"
    assert [r.getMessage() for r in caplog.records] == ["something else from optimum"], "only the tolerance lines are held back"
    assert shown == ["a user warning that is not ours to hide"]
    summary = noise.summary("this project's parity check passed (max |diff| 2.0e-07)")
    assert summary == ("held back 5 third-party export messages judged harmless (4 from Optimum's own output check at atol 1e-05, "
                       "1 torch TracerWarning); this project's parity check passed (max |diff| 2.0e-07)")
    assert noise.details(limit=2).splitlines() == [
        "optimum: -[x] values not close enough, max diff: 0.01 (atol: 1e-05)",
        "optimum: -[x] values not close enough, max diff: 0.02 (atol: 1e-05)",
        "... 3 more",
    ]
    assert ExportNoise().summary("x") is None and not ExportNoise()
    logger.error("\t\t-[x] values not close enough, max diff: 1 (atol: 1e-05)")
    assert len(noise.tolerance) == 4, "nothing is held back after the block"


def test_a_failed_parity_check_shows_what_was_held_back(tiny_bert, tmp_path, monkeypatch):
    import pytest

    import optimum_lowrank.exporters.parity as parity
    from optimum_lowrank import optimize
    from optimum_lowrank.errors import ExportError
    from optimum_lowrank.exporters import onnx as onnx_export
    from tests.helpers import WordTokenizer

    real_export, real_check = onnx_export.export_onnx, parity.check_parity

    def noisy_export(*args, noise=None, **kwargs):
        with held_back(noise):
            logging.getLogger("optimum.exporters.onnx.convert").error("\t\t-[x] values not close enough, max diff: 3 (atol: 1e-05)")
        return real_export(*args, noise=noise, **kwargs)

    def failing_check(*args, **kwargs):
        result = real_check(*args, **kwargs)
        result.passed = False
        return result

    monkeypatch.setattr(onnx_export, "export_onnx", noisy_export)
    monkeypatch.setattr(parity, "check_parity", failing_check)
    recipe = {"version": 1, "export": {"quantize": "none", "latency": None, "baseline_int8": False}}
    with pytest.raises(ExportError, match=r"(?s)third-party messages during the export:\noptimum: -\[x\] values not close enough, max diff: 3"):
        optimize(tiny_bert, recipe, tmp_path / "o", tokenizer=WordTokenizer(), progress=False)

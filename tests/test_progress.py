"""One progress mechanism: tqdm bars for loops, step lines for the pipeline's steps."""

from __future__ import annotations

import re

import pytest

from optimum_lowrank.progress import Progress, bar, silenced

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bar_goes_to_stderr_and_is_off_when_asked(capsys):
    shown = bar(range(3), desc="shown", unit="batch", enabled=True)
    assert list(shown) == [0, 1, 2] and shown.n == 3
    captured = capsys.readouterr()
    assert captured.out == "" and "shown:" in captured.err and "batch" in captured.err
    off = bar(total=3, desc="hidden", enabled=False)
    assert off.disable
    off.update(1), off.set_postfix(loss=1.0), off.close()
    assert list(bar([1, 2], desc="hidden", enabled=False)) == [1, 2]
    assert "hidden" not in capsys.readouterr().err


def test_silenced_turns_every_bar_off_and_is_undone():
    with silenced():
        assert bar(total=1, desc="x", enabled=True).disable
        with silenced(False):
            assert bar(total=1, desc="x", enabled=True).disable, "an inner block cannot turn bars back on"
    with silenced(False):
        assert not bar(total=1, desc="x", enabled=True).disable
    assert not bar(total=1, desc="x", enabled=True).disable


def test_progress_step_lines(capsys):
    with Progress(True).step("exporting ONNX"):
        pass
    with Progress(False).step("quiet"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[optimum-lowrank] exporting ONNX ..."
    assert re.fullmatch(r"\[optimum-lowrank\] exporting ONNX: done in \d+\.\d s", lines[1])
    assert len(lines) == 2


def test_softlm_progress_is_a_bar_with_the_running_figures(tiny_llama, llama_ids, capsys, monkeypatch):
    import optimum_lowrank.passes.linear.softlm as softlm
    from tests.helpers import LLAMA_TARGETS, decoder_context

    bars = []
    monkeypatch.setattr(softlm, "bar", lambda *args, **kwargs: bars.append(bar(*args, **kwargs)) or bars[-1])
    config = softlm.SoftLMConfig(targets=LLAMA_TARGETS, target_params_ratio=0.7, steps=3, basis="svd", tau_init="zero", progress=True)
    softlm.SoftLMPass(config).run(tiny_llama, decoder_context(llama_ids))
    [steps] = bars
    assert steps.n == steps.total == 3
    assert re.fullmatch(r"hard_ratio=\d\.\d{4}, loss=\d+\.\d{4}, soft_ratio=\d\.\d{4}", steps.postfix)
    err = capsys.readouterr().err
    assert "softlm:" in err and "[optimum-lowrank] softlm step" not in err, "a bar on stderr, no print lines"

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


def test_quiet_prints_no_bars_and_no_step_lines(tmp_path, capsys):
    """``optimize`` shows step lines and bars (svd's per-layer bar, evaluation batches); ``--quiet`` none of them."""
    from transformers import BertConfig, BertModel

    from optimum_lowrank.cli import main
    from optimum_lowrank.models import load_model

    folder = tmp_path / "model"
    tokenizer = load_model("minilm").tokenizer
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\npasses:\n  - {pass: svd, targets: ['re:.*intermediate\\.dense'], rank: 4}\n"
                      "accuracy: {metric: cosine_agreement, min_cosine: 0.1, num_samples: 2, seq_len: 16}\n")
    capsys.readouterr()
    assert main(["optimize", "--model", str(folder), "--recipe", str(recipe), "--output", str(tmp_path / "a")]) == 0
    loud = capsys.readouterr().err
    assert "[optimum-lowrank] pass 1/1: svd ..." in loud and "svd:" in loud and "layer" in loud
    assert "cosine_agreement (torch):" in loud and "batch" in loud, f"the evaluation shows a bar: {loud!r}"
    assert main(["optimize", "--model", str(folder), "--recipe", str(recipe), "--output", str(tmp_path / "b"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "", f"--quiet printed {quiet.err!r}"
    assert "compression ratio" in quiet.out, "the report table still goes to stdout"

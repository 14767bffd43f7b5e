"""Faults (issue 15, finding 4): broken plugins, corrupt token-count caches, Ctrl-C and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from optimum_lowrank import hookimpl, plugins
from optimum_lowrank.cli import main
from optimum_lowrank.errors import UnknownPassError
from optimum_lowrank.recipe import load_recipe
from optimum_lowrank.vocab import token_counts


class _EntryPoint:
    def __init__(self, name: str, load):
        self.name, self._load, self.dist = name, load, None

    def load(self):
        return self._load()


def _raises_on_import():
    raise ImportError("No module named 'numpyy'")


def _misspelled_hook():
    module = types.ModuleType("typo_plugin")

    @hookimpl
    def lowrank_register_passess(register):  # the typo
        pass

    module.lowrank_register_passess = lowrank_register_passess
    return module


def _raising_hook():
    module = types.ModuleType("raising_plugin")

    @hookimpl
    def lowrank_register_passes(register):
        raise RuntimeError("boom")

    module.lowrank_register_passes = lowrank_register_passes
    return module


@pytest.fixture
def broken(monkeypatch):
    points = [_EntryPoint("numpyy", _raises_on_import), _EntryPoint("typo", _misspelled_hook), _EntryPoint("raiser", _raising_hook)]
    monkeypatch.setattr(plugins, "_entry_points", lambda: points)
    monkeypatch.setattr(plugins, "_BROKEN", {})
    plugins._collected.cache_clear()
    yield
    plugins._collected.cache_clear()


def test_broken_plugins_are_left_out_with_one_line_each(broken, capsys):
    assert main(["passes"]) == 0
    out, err = capsys.readouterr()
    assert "svd  (plugin: optimum_lowrank.passes.svd" in out
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 3 and all(line.startswith("warning: plugin ") for line in lines), err
    assert all("OPTIMUM_LOWRANK_BLOCK_PLUGINS=" in line for line in lines)
    assert any("'numpyy'" in line and "ImportError" in line for line in lines)
    assert any("'typo'" in line and "lowrank_register_passess" in line for line in lines)
    assert any("'raiser'" in line and "RuntimeError: boom" in line for line in lines)
    with pytest.raises(UnknownPassError, match="plugins not loaded: plugin 'numpyy'"):
        load_recipe("version: 1\npasses: [{pass: numpyy_pass, targets: [x]}]")


def test_blocking_a_broken_plugin_silences_it(broken, monkeypatch, capsys):
    monkeypatch.setenv("OPTIMUM_LOWRANK_BLOCK_PLUGINS", "numpyy,typo,raiser")
    assert main(["passes"]) == 0
    assert capsys.readouterr().err == ""


class _Tokenizer:
    all_special_ids = (0,)

    def get_vocab(self):
        return {f"w{i}": i for i in range(16)}

    def __len__(self):
        return 16

    def __call__(self, text, **_):
        return {"input_ids": [int(w[1:]) % 16 for w in text.split()]}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "old format", "tampered"])
def test_corrupt_token_count_cache_is_rebuilt_with_a_warning(damage, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_LOWRANK_CACHE", str(tmp_path))
    text = "w1 w2 w2 w3 w3 w3"
    first = token_counts(_Tokenizer(), text).counts
    (entry,) = (tmp_path / "token_counts").glob("*.pt")
    if damage == "garbage":
        entry.write_bytes(b"\x80\x04not a torch file")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:40])
    elif damage == "old format":
        torch.save(first, entry)
    else:
        saved = torch.load(entry, weights_only=True)
        saved["counts"][1] += 5
        torch.save(saved, entry)
    with pytest.warns(UserWarning, match="token-count cache entry .* unreadable"):
        again = token_counts(_Tokenizer(), text).counts
    assert torch.equal(again, first)
    token_counts(_Tokenizer(), text)  # the rebuilt entry reads back without a warning


_RUN = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job (CI, nohup ... &) starts with SIGINT ignored
    import optimum_lowrank.pipeline as pipeline
    from optimum_lowrank.cli import main

    def slow_load(model, tokenizer=None):
        Path(sys.argv[2]).write_text(str(os.getpid()))  # the run is under way: temp folder made
        time.sleep(60)

    import optimum_lowrank.models
    optimum_lowrank.models.load_model = slow_load
    sys.exit(main(["optimize", "--model", "x", "--recipe", "version: 1", "--output", sys.argv[1]]))
    """
)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_prints_one_line_exits_128_plus_signal_and_cleans_up(signum, code, tmp_path):
    started = tmp_path / "started"
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    (tmp_path / "tmp").mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _RUN, str(tmp_path / "out"), str(started)],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    for _ in range(600):
        if started.exists() or child.poll() is not None:
            break
        import time

        time.sleep(0.1)
    assert started.exists(), child.communicate()[1]
    child.send_signal(signum)
    try:
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()  # no-op once it has exited
    assert child.returncode == code, err
    assert err.strip().splitlines()[-1] == "error: interrupted", err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "tmp").iterdir()) == [], "the private temp folder is removed"


@pytest.mark.parametrize("content", [b'{"linear": {"4/32"', b"\xff\xfe", b"[1, 2]"])
def test_damaged_json_cache_entry_is_recomputed_with_a_warning(content, tmp_path):
    """A search cache entry cut short by a kill used to fail every later run (JSONDecodeError)."""
    from optimum_lowrank.output import read_json_cache, write_json_cache
    from optimum_lowrank.search.sensitivity import Sensitivity

    entry = tmp_path / "search" / "sens-x.json"
    entry.parent.mkdir()
    entry.write_bytes(content)
    with pytest.warns(UserWarning, match="unreadable .*recomputing"):
        assert read_json_cache(entry, Sensitivity.from_json) is None
    assert not entry.exists()
    write_json_cache(entry, {"a": 1})
    assert read_json_cache(entry) == {"a": 1} and [p.name for p in entry.parent.iterdir()] == ["sens-x.json"]

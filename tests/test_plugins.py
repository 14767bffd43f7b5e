"""Plugin discovery through pluggy: built-ins, the example third-party plugin, blocking, errors."""

from __future__ import annotations

import importlib.metadata
import inspect

import pluggy
import pytest
import torch
from torch import nn

from optimum_lowrank import hookimpl, hookspecs
from optimum_lowrank.api import PassContext
from optimum_lowrank.errors import DuplicatePassError
from optimum_lowrank.layers import LowRankLinear
from optimum_lowrank.passes.svd import SVDPass
from optimum_lowrank.pipeline import apply_passes
from optimum_lowrank.plugins import BLOCK_PLUGINS_ENV, DISABLE_AUTOLOAD_ENV, PassRegistry, get_plugin_manager
from optimum_lowrank.recipe import load_recipe


def test_example_plugin_is_installed_through_its_entry_point():
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="optimum_lowrank")}
    assert points.get("rsvd") == "optimum_lowrank_rsvd", "pip install -e examples/plugins/optimum-lowrank-rsvd (make setup does)"
    registry = PassRegistry().collect(get_plugin_manager())
    assert dict(registry.entries())["randomized_svd"].plugin == "rsvd"
    assert dict(registry.entries())["svd"].plugin == "optimum_lowrank.passes.svd"


def test_example_plugin_pass_runs_through_a_recipe(tiny_bert):
    registry = PassRegistry().collect(get_plugin_manager())
    recipe = load_recipe(
        {"version": 1, "passes": [{"pass": "randomized_svd", "targets": ["re:.*intermediate\\.dense"], "rank": 4}]}, registry
    )
    compressed, reports = apply_passes(tiny_bert, recipe, PassContext(), registry)
    assert isinstance(compressed.encoder.layer[0].intermediate.dense, LowRankLinear)
    assert isinstance(tiny_bert.encoder.layer[0].intermediate.dense, nn.Linear), "caller's model must stay untouched"
    assert reports[0].model_params_after < reports[0].model_params_before
    assert [layer.rank for layer in reports[0].layers] == [4, 4]


def test_disable_autoload_keeps_only_builtins(monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    registry = PassRegistry().collect(get_plugin_manager())
    assert "svd" in registry.names() and "randomized_svd" not in registry.names()


def test_blocked_plugin_is_not_loaded(monkeypatch):
    monkeypatch.setenv(BLOCK_PLUGINS_ENV, "rsvd, other")
    pm = get_plugin_manager()
    assert pm.is_blocked("rsvd")
    assert "randomized_svd" not in PassRegistry().collect(pm).names()


def test_duplicate_pass_id_names_both_plugins():
    class Again:
        @hookimpl
        def lowrank_register_passes(self, register):
            register(SVDPass)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Again(), name="again")
    with pytest.raises(DuplicatePassError, match="'svd' registered twice: by plugin 'optimum_lowrank.passes.svd'.*by plugin 'again'"):
        PassRegistry().collect(pm)


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def lowrank_register_pases(self, register):  # misspelled on purpose
            pass

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Typo(), name="typo")
    with pytest.raises(pluggy.PluginValidationError, match="lowrank_register_pases"):
        pm.check_pending()


def test_every_hookspec_is_documented_and_prefixed():
    specs = [obj for name, obj in vars(hookspecs).items() if inspect.isfunction(obj) and hasattr(obj, "optimum_lowrank_spec")]
    assert specs, "no hookspecs found"
    for spec in specs:
        assert spec.__name__.startswith("lowrank_")
        doc = inspect.getdoc(spec) or ""
        assert "Parameters" in doc and len(doc) > 100, f"{spec.__name__} needs a reference docstring"


def test_non_pass_registration_is_rejected():
    registry = PassRegistry()
    with pytest.raises(Exception, match="not a CompressionPass subclass"):
        registry(torch.nn.Linear)  # type: ignore[arg-type]

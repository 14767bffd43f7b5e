"""The pass contract, run on every registered pass: built-ins and the example plugin."""

from __future__ import annotations

import pytest

from optimum_lowrank.plugins import PassRegistry, get_plugin_manager
from optimum_lowrank.testing import check_pass_contract

REGISTRY = PassRegistry().collect(get_plugin_manager())


def test_example_plugin_is_part_of_the_contract_run():
    assert "randomized_svd" in REGISTRY.names()


@pytest.mark.parametrize("name", REGISTRY.names())
def test_pass_contract(name, tmp_path):
    result = check_pass_contract(REGISTRY.get(name), tmp_path)
    assert result.params_after < result.params_before
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4

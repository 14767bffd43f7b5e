"""The plugin's own test: the pass contract every built-in pass passes."""

from optimum_lowrank.testing import check_pass_contract
from optimum_lowrank_rsvd import RandomizedSVDPass


def test_contract(tmp_path):
    result = check_pass_contract(RandomizedSVDPass, tmp_path)
    assert result.params_after < result.params_before
    assert result.max_abs_diff <= 1e-4

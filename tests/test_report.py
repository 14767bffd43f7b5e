"""The report dataclasses: LayerReport is keyword-only and its action a closed set."""

from __future__ import annotations

import json

import pytest

from optimum_lowrank.report import ACTIONS, LayerReport, OptimizationReport, PassReport


def test_layer_report_action_is_a_closed_set():
    assert ACTIONS == ("factorized", "replaced", "skipped")
    for action in ACTIONS:
        assert LayerReport(name="fc", module_type="Linear", action=action, params_before=12, params_after=8).action == action
    with pytest.raises(ValueError, match="fc: unknown LayerReport action 'factorised'; allowed: factorized, replaced, skipped"):
        LayerReport(name="fc", module_type="Linear", action="factorised", params_before=12, params_after=8)


def test_layer_report_is_built_with_keywords_only():
    with pytest.raises(TypeError):
        LayerReport("fc", "Linear", "factorized", 12, 8)  # type: ignore[misc]


def test_report_serialises_layer_reports():
    layer = LayerReport(name="fc", module_type="Linear", action="skipped", params_before=12, params_after=12, rank=4, note="break-even")
    report = OptimizationReport(
        model="tiny", kind="encoder", recipe={}, params_before=100, params_after=100,
        passes=[PassReport("svd", {}, [layer], 100, 100, 0.1)],
    )
    data = json.loads(report.to_json())
    assert data["passes"][0]["layers"][0] == {
        "name": "fc", "module_type": "Linear", "action": "skipped", "params_before": 12, "params_after": 12,
        "rank": 4, "note": "break-even", "metrics": {}, "spectrum": None,
    }
    assert report.passes[0].touched == 0 and "fc: break-even" in report.table()

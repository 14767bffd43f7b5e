"""The Lagrangian sparsity controller on a toy gate problem whose dynamics match the
SST-2 runs (a target ramped over half of 200 steps, Adam at lr 0.1 on the gates and
the multipliers, a task that wants the gates open): anti-windup ends at the target,
the plain controller overshoots as the real runs did."""

from __future__ import annotations

import pytest
import torch

from optimum_lowrank.passes.pruning.hard_concrete import HardConcrete, Lagrangian
from optimum_lowrank.passes.pruning.objective import lagrangian_step

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(target: float, anti_windup: bool, steps: int = 200) -> list[float]:
    torch.manual_seed(0)
    gates, lagrangian = HardConcrete(400, droprate_init=0.05), Lagrangian(anti_windup)
    importance = torch.linspace(0.2, 2.0, 400)  # unequal units: the task keeps the important ones open
    gate_optimizer = torch.optim.AdamW([gates.log_alpha], lr=0.1, weight_decay=0.0)
    side = torch.optim.AdamW(list(lagrangian.parameters()), lr=0.1, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(gate_optimizer, lambda _: 1.0)  # constant, as the toy's dynamics need
    sparsity = []
    for step in range(steps):
        task = -(0.5 * importance * gates.sample()).mean()
        expected = 1.0 - gates.prob_open().mean()
        ramped = target * min(1.0, (step + 1) / (steps // 2))
        lagrangian_step(task + lagrangian(expected, ramped), step, "toy", (gate_optimizer, side), lagrangian, [gates.log_alpha], schedule)
        sparsity.append(float(expected.detach()))
    return sparsity


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_anti_windup_ends_at_the_target_where_the_plain_controller_overshoots(target):
    plain, reset = _train(target, anti_windup=False), _train(target, anti_windup=True)
    assert abs(reset[-1] - target) < 0.03, reset[-1]
    assert max(reset[100:]) < target + 0.05  # no excursion after the ramp either
    assert plain[-1] - target > 0.04 and max(plain[100:]) - target > 0.15, (plain[-1], max(plain[100:]))


def test_reset_only_on_a_sign_change_and_only_with_anti_windup():
    lagrangian = Lagrangian()
    optimizer = torch.optim.AdamW(list(lagrangian.parameters()), lr=0.1)
    for value, resets in [(0.1, False), (0.2, False), (0.6, True), (0.7, False), (0.2, True)]:
        with torch.no_grad():
            lagrangian.lambda_1.fill_(1.5)
        lagrangian(torch.tensor(value), 0.5).backward()
        optimizer.step()
        assert lagrangian.reset_on_crossing((optimizer,)) is resets
        assert (float(lagrangian.lambda_1.detach()) == 0.0) is resets
        assert (lagrangian.lambda_1 in optimizer.state) is not resets
    off = Lagrangian(anti_windup=False)
    off(torch.tensor(0.1), 0.5)
    off(torch.tensor(0.9), 0.5)
    assert not off.reset_on_crossing()

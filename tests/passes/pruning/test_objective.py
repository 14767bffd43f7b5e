"""finetune_weights: the shared fine-tune of the pruning passes, reused to heal other compressed models."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_lowrank.api import PassContext
from optimum_lowrank.passes.pruning.objective import NonFiniteLossError, TaskObjective, TrainingOptions, finetune_weights
from tests.helpers import sentiment_tsv, tiny_classifier, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _objective(tmp_path, teacher):
    data = sentiment_tsv(tmp_path / "train.tsv", rows=32)
    options = TrainingOptions(data=str(data), batch_size=8, lr=1e-3, distill_alpha=1.0)  # pure distillation: the loss is 0 at the teacher
    return TaskObjective(teacher, options, PassContext(tokenizer=word_tokenizer(tmp_path)))


def test_heals_a_damaged_copy_towards_the_teacher(tmp_path):
    teacher = tiny_classifier()
    objective = _objective(tmp_path, teacher)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.bert.encoder.layer[0].intermediate.dense.weight.mul_(-1.0)
    frozen = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    inputs, labels = next(_objective(tmp_path, teacher).batches())
    before = objective.loss(student.eval(), inputs, labels).item()
    losses = finetune_weights(student, objective, 30, 1e-3, "heal")
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert not student.training
    assert objective.loss(student, inputs, labels).item() < before
    assert all(torch.equal(v, frozen[k]) for k, v in objective.teacher.state_dict().items())


def test_a_non_finite_loss_names_the_caller(tmp_path, monkeypatch):
    model = tiny_classifier()
    objective = _objective(tmp_path, model)
    monkeypatch.setattr(TaskObjective, "loss", lambda self, *a, **k: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(NonFiniteLossError, match="heal: the training loss became inf at step 0"):
        finetune_weights(model, objective, 3, 1e-3, "heal")
    assert not model.training

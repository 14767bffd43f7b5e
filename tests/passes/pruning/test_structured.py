"""structured_prune on tiny random BERTs: gated == removed, the sparsity target, bad input."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from optimum_lowrank.api import PassContext, count_parameters
from optimum_lowrank.errors import DataError, PassError, RecipeError
from optimum_lowrank.layers.pruned import BiasOnlyAttention, BiasOnlyOutput
from optimum_lowrank.passes.pruning.hard_concrete import HardConcrete
from optimum_lowrank.passes.pruning.objective import NonFiniteLossError, TaskObjective
from optimum_lowrank.passes.pruning.structure import expected_sparsity, install_gates, remove_closed, set_gate_values
from optimum_lowrank.passes.pruning.structured import StructuredPrunePass
from optimum_lowrank.recipe import load_recipe
from optimum_lowrank.testing import tiny_bert, tiny_context
from tests.helpers import fill_gates, padded_batch, randomize_gates, sentiment_tsv, tiny_classifier, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["encoder.layer.0", "encoder.layer.1"]


def _inputs():
    return padded_batch(0, 1000, 12, (12, 7, 3), seed=3)


def test_pruned_and_removed_model_equals_the_gated_model():
    model = tiny_bert()
    gates = install_gates({n: model.get_submodule(n) for n in LAYERS}, 0.5, sublayers=True)
    randomize_gates(gates)
    with torch.no_grad():
        gates[0].heads.log_alpha.fill_(-10.0)  # every head of layer 0 closes: the block becomes a bias
        gates[1].intermediate.log_alpha.fill_(-10.0)  # every FFN dim of layer 1 closes
    set_gate_values(gates, "deterministic")
    ids, mask = _inputs()
    with torch.no_grad():
        gated = model(input_ids=ids, attention_mask=mask).last_hidden_state
    before = count_parameters(model)
    set_gate_values(gates, "off")
    shapes = remove_closed(gates)
    with torch.no_grad():
        removed = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(removed, gated, atol=1e-5, rtol=0)
    assert isinstance(model.encoder.layer[0].attention, BiasOnlyAttention)
    assert isinstance(model.encoder.layer[1].output, BiasOnlyOutput)
    assert shapes[0]["heads_kept"] == 0 and shapes[1]["intermediate_kept"] == 0
    assert 0 < shapes[1]["heads_kept"] <= 4
    assert count_parameters(model) < before


def test_deterministic_gates_close_the_expected_number():
    gate = HardConcrete(10)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-6, 6, 10))
    z = gate.deterministic()
    closed = round(float((1 - gate.prob_open().detach()).sum()))
    assert int((z == 0).sum()) == closed and closed > 0
    assert torch.all(z[:closed] == 0) and torch.all((z >= 0) & (z <= 1))


def test_expected_sparsity_is_zero_with_open_gates_and_one_with_closed():
    model = tiny_bert()
    gates = install_gates({n: model.get_submodule(n) for n in LAYERS}, 0.5, sublayers=True)
    fill_gates(gates, 20.0)
    assert float(expected_sparsity(gates)) == pytest.approx(0.0, abs=1e-6)
    fill_gates(gates, -20.0, ("mha", "ffn"))
    assert float(expected_sparsity(gates)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_target_sparsity_outside_0_1_is_a_clear_error(value):
    with pytest.raises(ValidationError, match=r"target_sparsity must be in \[0, 1\)"):
        StructuredPrunePass({"targets": LAYERS, "target_sparsity": value})
    with pytest.raises(RecipeError, match=r"target_sparsity must be in \[0, 1\)"):
        load_recipe({"version": 1, "passes": [{"pass": "structured_prune", "targets": LAYERS, "target_sparsity": value}]})


def test_trains_on_labelled_data_and_removes_units(tmp_path):
    model = tiny_classifier()
    data = sentiment_tsv(tmp_path / "train.tsv", rows=32)
    context = PassContext(tokenizer=word_tokenizer(tmp_path))
    options = {"targets": ["re:bert\\.encoder\\.layer\\.\\d+"], "target_sparsity": 0.6, "data": str(data), "steps": 30,
               "batch_size": 8, "mask_lr": 0.5, "sparsity_warmup": 0.2, "finetune_steps": 2}
    before = count_parameters(model)
    reports = StructuredPrunePass(options).run(model, context)
    assert len(reports) == 2 and all(r.action == "replaced" for r in reports)
    assert count_parameters(model) < before
    assert sum(r.params_after for r in reports) < 0.85 * sum(r.params_before for r in reports)
    assert any("structured_prune: task objective" in note for note in context.notes)
    ids = torch.tensor([[2, 5, 6, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_labels_that_do_not_fit_the_head_are_a_data_error(tmp_path):
    path = tmp_path / "three.tsv"
    path.write_text("label\ttext_a\n0\tgood\n2\tbad\n")
    model = tiny_classifier()
    with pytest.raises(DataError, match="3 classes\\) but the model's head has 2 labels"):
        StructuredPrunePass({"targets": ["re:bert\\.encoder\\.layer\\.\\d+"], "target_sparsity": 0.5, "data": str(path)}).run(
            model, PassContext(tokenizer=word_tokenizer(tmp_path)))


def test_a_non_finite_loss_stops_and_leaves_the_model_untouched(monkeypatch):
    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(TaskObjective, "loss", lambda self, *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(NonFiniteLossError, match="became nan at step 0"):
        StructuredPrunePass({"targets": LAYERS, "target_sparsity": 0.5, "steps": 3, "batch_size": 2}).run(model, tiny_context())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_task_objective_without_head_is_an_error():  # decoders: tests/passes/pruning/test_decoder.py
    with pytest.raises(PassError, match="objective 'task' needs a ...ForSequenceClassification"):
        StructuredPrunePass({"targets": LAYERS, "target_sparsity": 0.5, "objective": "task"}).run(tiny_bert(), tiny_context())


def test_distillation_without_a_head_matches_pooled_outputs():
    from optimum_lowrank.passes.pruning.objective import TrainingOptions

    teacher = tiny_bert()
    objective = TaskObjective(teacher, TrainingOptions(objective="distill", distill_hidden=0.0), tiny_context())
    assert objective.mode == "distill" and not objective.has_head
    ids, mask = _inputs()
    inputs = {"input_ids": ids, "attention_mask": mask}
    assert objective.loss(teacher, inputs, None).item() == pytest.approx(0.0, abs=1e-12)  # the student is the teacher
    student = tiny_bert()
    with torch.no_grad():
        student.encoder.layer[1].output.dense.weight.mul_(0.5)
    assert objective.loss(student, inputs, None).item() > 1e-6

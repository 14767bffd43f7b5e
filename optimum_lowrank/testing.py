"""Contract checks every pass must pass; third-party plugin authors can run them too.

.. code-block:: python

    from optimum_lowrank.testing import check_pass_contract
    from my_plugin import MyPass

    def test_my_pass_contract(tmp_path):
        check_pass_contract(MyPass, tmp_path)

The contract, on :func:`tiny_bert` with the pass's ``example_options``:

1. the config round-trips through a YAML recipe unchanged;
2. the model's parameter count goes down;
3. the outputs stay close to the original's (mean cosine of the last hidden
   states >= ``min_cosine``), and the caller's model is not modified;
4. the compressed model exports to ONNX and ONNX Runtime matches PyTorch
   (max abs difference <= ``atol``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimum_lowrank.api import CompressionPass, PassContext, count_parameters
from optimum_lowrank.plugins import PassRegistry
from optimum_lowrank.recipe import load_recipe

__all__ = ["ContractResult", "check_pass_contract", "tiny_bert", "tiny_context"]


def tiny_bert(seed: int = 0) -> nn.Module:
    """A random 2-layer BERT (vocab 1000, hidden 64, intermediate 256), in eval mode.

    Sized so that embedding and linear factorizations at moderate ranks save parameters.
    """
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, max_position_embeddings=128
    )
    return BertModel(config).eval()


def tiny_context(vocab_size: int = 1000, num_samples: int = 8, seq_len: int = 32, seed: int = 0) -> PassContext:
    """A PassContext whose calibration data are random token windows, shape (num_samples, seq_len)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
    return PassContext(kind="encoder", calibration_loader=lambda: ids, calibration_description="random token ids", seed=seed)


@dataclass
class ContractResult:
    """Figures from :func:`check_pass_contract`: parameters, output cosine, ORT parity."""

    params_before: int
    params_after: int
    mean_cosine: float
    max_abs_diff: float | None


def check_pass_contract(
    pass_class: type[CompressionPass],
    tmp_path: str | Path | None = None,
    *,
    options: dict[str, Any] | None = None,
    min_cosine: float = 0.5,
    atol: float = 1e-4,
) -> ContractResult:
    """Run the pass contract (see module docstring) and raise AssertionError on a breach.

    Parameters
    ----------
    pass_class : CompressionPass subclass
    tmp_path : path, optional
        Where to export ONNX; without it the ONNX parity step is skipped.
    options : dict, optional
        Recipe entry without ``pass``; defaults to ``pass_class.example_options``.
    min_cosine : float in (0, 1]
        Lower bound on the mean cosine between original and compressed last hidden states
        (random weights compress badly; the bound catches a broken pass, not a weak one).
    atol : float > 0
        ONNX Runtime vs PyTorch max abs difference allowed.

    Raises
    ------
    AssertionError
        Naming the clause that failed.
    """
    options = options if options is not None else pass_class.example_options
    assert options is not None, f"{pass_class.__name__} defines no example_options for the contract test"
    registry = PassRegistry()
    registry(pass_class)

    recipe = load_recipe({"version": 1, "passes": [{"pass": pass_class.name, **options}]}, registry)
    again = load_recipe(recipe.to_yaml(), registry)
    assert again.passes == recipe.passes, f"config does not round-trip through YAML: {recipe.passes} != {again.passes}"

    from optimum_lowrank.pipeline import apply_passes

    model = tiny_bert()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    compressed, _ = apply_passes(model, recipe, tiny_context(), registry)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"the pass modified the caller's model ({key})"
    before, after = count_parameters(model), count_parameters(compressed)
    assert after < before, f"parameter count did not go down: {before} -> {after}"

    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).last_hidden_state
        output = compressed(input_ids=ids).last_hidden_state
    cosine = float(torch.nn.functional.cosine_similarity(reference, output, dim=-1).mean())
    assert cosine >= min_cosine, f"outputs drifted: mean cosine {cosine:.3f} < {min_cosine}"

    max_abs_diff = None
    if tmp_path is not None:
        from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
        from optimum_lowrank.exporters.parity import check_parity

        path = export_onnx(compressed, Path(tmp_path) / pass_class.name, onnx_task(compressed))
        parity = check_parity(compressed, path, atol=atol, seq_lengths=(8, 24), vocab_size=model.config.vocab_size)
        assert parity.passed, f"ONNX Runtime differs from PyTorch: max |diff| {parity.max_abs_diff:.3g} > {atol}"
        max_abs_diff = parity.max_abs_diff
    return ContractResult(before, after, cosine, max_abs_diff)

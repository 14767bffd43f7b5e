"""Contract checks every pass must pass; third-party plugin authors can run them too.

.. code-block:: python

    from optimum_lowrank.testing import check_pass_contract
    from my_plugin import MyPass

    def test_my_pass_contract(tmp_path):
        check_pass_contract(MyPass, tmp_path)

The contract, on :func:`tiny_bert` with the pass's ``example_options``:

1. the config round-trips through a YAML recipe unchanged;
2. the model's parameter count goes down (for a pass with ``reduces_parameters = False``,
   one that saves compute instead, it grows by at most 25%);
3. the outputs stay close to the original's (mean cosine of the last hidden
   states >= ``min_cosine``), and the caller's model is not modified;
4. the compressed model exports to ONNX and ONNX Runtime matches PyTorch on
   every graph output (max abs difference <= ``atol``).

A pass that can target ``nn.Embedding`` also runs on :func:`tiny_llama`, whose
output head is tied to its input embedding, with the same options aimed at
``model.embed_tokens``:

5. the caller's model is not modified; the output head shares every parameter
   of the compressed embedding and computes its logits from the compressed
   table (``logits = hidden @ table^T``), or, with ``tied_head: untie``, is a
   dense copy of the original table sharing nothing; shared, the parameter
   count goes down;
6. the model runs: finite logits, and a step with the key/value cache gives the
   logits of the full forward pass;
7. the model exports to ONNX with past key/values and ONNX Runtime matches
   PyTorch on the logits and every ``present.*`` output.
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

__all__ = ["ContractResult", "check_pass_contract", "targets_embeddings", "tiny_bert", "tiny_context", "tiny_llama"]

TIED_EMBEDDING = "model.embed_tokens"


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


def tiny_llama(seed: int = 0) -> nn.Module:
    """A random 2-layer LlamaForCausalLM (vocab 1000, hidden 64, intermediate 128, 4 heads,
    2 key/value heads) whose ``lm_head`` is tied to ``model.embed_tokens``, in eval mode.

    Vocabulary and hidden size match :func:`tiny_bert`, so an embedding pass's
    options fit both.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_context(
    vocab_size: int = 1000, num_samples: int = 8, seq_len: int = 32, seed: int = 0, kind: str = "encoder"
) -> PassContext:
    """A PassContext whose calibration data are random token windows, shape (num_samples, seq_len);
    ``kind`` is ``"encoder"`` or ``"decoder"``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
    return PassContext(kind=kind, calibration_loader=lambda: ids, calibration_description="random token ids", seed=seed)


@dataclass
class ContractResult:
    """Figures from :func:`check_pass_contract`: parameters, output cosine, ORT parity.

    ``tied`` holds the figures of the tied-embedding Llama run (``mean_cosine`` of the
    logits there), or None for a pass that cannot target ``nn.Embedding``.
    """

    params_before: int
    params_after: int
    mean_cosine: float
    max_abs_diff: float | None
    tied: ContractResult | None = None


def check_pass_contract(
    pass_class: type[CompressionPass],
    tmp_path: str | Path | None = None,
    *,
    options: dict[str, Any] | None = None,
    tied_options: dict[str, Any] | None = None,
    min_cosine: float = 0.5,
    atol: float = 1e-4,
) -> ContractResult:
    """Run the pass contract (see module docstring) and raise AssertionError on a breach.

    Parameters
    ----------
    pass_class : CompressionPass subclass
    tmp_path : path, optional
        Where to export ONNX; without it the ONNX parity steps are skipped.
    options : dict, optional
        Recipe entry without ``pass``; defaults to ``pass_class.example_options``.
    tied_options : dict, optional
        Recipe entry for the tied-embedding Llama run (passes that can target
        ``nn.Embedding`` only); defaults to ``options`` with
        ``targets: [model.embed_tokens]``.
    min_cosine : float in (0, 1]
        Lower bound on the mean cosine between original and compressed last hidden states
        (random weights compress badly; the bound catches a broken pass, not a weak one).
    atol : float > 0
        ONNX Runtime vs PyTorch max abs difference allowed, on every graph output.

    Raises
    ------
    AssertionError
        Naming the clause that failed.
    """
    options = options if options is not None else pass_class.example_options
    assert options is not None, f"{pass_class.__name__} defines no example_options for the contract test"
    registry = PassRegistry()
    registry(pass_class)

    recipe = _round_trip(pass_class, options, registry)
    model = tiny_bert()
    compressed = _compress(model, recipe, tiny_context(), registry)
    before, after = count_parameters(model), count_parameters(compressed)
    if pass_class.reduces_parameters:
        assert after < before, f"parameter count did not go down: {before} -> {after}"
    else:  # a compute-saving pass (token dropping) may add a little
        assert after <= 1.25 * before, f"a compute-saving pass added more than 25% parameters: {before} -> {after}"

    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).last_hidden_state
        output = compressed(input_ids=ids).last_hidden_state
    cosine = float(torch.nn.functional.cosine_similarity(reference, output, dim=-1).mean())
    assert cosine >= min_cosine, f"outputs drifted: mean cosine {cosine:.3f} < {min_cosine}"

    max_abs_diff = None
    if tmp_path is not None:
        max_abs_diff = _onnx_parity(compressed, Path(tmp_path) / pass_class.name, atol)
    tied = None
    if targets_embeddings(pass_class):
        tied_options = tied_options if tied_options is not None else {**options, "targets": [TIED_EMBEDDING]}
        tied = _check_tied_embedding(pass_class, tied_options, registry, tmp_path, atol)
    return ContractResult(before, after, cosine, max_abs_diff, tied)


def _round_trip(pass_class: type[CompressionPass], options: dict[str, Any], registry: PassRegistry):
    recipe = load_recipe({"version": 1, "passes": [{"pass": pass_class.name, **options}]}, registry)
    again = load_recipe(recipe.to_yaml(), registry)
    assert again.passes == recipe.passes, f"config does not round-trip through YAML: {recipe.passes} != {again.passes}"
    return recipe


def _compress(model: nn.Module, recipe, context: PassContext, registry: PassRegistry) -> nn.Module:
    """The recipe applied to a copy of ``model``; asserts that ``model`` itself is untouched."""
    from optimum_lowrank.pipeline import apply_passes

    state = {key: value.clone() for key, value in model.state_dict().items()}
    compressed, _ = apply_passes(model, recipe, context, registry)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"the pass modified the caller's model ({key})"
    return compressed


def _onnx_parity(model: nn.Module, output_dir: Path, atol: float) -> float:
    """Export ``model`` and compare ONNX Runtime with PyTorch on every output; the max abs difference."""
    from optimum_lowrank.exporters.onnx import export_onnx, onnx_task
    from optimum_lowrank.exporters.parity import check_parity

    path = export_onnx(model, output_dir, onnx_task(model))
    parity = check_parity(model, path, atol=atol, seq_lengths=(8, 24), vocab_size=model.config.vocab_size)
    assert parity.passed, parity.describe()
    return parity.max_abs_diff


def targets_embeddings(pass_class: type[CompressionPass]) -> bool:
    """Whether ``pass_class.target_types`` admits ``nn.Embedding`` (a class it derives from, or the name ``"Embedding"``):
    such a pass also runs the tied-embedding clauses of the contract."""
    return any(
        kind == "Embedding" if isinstance(kind, str) else issubclass(nn.Embedding, kind) for kind in pass_class.target_types
    )


def _check_tied_embedding(
    pass_class: type[CompressionPass],
    options: dict[str, Any],
    registry: PassRegistry,
    tmp_path: str | Path | None,
    atol: float,
) -> ContractResult:
    """Clauses 5-7 of the contract on :func:`tiny_llama` (tied input/output embeddings)."""
    recipe = _round_trip(pass_class, options, registry)
    model = tiny_llama()
    original = model.get_input_embeddings().weight.detach().clone()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    compressed = _compress(model, recipe, tiny_context(model.config.vocab_size, kind="decoder"), registry)
    embedding, head = compressed.get_input_embeddings(), compressed.get_output_embeddings()
    where = f"tied Llama, {pass_class.name} on {TIED_EMBEDDING}"
    assert not isinstance(embedding, nn.Embedding), f"{where}: the embedding was not replaced ({type(embedding).__name__})"
    shared = {id(p) for p in head.parameters()} & {id(p) for p in embedding.parameters()}
    vocab = model.config.vocab_size
    with torch.no_grad():
        if options.get("tied_head") == "untie":
            assert not shared, f"{where}: tied_head untie, yet the head {type(head).__name__} shares parameters with the embedding"
            assert torch.equal(head.weight, original), f"{where}: the untied head is not a copy of the original table"
            table = original
        else:
            missing = [name for name, p in embedding.named_parameters() if id(p) not in shared]
            assert not missing, (
                f"{where}: the output head {type(head).__name__} does not share the compressed embedding's "
                f"parameters {missing} (expected a head on the same parameters, or tied_head: untie)"
            )
            table = embedding(torch.arange(vocab))
    before, after = count_parameters(model), count_parameters(compressed)
    if options.get("tied_head") != "untie":
        assert after < before, f"{where}: parameter count did not go down: {before} -> {after}"

    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = compressed(input_ids=ids).logits
        assert logits.shape == (2, 16, vocab) and torch.isfinite(logits).all(), f"{where}: logits {tuple(logits.shape)} not finite"
        hidden = compressed.base_model(input_ids=ids).last_hidden_state
        bias = getattr(head, "bias", None)
        expected = hidden @ table.t() + (0 if bias is None else bias)
        torch.testing.assert_close(
            logits, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{where}: the head does not compute hidden @ table^T: {m}"
        )
        prefix = compressed(input_ids=ids[:, :-1], use_cache=True)
        step = compressed(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
        torch.testing.assert_close(
            step[:, -1], logits[:, -1], rtol=1e-4, atol=1e-4, msg=lambda m: f"{where}: a cached decoding step differs: {m}"
        )
        reference = model(input_ids=ids).logits
    cosine = float(torch.nn.functional.cosine_similarity(reference, logits, dim=-1).mean())

    max_abs_diff = None
    if tmp_path is not None:
        max_abs_diff = _onnx_parity(compressed, Path(tmp_path) / f"{pass_class.name}-tied-llama", atol)
    return ContractResult(before, after, cosine, max_abs_diff)

"""Streaming statistics of the inputs of linear layers, collected with forward hooks on calibration text.

Activation-aware factorizations need, per layer, a summary of what flows into it:

- the Gram matrix ``G = X^T X`` (in_features x in_features) for SVD-LLM's whitening
  (each batch's product in float32, the running sum over batches in float64),
- the per-channel mean absolute value ``mean |x|`` (in_features,) for ASVD's scaling.

Both are sums over tokens, so they are accumulated batch by batch in float64 while
the calibration windows run through the model: a forward pre-hook on each target
adds the batch's contribution and lets the activation go. At no time are the
activations of more than one layer kept (the hook holds a reference to the single
most recent input tensor, to recognise layers that read the same tensor, see below).

Layers fed the very same tensor in one forward (Llama's q/k/v projections, its
gate/up projections) share one :class:`InputStatistics` object: it is computed once,
which saves time and memory (SmolLM2-135M: 4 Gram matrices per block instead of 7).

Memory: ``8 * in_features^2`` bytes per distinct input (SmolLM2-135M, 30 blocks:
about 0.8 GB of float64 Gram matrices: per block 3 x 576^2 + 1536^2 entries).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.linalg.whitening import InputStatistics
from optimum_lowrank.progress import bar

__all__ = [
    "InputStatistics",
    "collect_input_statistics",
    "collect_output_sensitivity",
    "completed_statistics",
    "input_statistics_hooks",
    "run_calibration",
]




def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):
        return module.weight.shape[0]  # GPT-2 Conv1D stores (in_features, out_features)
    features = getattr(module, "in_features", None)
    if isinstance(features, int):
        return features
    raise PassError(f"cannot collect input statistics of a {type(module).__name__}: unknown in_features")


def run_calibration(
    model: nn.Module,
    calibration_ids: Tensor,
    *,
    kind: Literal["encoder", "decoder"],
    batch_size: int = 1,
    module_names: tuple[str, ...] = (),
    progress: bool = False,
    desc: str = "calibration",
) -> None:
    """Run the calibration windows through ``model`` without gradients (hooks do the work).

    When every name in ``module_names`` lies inside the model's base model
    (``model.base_model``, e.g. ``model.`` of a ``LlamaForCausalLM``), only the base
    model runs: the LM head (a fifth of SmolLM2-135M's compute) is skipped.

    Parameters
    ----------
    model : nn.Module
    calibration_ids : LongTensor, shape (num_samples, seq_len)
    kind : {"encoder", "decoder"}
        Decoders run with ``use_cache=False``; encoders get an all-ones attention mask.
    batch_size : int, >= 1
        Windows per forward pass.
    module_names : tuple of str
        The hooked modules, to decide whether the base model suffices.
    progress : bool
        A tqdm bar on stderr over the batches.
    desc : str
        Label of the bar.

    Raises
    ------
    DataError
        If ``calibration_ids`` is not a non-empty 2-D integer tensor.
    """
    if calibration_ids.ndim != 2 or calibration_ids.numel() == 0 or calibration_ids.is_floating_point():
        raise DataError(f"calibration ids must be a non-empty (num_samples, seq_len) integer tensor, got shape {tuple(calibration_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    runner = model
    base = getattr(model, "base_model", None)
    prefix = getattr(model, "base_model_prefix", "")
    if base is not None and base is not model and prefix and module_names and all(n.startswith(prefix + ".") for n in module_names):
        runner = base
    device = next(model.parameters()).device
    n = calibration_ids.shape[0]
    with torch.no_grad():
        for start in bar(range(0, n, batch_size), desc=desc, unit="batch", enabled=progress):
            ids = calibration_ids[start : start + batch_size].to(device)
            if kind == "decoder":
                runner(input_ids=ids, use_cache=False)
            else:
                runner(input_ids=ids, attention_mask=torch.ones_like(ids))


def collect_input_statistics(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration_ids: Tensor,
    *,
    kind: Literal["encoder", "decoder"],
    gram: bool = True,
    abs_mean: bool = False,
    batch_size: int = 1,
    share_inputs: bool = True,
    progress: bool = False,
) -> dict[str, InputStatistics]:
    """Stream the calibration windows through ``model`` and sum each module's input statistics.

    A forward pre-hook on every module of ``modules`` folds the batch's inputs into
    float64 sums and drops them; the hooks are removed afterwards, also on error.

    Parameters
    ----------
    model : nn.Module
        Runs unchanged (eval mode, no gradients).
    modules : mapping name -> module
        Modules inside ``model`` whose first positional input is hooked
        (``nn.Linear``, GPT-2 ``Conv1D``).
    calibration_ids : LongTensor, shape (num_samples, seq_len)
        Token windows, e.g. :attr:`PassContext.calibration_ids`.
    kind : {"encoder", "decoder"}
    gram : bool
        Accumulate ``X^T X`` (in_features^2 float64 per distinct input).
    abs_mean : bool
        Accumulate ``sum |x|`` per channel.
    batch_size : int, >= 1
    share_inputs : bool
        Modules reading the same tensor object in a forward share one statistics object.
    progress : bool
        A tqdm bar on stderr over the batches.

    Returns
    -------
    dict name -> InputStatistics
        ``count`` is ``num_samples * seq_len`` for every module that ran on all tokens.

    Raises
    ------
    PassError
        If a module never ran during calibration (it is not on the forward path).
    DataError
        If ``calibration_ids`` is malformed.
    """
    with input_statistics_hooks(modules, gram=gram, abs_mean=abs_mean, share_inputs=share_inputs) as stats:
        run_calibration(model, calibration_ids, kind=kind, batch_size=batch_size, module_names=tuple(modules), progress=progress)
    return completed_statistics(stats)


@contextmanager
def input_statistics_hooks(
    modules: Mapping[str, nn.Module], *, gram: bool = True, abs_mean: bool = False, share_inputs: bool = True
) -> Iterator[dict[str, InputStatistics | None]]:
    """Forward pre-hooks that fold each module's inputs into float64 sums while the body runs.

    Yields a dict name -> InputStatistics, filled as the modules run (None for a module
    that has not run yet; see :func:`completed_statistics`). The hooks are removed on
    exit, also on error. Options as in :func:`collect_input_statistics`; the sequential
    engine (:mod:`optimum_lowrank.execution`) runs one block inside it.
    """
    stats: dict[str, InputStatistics | None] = {name: None for name in modules}
    last: dict[str, object] = {}  # the most recent input tensor and the statistics it went into
    updated: set[int] = set()  # ids of statistics objects updated from last["x"]

    def make_hook(name: str, features: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if not torch.is_tensor(x):
                raise PassError(f"{name}: expected a tensor input, got {type(x).__name__}")
            if share_inputs and last.get("x") is x:
                if stats[name] is None:
                    owner = last["stats"]
                    assert isinstance(owner, InputStatistics)
                    owner.shared_with.append(name)
                    stats[name] = owner
                target = stats[name]
                if id(target) in updated:
                    return
            else:
                updated.clear()
                if stats[name] is None:
                    stats[name] = InputStatistics(features)
                target = stats[name]
            assert target is not None
            target.update(x, gram=gram, abs_mean=abs_mean)
            updated.add(id(target))
            last["x"], last["stats"] = x, target

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name, _in_features(module))) for name, module in modules.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        last.clear()


def completed_statistics(stats: Mapping[str, InputStatistics | None]) -> dict[str, InputStatistics]:
    """``stats`` from :func:`input_statistics_hooks` once every module has run.

    Raises
    ------
    PassError
        If a module never ran (it is not on the forward path).
    """
    missing = [name for name, value in stats.items() if value is None]
    if missing:
        raise PassError(f"{len(missing)} target(s) never ran during calibration (not on the forward path?): {', '.join(missing[:5])}")
    return {name: value for name, value in stats.items() if value is not None}


def collect_output_sensitivity(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration_ids: Tensor,
    *,
    kind: Literal["encoder", "decoder"],
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Per-layer sensitivity: mean squared gradient of the loss w.r.t. each module's output.

    For each module, ``sum_t ||dL/dy_t||^2 / (num_tokens * out_features)``: with an
    isotropic (empirical Fisher) approximation, a perturbation ``dY`` of the layer's
    outputs raises the loss by about ``0.5 * sensitivity * ||dY||_F^2``. The loss is the
    LM loss for decoders; for encoders, ``sum(r * h)`` with ``h`` the last hidden state
    and ``r`` standard normal (a Hutchinson estimate of the squared Jacobian norm, i.e. how
    much an error in the layer reaches the output embedding). Only activation gradients
    are computed (parameters are frozen during the backward passes); nothing is stored
    but one float per module.

    Parameters
    ----------
    model : nn.Module
    modules : mapping name -> module
    calibration_ids : LongTensor, shape (num_samples, seq_len)
    kind : {"encoder", "decoder"}
    batch_size : int, >= 1
    seed : int
        For the encoder's random projection.
    progress : bool
        A tqdm bar on stderr over the batches.

    Returns
    -------
    dict name -> float, >= 0

    Raises
    ------
    PassError
        If a module's output never received a gradient.
    """
    if calibration_ids.ndim != 2 or calibration_ids.numel() == 0 or calibration_ids.is_floating_point():
        raise DataError(f"calibration ids must be a non-empty (num_samples, seq_len) integer tensor, got shape {tuple(calibration_ids.shape)}")
    sums = {name: 0.0 for name in modules}
    counts = {name: 0 for name in modules}

    def make_hook(name: str):
        def forward_hook(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            if torch.is_tensor(output) and output.requires_grad:
                def grad_hook(grad: Tensor) -> None:
                    sums[name] += float(grad.detach().double().square().sum())
                    counts[name] += grad[..., 0].numel() * grad.shape[-1]
                output.register_hook(grad_hook)
        return forward_hook

    def embedding_hook(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        return output.detach().requires_grad_(True)

    flags = {id(p): p.requires_grad for p in model.parameters()}
    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        for handle in handles:
            handle.remove()
        raise PassError(f"{type(model).__name__} has no get_input_embeddings(); cannot measure sensitivities")
    handles.append(embeddings.register_forward_hook(embedding_hook))
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        n = calibration_ids.shape[0]
        for start in bar(range(0, n, batch_size), desc="sensitivity", unit="batch", enabled=progress):
            ids = calibration_ids[start : start + batch_size].to(device)
            with torch.enable_grad():
                if kind == "decoder":
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                else:
                    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
                    hidden = getattr(out, "last_hidden_state", None)
                    hidden = out[0] if hidden is None else hidden
                    loss = (hidden * torch.randn(hidden.shape, generator=generator).to(hidden)).sum()
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    missing = [name for name, c in counts.items() if c == 0]
    if missing:
        raise PassError(f"no gradient reached the output of {len(missing)} target(s): {', '.join(missing[:5])}")
    return {name: sums[name] / counts[name] for name in modules}

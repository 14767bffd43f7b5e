"""ONNX Runtime vs PyTorch parity of an exported graph.

:func:`check_parity` runs the graph and the ``nn.Module`` on the same random
token ids at several sequence lengths and compares every graph output with the
model output of the same name, as Optimum's ``validate_model_outputs`` does:
``logits`` / ``last_hidden_state`` / ``pooler_output`` by name, and, for
decoders exported with past, each ``present.{i}.key`` / ``present.{i}.value``
with layer ``i`` of the model's ``past_key_values`` cache.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimum_lowrank.errors import ExportError
from optimum_lowrank.exporters.onnx import is_causal_lm
from optimum_lowrank.exporters.runtime import build_dummy_feeds, first_line, make_session

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

__all__ = [
    "ParityResult",
    "check_parity",
]

logger = logging.getLogger(__name__)

_PRESENT_PREFIXES = ("present.", "present_key_values.")


def check_parity(
    model: PreTrainedModel,
    onnx_path: Path,
    *,
    seq_lengths: Sequence[int] = (8, 32, 128),
    batch_size: int = 2,
    atol: float = 1e-3,
    rtol: float = 0.0,
    vocab_size: int | None = None,
    seed: int = 0,
) -> ParityResult:
    """Compare the PyTorch model with its ONNX graph on random tokens, output by output.

    For each sequence length, random token ids (fixed ``seed``) and an
    attention mask of ones, and then, at the longest length, a batch of 2 whose
    second row is right-padded to half the length (a real attention mask with
    zeros), go through ONNX Runtime CPU (decoders with empty past key/values)
    and through the model (with ``use_cache=True`` when the
    graph returns ``present.*``, else ``use_cache=False`` for causal LMs).
    Every graph output is compared with its PyTorch counterpart:
    ``logits``, ``last_hidden_state``, ``pooler_output`` ... by name, and
    ``present.{i}.key`` / ``present.{i}.value``, shape (batch, kv_heads,
    seq_len, head_dim), with layer ``i`` of ``past_key_values``.

    Parameters
    ----------
    model : PreTrainedModel
        The exported model; switched to eval mode.
    onnx_path : Path
        Graph from :func:`export_onnx` (or a quantized copy, with a looser ``atol``).
    seq_lengths : sequence of int, each >= 1
        Lengths above ``model.config.max_position_embeddings`` are capped to it
        (``per_shape`` shows the lengths used).
    batch_size : int, >= 1
    atol : float, >= 0
        Allowed absolute difference.
    rtol : float, >= 0
        Allowed difference relative to the largest reference magnitude: every
        output must stay within ``atol + rtol * reference_max_abs``, where
        ``reference_max_abs`` is the largest ``|torch output|`` over all
        outputs and shapes (the logits, for a language model).
    vocab_size : int, optional
        Token ids come from ``[0, vocab_size)``; ``model.config.vocab_size`` if ``None``.
    seed : int

    Returns
    -------
    ParityResult
        ``passed`` is False on a mismatch, and ``failed_outputs`` names the
        outputs that differ; nothing is raised for it.

    Raises
    ------
    ValueError
        If a size is < 1 or no vocabulary size is known.
    ExportError
        If ONNX Runtime cannot load or run the graph, the model cannot run, or
        a graph output has no counterpart among the model's outputs.
    """
    config = getattr(model, "config", None)
    if vocab_size is None:
        vocab_size = getattr(config, "vocab_size", None)
        if not vocab_size:
            raise ValueError("vocab_size is unknown: pass vocab_size= or give the model a config.vocab_size")
    if not seq_lengths or min(seq_lengths) < 1 or batch_size < 1:
        raise ValueError(f"need seq_lengths >= 1 and batch_size >= 1, got {tuple(seq_lengths)}, {batch_size}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0 and max(seq_lengths) > max_pos:
        # Longer inputs are invalid for the model: check up to its limit instead.
        seq_lengths = sorted({min(s, max_pos) for s in seq_lengths})
        logger.info("parity: sequence lengths capped at max_position_embeddings=%d", max_pos)
    model.eval()
    session = make_session(onnx_path)
    names = [meta.name for meta in session.get_outputs()]
    use_cache = any(name.startswith(_PRESENT_PREFIXES) for name in names)
    per_shape: dict[str, float] = {}
    per_output = dict.fromkeys(names, 0.0)
    scale = 0.0
    runs = [(f"batch={batch_size},seq={seq_len}", build_dummy_feeds(session, batch_size, seq_len, vocab_size, seed)) for seq_len in seq_lengths]
    padded = _right_padded_feeds(session, max(seq_lengths), vocab_size, seed)
    if padded is not None:
        runs.append(padded)
    for label, feeds in runs:
        try:
            got = session.run(names, feeds)
        except Exception as exc:
            raise ExportError(f"ONNX Runtime failed to run {onnx_path}: {first_line(exc)}") from exc
        try:
            wanted = _torch_outputs(model, feeds, names, use_cache)
        except Exception as exc:
            raise ExportError(f"PyTorch model failed on the parity inputs: {first_line(exc)}") from exc
        shape_diff = 0.0
        for name, array in zip(names, got):
            if name not in wanted:
                raise ExportError(
                    f"graph output {name!r} of {onnx_path} has no PyTorch counterpart; "
                    f"the model returns {', '.join(wanted) or 'nothing comparable'}"
                )
            want = wanted[name]
            if want.size:
                scale = max(scale, float(np.max(np.abs(want))))
            diff = _max_abs_diff(name, np.asarray(array), want)
            per_output[name] = max(per_output[name], diff)
            shape_diff = max(shape_diff, diff)
        per_shape[label] = shape_diff
    bound = atol + rtol * scale
    failed = [name for name, diff in per_output.items() if not diff <= bound]
    max_diff = max(per_shape.values()) if per_shape else math.inf
    return ParityResult(
        max_diff, atol, not failed and max_diff <= bound, per_shape, rtol=rtol, reference_max_abs=scale,
        per_output=per_output, failed_outputs=failed,
    )


def _right_padded_feeds(session: Any, seq_len: int, vocab_size: int, seed: int) -> tuple[str, dict[str, np.ndarray]] | None:
    """A batch of 2 whose second row is right-padded to half its length (attention mask zeros), or
    None when the graph takes no ``attention_mask`` or ``seq_len`` < 2."""
    if seq_len < 2 or "attention_mask" not in {meta.name for meta in session.get_inputs()}:
        return None
    feeds = build_dummy_feeds(session, 2, seq_len, vocab_size, seed + 1)
    mask = feeds["attention_mask"]
    if mask.shape != (2, seq_len):  # a graph fed a past: leave it
        return None
    mask = mask.copy()
    mask[1, seq_len // 2:] = 0
    feeds["attention_mask"] = mask
    return f"batch=2,seq={seq_len},right-padded to {seq_len // 2}", feeds


def _max_abs_diff(name: str, got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want|``; ``inf`` on a shape mismatch or a non-finite value, 0 for empty outputs."""
    if got.shape != want.shape:
        logger.warning("parity: ONNX output %s has shape %s, PyTorch %s", name, got.shape, want.shape)
        return math.inf
    if not got.size:
        return 0.0
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    return diff if math.isfinite(diff) else math.inf


def _torch_outputs(model: PreTrainedModel, feeds: dict[str, np.ndarray], names: list[str], use_cache: bool) -> dict[str, np.ndarray]:
    """The model's outputs on ``feeds``, named as the graph names them, float64."""
    import torch

    kwargs: dict[str, Any] = {}
    for key in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        if key in feeds:
            kwargs[key] = torch.from_numpy(np.ascontiguousarray(feeds[key])).long()
    if use_cache:
        kwargs["use_cache"] = True
    elif is_causal_lm(model):
        kwargs["use_cache"] = False
    with torch.inference_mode():
        out = model(**kwargs)
    tensors: dict[str, Any] = {}
    if isinstance(out, torch.Tensor):
        tensors[names[0]] = out
    elif isinstance(out, dict):  # a ModelOutput: its fields in order, None ones left out
        for key, value in out.items():
            if key == "past_key_values":
                tensors.update(_present_tensors(value))
            elif isinstance(value, torch.Tensor):
                tensors[key] = value
    else:  # a tuple (return_dict=False): the leading tensors, by position
        plain = [name for name in names if not name.startswith(_PRESENT_PREFIXES)]
        tensors.update(
            (name, value) for name, value in zip(plain, out) if isinstance(value, torch.Tensor)
        )
    return {key: value.detach().to(torch.float64).cpu().numpy() for key, value in tensors.items()}


def _present_tensors(cache: Any) -> dict[str, Any]:
    """``present.{i}.key`` / ``present.{i}.value`` from a ``Cache`` object or a legacy tuple of (key, value) pairs."""
    if cache is None:
        return {}
    if hasattr(cache, "layers"):  # DynamicCache of transformers >= 4.56
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):  # DynamicCache of transformers < 4.56
        pairs = list(zip(cache.key_cache, cache.value_cache))
    else:
        pairs = [(layer[0], layer[1]) for layer in cache]
    named: dict[str, Any] = {}
    for i, (key, value) in enumerate(pairs):
        named[f"present.{i}.key"], named[f"present.{i}.value"] = key, value
    return named


@dataclass
class ParityResult:
    """Largest absolute difference between PyTorch and ONNX Runtime outputs.

    Attributes
    ----------
    max_abs_diff : float
        Largest ``|torch - ort|`` over all outputs and shapes, same units as the
        outputs (hidden-state values, logits, keys/values); ``inf`` on a shape
        mismatch or a non-finite value.
    atol : float
        Absolute tolerance the check used.
    passed : bool
        ``max_abs_diff <= atol + rtol * reference_max_abs`` (so every output is
        within that bound and ``failed_outputs`` is empty).
    per_shape : dict[str, float]
        Largest difference over all outputs per input shape, keyed ``"batch=B,seq=S"``
        (``"batch=2,seq=S,right-padded to S/2"`` for the padded batch).
    rtol : float
        Tolerance relative to the largest reference output magnitude.
    reference_max_abs : float
        Largest ``|torch|`` output value over all outputs and shapes (logits of a
        heavily compressed LM reach the hundreds, where fp32 round-off alone exceeds 1e-3).
    per_output : dict[str, float]
        Largest difference over all shapes per graph output, keyed by the output's
        name (``logits``, ``present.0.key`` ...), in graph order.
    failed_outputs : list of str
        Graph outputs whose difference exceeds the bound, in graph order.
    """

    max_abs_diff: float
    atol: float
    passed: bool
    per_shape: dict[str, float] = field(default_factory=dict)
    rtol: float = 0.0
    reference_max_abs: float = 0.0
    per_output: dict[str, float] = field(default_factory=dict)
    failed_outputs: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: the verdict, the outputs that differ (by name) and the bound."""
        bound = f"atol {self.atol:g} + rtol {self.rtol:g} x max|output| {self.reference_max_abs:.3g}"
        if self.passed:
            return f"ONNX Runtime matches PyTorch on {len(self.per_output)} output(s): max |diff| {self.max_abs_diff:.3g} <= {bound}"
        differing = ", ".join(f"{name} (max |diff| {self.per_output[name]:.3g})" for name in self.failed_outputs)
        return f"ONNX Runtime differs from PyTorch on {differing or 'an output'} > {bound}"

    def to_dict(self) -> dict:
        """Plain-JSON form (``inf`` becomes the string ``"inf"``)."""

        def clean(x: float) -> float | str:
            return x if math.isfinite(x) else str(x)

        data = asdict(self)
        data["max_abs_diff"] = clean(self.max_abs_diff)
        data["per_shape"] = {k: clean(v) for k, v in self.per_shape.items()}
        data["per_output"] = {k: clean(v) for k, v in self.per_output.items()}
        return data

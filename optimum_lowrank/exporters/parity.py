"""ONNX Runtime vs PyTorch parity of an exported graph.

:func:`check_parity` runs the graph and the ``nn.Module`` on the same random
token ids at several sequence lengths and compares the outputs within
``atol + rtol * max|reference|``, as Optimum's ``validate_model_outputs`` does.
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
    """Compare the PyTorch model with its ONNX graph on random tokens.

    For each sequence length, random token ids (fixed ``seed``) and an
    attention mask of ones go through the model (causal LMs with
    ``use_cache=False``) and through ONNX Runtime CPU (decoders with empty past
    key/values). The graph's first output (``last_hidden_state`` for encoders,
    ``logits`` for causal LMs) is compared with the model output of that name.

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
        Allowed difference relative to the largest reference magnitude: the
        check passes when ``max_abs_diff <= atol + rtol * max|torch output|``.
    vocab_size : int, optional
        Token ids come from ``[0, vocab_size)``; ``model.config.vocab_size`` if ``None``.
    seed : int

    Returns
    -------
    ParityResult
        ``passed`` is False on a mismatch; nothing is raised for it.

    Raises
    ------
    ValueError
        If a size is < 1 or no vocabulary size is known.
    ExportError
        If ONNX Runtime cannot load or run the graph, or the model cannot run.
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
    output_name = session.get_outputs()[0].name
    per_shape: dict[str, float] = {}
    scale = 0.0
    for seq_len in seq_lengths:
        feeds = build_dummy_feeds(session, batch_size, seq_len, vocab_size, seed)
        try:
            got = session.run([output_name], feeds)[0]
        except Exception as exc:
            raise ExportError(f"ONNX Runtime failed to run {onnx_path}: {first_line(exc)}") from exc
        try:
            want = _torch_main_output(model, feeds, output_name)
        except Exception as exc:
            raise ExportError(f"PyTorch model failed on the parity inputs: {first_line(exc)}") from exc
        if want.size:
            scale = max(scale, float(np.max(np.abs(want))))
        if got.shape != want.shape:
            logger.warning("parity: ONNX output shape %s != PyTorch %s", got.shape, want.shape)
            diff = math.inf
        else:
            diff = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
            if not math.isfinite(diff):
                diff = math.inf
        per_shape[f"batch={batch_size},seq={seq_len}"] = diff
    max_diff = max(per_shape.values()) if per_shape else math.inf
    passed = max_diff <= atol + rtol * scale
    return ParityResult(max_diff, atol, passed, per_shape, rtol=rtol, reference_max_abs=scale)


def _torch_main_output(model: PreTrainedModel, feeds: dict[str, np.ndarray], name: str) -> np.ndarray:
    import torch

    kwargs: dict[str, Any] = {}
    for key in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        if key in feeds:
            kwargs[key] = torch.from_numpy(np.ascontiguousarray(feeds[key])).long()
    if is_causal_lm(model):
        kwargs["use_cache"] = False
    with torch.inference_mode():
        out = model(**kwargs)
    if isinstance(out, dict) and name in out:
        value = out[name]
    elif hasattr(out, name):
        value = getattr(out, name)
    else:
        value = out[0]
    return value.detach().to(torch.float64).cpu().numpy()


@dataclass
class ParityResult:
    """Largest absolute difference between PyTorch and ONNX Runtime outputs.

    Attributes
    ----------
    max_abs_diff : float
        Largest ``|torch - ort|`` over all shapes, same units as the output
        (hidden-state values or logits); ``inf`` on a shape mismatch or a
        non-finite value.
    atol : float
        Absolute tolerance the check used.
    passed : bool
        ``max_abs_diff <= atol + rtol * reference_max_abs``.
    per_shape : dict[str, float]
        Largest difference per input shape, keyed ``"batch=B,seq=S"``.
    rtol : float
        Tolerance relative to the largest reference output magnitude.
    reference_max_abs : float
        Largest ``|torch|`` output value over all shapes (logits of a heavily
        compressed LM reach the hundreds, where fp32 round-off alone exceeds 1e-3).
    """

    max_abs_diff: float
    atol: float
    passed: bool
    per_shape: dict[str, float] = field(default_factory=dict)
    rtol: float = 0.0
    reference_max_abs: float = 0.0

    def to_dict(self) -> dict:
        """Plain-JSON form (``inf`` becomes the string ``"inf"``)."""

        def clean(x: float) -> float | str:
            return x if math.isfinite(x) else str(x)

        data = asdict(self)
        data["max_abs_diff"] = clean(self.max_abs_diff)
        data["per_shape"] = {k: clean(v) for k, v in self.per_shape.items()}
        return data

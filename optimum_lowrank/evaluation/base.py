"""Accuracy evaluators for the accuracy gate: the same metric on PyTorch and ONNX models.

Every evaluator measures one number on a fixed, deterministic sample of data, so the
original model, the compressed PyTorch model, its fp32 ONNX graph and its int8 ONNX
graph are compared on exactly the same inputs:

- ``perplexity`` (:class:`PerplexityEvaluator`): causal decoders, lower is better;
- ``stsb_spearman`` (:class:`STSBEvaluator`): encoders, higher is better (x100);
- ``cosine_agreement`` (:class:`CosineAgreementEvaluator`): encoders, data-free,
  higher is better (1.0 for the original model).

ONNX graphs are run with ONNX Runtime's ``CPUExecutionProvider`` (so graphs holding
``com.microsoft`` operators such as ``MatMulNBits`` work), feeding only the inputs
the graph declares. :func:`build_evaluator` is what the pipeline calls.
"""

from __future__ import annotations

import abc
import inspect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimum_lowrank.errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnxruntime
    import torch
    from transformers import PreTrainedModel


__all__ = ["METRICS", "Evaluator"]

#: Metric names accepted by :func:`build_evaluator`.
METRICS: tuple[str, ...] = ("perplexity", "stsb_spearman", "cosine_agreement")


class Evaluator(abc.ABC):
    """One accuracy metric, measurable on a PyTorch model and on an ONNX graph.

    Attributes
    ----------
    metric : str
        Metric name, one of :data:`METRICS` for the built-in evaluators.
    higher_is_better : bool
    description : str
        Human description of the data and protocol (shown in reports).
    """

    metric: str
    higher_is_better: bool
    description: str

    @abc.abstractmethod
    def evaluate_torch(self, model: PreTrainedModel) -> float:
        """Score a PyTorch model (run on the CPU under ``torch.inference_mode``)."""

    @abc.abstractmethod
    def evaluate_onnx(self, onnx_path: str | os.PathLike) -> float:
        """Score an ONNX graph (a ``.onnx`` file, or a folder holding ``model.onnx``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


# --------------------------------------------------------------------------- helpers


def resolve_onnx(onnx_path: str | os.PathLike) -> Path:
    path = Path(onnx_path)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        graphs = sorted(path.glob("*.onnx"))
        if len(graphs) == 1:
            return graphs[0]
        raise ExportError(f"folder {str(path)!r} holds {len(graphs)} .onnx files and no model.onnx; pass the file")
    if not path.is_file():
        raise ExportError(f"ONNX graph {str(path)!r} does not exist")
    return path


def open_session(path: str | os.PathLike, threads: int = 2) -> onnxruntime.InferenceSession:
    """ONNX Runtime CPU session on a ``.onnx`` file, or a folder holding ``model.onnx`` or a single graph."""
    from optimum_lowrank.exporters.runtime import make_session

    return make_session(resolve_onnx(path), threads=threads)


def onnx_feed(session: onnxruntime.InferenceSession, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for ``session`` from ``arrays`` (``input_ids`` and optionally ``attention_mask``, ...)."""
    from optimum_lowrank.exporters.runtime import feeds_for_input_ids

    return feeds_for_input_ids(session, **arrays)


def torch_forward(model: PreTrainedModel, inputs: dict[str, torch.Tensor], **extra: Any) -> Any:
    """Call ``model`` with the inputs its ``forward`` accepts."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = {**inputs, **extra}
    else:
        accepted = {k: v for k, v in {**inputs, **extra}.items() if k in params}
    return model(**accepted)


def hidden_state(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over the sequence: (B, L, H), (B, L) -> (B, H)."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def onnx_hidden(session: onnxruntime.InferenceSession, arrays: dict[str, np.ndarray]) -> np.ndarray:
    names = [o.name for o in session.get_outputs()]
    output = "last_hidden_state" if "last_hidden_state" in names else names[0]
    return session.run([output], onnx_feed(session, arrays))[0]


def progress(iterable: Sequence, desc: str) -> Iterator:
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, leave=False, disable=None))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation in [-1, 1] (ties get average ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y)[0])

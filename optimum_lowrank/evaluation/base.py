"""The :class:`Evaluator` base class of every accuracy metric, and the helpers the
evaluators share (ONNX Runtime sessions and feeds, forward calls, pooling).

A metric plugs in by subclassing :class:`Evaluator` and registering the class
through the ``lowrank_register_metrics`` hook (see :mod:`optimum_lowrank.hookspecs`).
ONNX graphs are run with ONNX Runtime's ``CPUExecutionProvider`` (so graphs holding
``com.microsoft`` operators such as ``MatMulNBits`` work), feeding only the inputs
the graph declares.
"""

from __future__ import annotations

import abc
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from optimum_lowrank.errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import onnxruntime
    import torch
    from transformers import PreTrainedModel

    from optimum_lowrank.models import LoadedModel
    from optimum_lowrank.recipe import AccuracyConfig


__all__ = ["MODEL_KINDS", "Evaluator"]

#: The model kinds an evaluator may declare in ``model_kinds``.
MODEL_KINDS: tuple[str, ...] = ("encoder", "decoder")


class Evaluator(abc.ABC):
    """One accuracy metric, measurable on a PyTorch model and on an ONNX graph.

    A metric is registered through the ``lowrank_register_metrics`` hook by its
    class, which declares what the recipe and the pipeline need:

    Attributes
    ----------
    name : ClassVar[str]
        The recipe's ``metric:`` id (an identifier).
    config_class : ClassVar[type[AccuracyConfig]]
        The pydantic model that validates the recipe's ``accuracy:`` section for this
        metric: the metric's own options and its one threshold.
    model_kinds : ClassVar[tuple[str, ...]]
        The model kinds it suits, a non-empty subset of :data:`MODEL_KINDS`.
    higher_is_better : ClassVar[bool]
    description : str
        Human description of the data and protocol (shown in reports), set by each instance.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AccuracyConfig]]
    model_kinds: ClassVar[tuple[str, ...]]
    higher_is_better: ClassVar[bool]
    description: str

    @property
    def metric(self) -> str:
        """The metric's id, :attr:`name` (what reports show)."""
        return self.name

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: AccuracyConfig, loaded: LoadedModel, reference_model: PreTrainedModel | None) -> Evaluator:
        """Build the evaluator for ``loaded`` from its validated config.

        Parameters
        ----------
        config : AccuracyConfig
            An instance of :attr:`config_class` (its threshold may be unset: building
            only measures).
        loaded : LoadedModel
            The model being compressed: its tokenizer, kind and source. Its kind is
            one of :attr:`model_kinds` (checked before this is called).
        reference_model : PreTrainedModel or None
            The original model, for metrics that compare against it at construction
            (e.g. ``cosine_agreement``); it may be compressed in place afterwards.

        Raises
        ------
        DataError
            If the data is missing, empty or malformed.
        RecipeError
            If an option does not fit the model (e.g. ``seq_len`` over its positions)
            or a needed ``reference_model`` is None.
        """

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


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation in [-1, 1] (ties get average ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y)[0])

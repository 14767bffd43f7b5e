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

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimum_lowrank.data import load_sts_pairs, load_text
from optimum_lowrank.errors import DataError, RecipeError
from optimum_lowrank.evaluation.base import METRICS, Evaluator
from optimum_lowrank.evaluation.perplexity import PerplexityEvaluator
from optimum_lowrank.evaluation.sentence import CosineAgreementEvaluator, STSBEvaluator

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from optimum_lowrank.models import LoadedModel

__all__ = [
    "METRICS",
    "CosineAgreementEvaluator",
    "Evaluator",
    "PerplexityEvaluator",
    "STSBEvaluator",
    "build_evaluator",
]

_CLASSES: dict[str, type[Evaluator]] = {
    "perplexity": PerplexityEvaluator,
    "stsb_spearman": STSBEvaluator,
    "cosine_agreement": CosineAgreementEvaluator,
}
_KIND = {"perplexity": "decoder", "stsb_spearman": "encoder", "cosine_agreement": "encoder"}


def _check_options(metric: str, options: dict[str, Any]) -> None:
    params = inspect.signature(_CLASSES[metric].__init__).parameters
    allowed = sorted(name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and not name.endswith("_description"))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RecipeError(f"unknown option(s) {unknown} for metric {metric!r}; allowed: {allowed}")


def build_evaluator(
    metric: str,
    loaded: LoadedModel,
    *,
    data: str | os.PathLike | None,
    reference_model: PreTrainedModel | None = None,
    **options: Any,
) -> Evaluator:
    """Build the evaluator for ``metric`` on ``loaded``'s tokenizer and data.

    Parameters
    ----------
    metric : {"perplexity", "stsb_spearman", "cosine_agreement"}
    loaded : LoadedModel
        The model being compressed; its tokenizer and kind are used.
    data : str, PathLike or None
        ``perplexity`` and ``cosine_agreement``: a text source for
        :func:`optimum_lowrank.data.load_text` (None: Python's own documentation,
        see :func:`~optimum_lowrank.data.default_text`). ``stsb_spearman``: a
        required STS-B TSV, see :func:`~optimum_lowrank.data.load_sts_pairs`.
    reference_model : PreTrainedModel, optional
        The original model; required by ``cosine_agreement``, whose reference
        embeddings are computed here, at construction.
    **options
        Keyword options of the evaluator class (e.g. ``seq_len``, ``max_windows``,
        ``max_pairs``, ``num_samples``).

    Returns
    -------
    Evaluator

    Raises
    ------
    RecipeError
        If the metric is unknown, does not suit the model kind (perplexity needs a
        decoder, the embedding metrics an encoder), an option is unknown, or
        ``cosine_agreement`` lacks ``reference_model``.
    DataError
        If the data is missing, empty or malformed (``stsb_spearman`` without data).
    """
    if metric not in _CLASSES:
        raise RecipeError(f"unknown accuracy metric {metric!r}; allowed: {', '.join(METRICS)}")
    needed = _KIND[metric]
    if loaded.kind != needed:
        hint = (
            "use stsb_spearman (with an STS-B TSV) or cosine_agreement for encoders"
            if needed == "decoder"
            else "use perplexity for decoders"
        )
        article = {"encoder": "an", "decoder": "a"}
        raise RecipeError(
            f"metric {metric!r} needs {article[needed]} {needed} model but {loaded.source} is {article[loaded.kind]} {loaded.kind}; {hint}"
        )
    _check_options(metric, options)
    tokenizer = loaded.tokenizer

    if metric == "stsb_spearman":
        if data is None:
            raise DataError("metric 'stsb_spearman' needs data: the path of an STS-B TSV file (e.g. sts-dev.tsv)")
        pairs = load_sts_pairs(data)
        return STSBEvaluator(tokenizer, pairs, pairs_description=Path(data).name, **options)

    text, text_description = load_text(data)
    if metric == "perplexity":
        return PerplexityEvaluator(tokenizer, text, text_description=text_description, **options)
    if reference_model is None:
        raise RecipeError("metric 'cosine_agreement' needs reference_model (the original model)")
    return CosineAgreementEvaluator(tokenizer, text, reference_model, text_description=text_description, **options)

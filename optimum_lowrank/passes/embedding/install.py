"""Installing a compressed token embedding in a model, and measuring it.

- :func:`tied_output_head`: the output head that shares the embedding's weight, if any.
- :func:`install_embedding`: put the compressed layer in place and either share it
  with the tied head or untie the head.
- :func:`check_embedding_table`: reject tables a pass cannot factorize.
- :func:`reconstruction_metrics`: relative Frobenius error and row cosine of a
  reconstructed table against the original (chunked over rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimum_lowrank.api import count_parameters
from optimum_lowrank.errors import PassError

__all__ = [
    "check_embedding_table",
    "install_embedding",
    "reconstruction_metrics",
    "tied_output_head",
]


def install_embedding(
    model: nn.Module,
    name: str,
    original: nn.Embedding,
    layer: nn.Module,
    tied_head: str,
    head_factory: Callable[[nn.Module, Tensor | None], nn.Module],
    head_description: str,
) -> tuple[int, str]:
    """Put ``layer`` at ``name`` in place of ``original`` and deal with an output head tied to it.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    name : str
        Qualified name of ``original``.
    original : nn.Embedding
    layer : nn.Module
        The compressed replacement.
    tied_head : str
        ``"untie"`` gives the head a dense copy of the original table (saves
        nothing on the head side); anything else installs ``head_factory(layer, bias)``,
        which shares ``layer``'s parameters.
    head_factory : callable (layer, bias or None) -> nn.Module
    head_description : str
        How the shared head computes logits, for the report note.

    Returns
    -------
    params_after : int
        Distinct parameters of the replacement, plus what the head adds (its own
        bias, or the whole dense table when untied).
    note : str
        What happened to the tied head ("" if there is none).
    """

    head = tied_output_head(model, original)
    after = count_parameters(layer)
    note = ""
    if head is not None:
        head_name, head_module = head
        bias = getattr(head_module, "bias", None)
        vocab, dim = original.weight.shape
        if tied_head == "untie":
            dense = nn.Linear(dim, vocab, bias=bias is not None)
            with torch.no_grad():
                dense.weight.copy_(original.weight)
                if bias is not None:
                    dense.bias.copy_(bias)
            model.set_submodule(head_name, dense.to(original.weight.dtype))
            after += count_parameters(dense)
            note = f"tied output head {head_name!r} untied and kept dense ({vocab * dim:,} parameters stay)"
        else:
            new_head = head_factory(layer, bias)
            model.set_submodule(head_name, new_head)
            after += 0 if bias is None else bias.numel()
            note = f"tied output head {head_name!r} shares the compressed parameters ({head_description})"
        if getattr(model, "config", None) is not None:
            model.config.tie_word_embeddings = False
    model.set_submodule(name, layer)
    return after, note


@torch.no_grad()
def reconstruction_metrics(rows: Callable[[Tensor], Tensor], target: Tensor, chunk: int = 8192) -> dict[str, float]:
    """How well ``rows(index)`` reproduces ``target[index]`` over the whole table.

    Parameters
    ----------
    rows : callable, LongTensor (M,) -> Tensor (M, d)
    target : Tensor, shape (V, d)
    chunk : int
        Rows per call (memory).

    Returns
    -------
    dict with ``relative_error`` (``||E_hat - E||_F / ||E||_F``, >= 0),
    ``mean_cosine`` and ``min_cosine`` (row-wise cosine in [-1, 1]).
    """
    err = ref = cos_sum = 0.0
    cos_min = 1.0
    for start in range(0, target.shape[0], chunk):
        index = torch.arange(start, min(start + chunk, target.shape[0]))
        x = target[index].float()
        x_hat = rows(index).float()
        err += float((x_hat - x).double().square().sum())
        ref += float(x.double().square().sum())
        cos = F.cosine_similarity(x_hat, x, dim=-1)
        cos_sum += float(cos.double().sum())
        cos_min = min(cos_min, float(cos.min()))
    return {
        "relative_error": math.sqrt(err / max(ref, 1e-30)),
        "mean_cosine": cos_sum / target.shape[0],
        "min_cosine": cos_min,
    }


def check_embedding_table(name: str, weight: Tensor) -> None:
    """Refuse tables the embedding passes cannot compress.

    Raises
    ------
    PassError
        If ``weight`` is not 2-D, has fewer than 2 rows (a one-token vocabulary)
        or contains NaN/inf.
    """
    if weight.dim() != 2:
        raise PassError(f"{name}: expected a 2-D embedding table, got shape {tuple(weight.shape)}")
    if weight.shape[0] < 2:
        raise PassError(f"{name}: a vocabulary of {weight.shape[0]} token(s) cannot be compressed (need at least 2)")
    if not torch.isfinite(weight).all():
        raise PassError(f"{name}: weight contains NaN or inf; cannot compress")


def tied_output_head(model: nn.Module, embedding: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the output head sharing ``embedding.weight``, or None if untied."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or getattr(head, "weight", None) is not embedding.weight:
        return None
    name = next(name for name, module in model.named_modules() if module is head)
    return name, head

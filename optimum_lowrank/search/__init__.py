"""Search: the smallest quantized ONNX graph within an accuracy budget, or the best within a size.

``search(model, config, output)`` (:func:`optimum_lowrank.search.run.search`) answers "how small can
this model get on the device without losing more than X?": per-layer bit-widths and the
token-embedding factorization are chosen from measured sensitivities and verified on the exported,
quantized ONNX Runtime graph. A recipe with a ``search:`` section, or ``optimum-lowrank optimize
--model M --max-drop 1.0 --output DIR`` without a recipe, runs it (``optimize()`` itself runs
search-free recipes only; the search writes one that reproduces its result).

Modules
-------
config
    :class:`SearchConfig`, the ``search:`` section.
sensitivity
    Per-layer damage of each choice, measured in PyTorch with ORT's exact block layout.
allocate
    The byte model (ORT's layout) and the greedy path of least damage per byte.
setup, run, report
    Defaults and data, the verification loop, the written outputs.

Importing this package loads only the config; :func:`search` loads the rest on first use (the
recipe module imports :class:`SearchConfig`, and the search imports the pipeline).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from optimum_lowrank.search.config import SearchConfig

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.search.run import search

__all__ = ["SearchConfig", "search"]


def __getattr__(name: str) -> Any:
    if name == "search":
        value = importlib.import_module("optimum_lowrank.search.run").search
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""optimum-lowrank: low-rank and tensor compression of transformer models, exported as
quantizable ONNX.

One call reads a recipe, applies its passes, checks accuracy against the
original model and exports ONNX (optionally int8)::

    from optimum_lowrank import optimize
    report = optimize("minilm", "recipes/minilm-svd.yaml", output="out/minilm")
"""

from __future__ import annotations

from optimum_lowrank.errors import AccuracyError, LowRankError, RecipeError
from optimum_lowrank.hookspecs import hookimpl
from optimum_lowrank.pipeline import optimize
from optimum_lowrank.recipe import Recipe, load_recipe
from optimum_lowrank.report import OptimizationReport

__all__ = [
    "AccuracyError",
    "LowRankError",
    "OptimizationReport",
    "Recipe",
    "RecipeError",
    "hookimpl",
    "load_recipe",
    "optimize",
]
__version__ = "0.1.0"


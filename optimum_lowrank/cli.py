"""``optimum-lowrank`` command line: ``optimize``, ``passes``, ``plugins``, ``validate``.

Errors print one line (``error: ...``) and exit with status 2 (bad input) or 1
(accuracy gate failed, export failed). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from optimum_lowrank.errors import AccuracyError, LowRankError

__all__ = ["main"]


def _optimize(args: argparse.Namespace) -> int:
    from optimum_lowrank.pipeline import optimize

    try:
        report = optimize(args.model, args.recipe, args.output, overwrite=args.overwrite, progress=not args.quiet)
    except AccuracyError as err:
        print(err.report.table(), file=sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.table())
    return 0


def _passes(args: argparse.Namespace) -> int:
    from optimum_lowrank.plugins import get_registry
    from optimum_lowrank.recipe import fields_most_specific_first

    for name, entry in get_registry().entries():
        cls = entry.pass_class
        print(f"{name}  (plugin: {entry.plugin}; targets: {', '.join(t if isinstance(t, str) else t.__name__ for t in cls.target_types)})")
        if cls.summary:
            print(f"    {cls.summary}")
        fields = cls.config_class.model_fields
        for field_name in fields_most_specific_first(cls.config_class):
            field = fields[field_name]
            default = "required" if field.is_required() else f"default {field.default!r}"
            print(f"    {field_name}: {_annotation(field.annotation)} ({default})")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from optimum_lowrank.plugins import PassRegistry, get_plugin_manager

    pm = get_plugin_manager()
    registry = PassRegistry().collect(pm)
    by_plugin: dict[str, list[str]] = {}
    for name, entry in registry.entries():
        by_plugin.setdefault(entry.plugin, []).append(name)
    versions = {pm.get_name(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    for plugin_name in sorted(by_plugin):
        print(f"{plugin_name}  ({versions.get(plugin_name, 'built-in')}): {', '.join(by_plugin[plugin_name])}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from optimum_lowrank.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    print(recipe.to_yaml(), end="")
    return 0


def _annotation(annotation: object) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-lowrank", description="Low-rank compression of transformers, exported as quantizable ONNX.")
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("optimize", help="apply a recipe, check accuracy, export ONNX (+ int8)")
    opt.add_argument("--model", required=True, help="alias (minilm, smollm2), model folder, .gguf file or hub id")
    opt.add_argument("--recipe", required=True, help="recipe YAML file")
    opt.add_argument("--output", required=True, help="output folder (onnx/, report.json)")
    opt.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    opt.add_argument("--quiet", action="store_true", help="no progress lines")
    opt.set_defaults(func=_optimize)
    sub.add_parser("passes", help="list every registered pass with its plugin and options").set_defaults(func=_passes)
    sub.add_parser("plugins", help="list plugins, their versions and the passes they add").set_defaults(func=_plugins)
    val = sub.add_parser("validate", help="validate a recipe and print it normalised")
    val.add_argument("recipe")
    val.set_defaults(func=_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LowRankError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if type(err).__name__ in ("ExportError",) else 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

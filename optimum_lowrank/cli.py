"""``optimum-lowrank`` command line: ``optimize``, ``passes``, ``plugins``, ``validate``.

``optimize --device cpu|cuda|auto`` chooses where the passes compute. Under ``torchrun
--nproc-per-node N -m optimum_lowrank.cli optimize ...`` the calibration is split over the
processes (see :mod:`optimum_lowrank.execution.distributed`); rank 0 alone exports and writes.

``optimize`` without ``--recipe`` (``--max-drop`` / ``--max-increase`` / ``--size-mb``), or with a
recipe holding a ``search:`` section, runs :func:`optimum_lowrank.search.search`.

Errors print one line (``error: ...``) and exit with status 2 (bad input) or 1
(accuracy gate failed, objective not met, export failed). SIGINT (Ctrl-C) and SIGTERM
stop a run, remove its temporary files, print ``error: interrupted`` and exit with 130 / 143.
Warnings (a plugin left out, ...) print one line each (``warning: ...``). Heavy imports
happen inside the commands.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections.abc import Sequence

from optimum_lowrank.errors import AccuracyError, Interrupted, LowRankError, ObjectiveNotMetError, RecipeError

__all__ = ["add_commands", "build_parser", "main", "run"]


_SEARCH_FLAGS = ("max_drop", "max_increase", "size_mb", "metric", "data", "search_data", "seed")


def _optimize(args: argparse.Namespace) -> int:
    from optimum_lowrank.pipeline import optimize
    from optimum_lowrank.recipe import load_recipe

    flags = {name: getattr(args, name) for name in _SEARCH_FLAGS if getattr(args, name) is not None}
    if args.recipe is None:
        if not flags:
            raise RecipeError("give --recipe, or an objective (--max-drop, --max-increase or --size-mb) to search")
        _no_save_pytorch_in_search(args)
        return _search(args, flags)
    if flags:
        raise RecipeError(f"--{', --'.join(k.replace('_', '-') for k in flags)} apply without --recipe (a recipe's 'search:' section holds them)")
    recipe = load_recipe(args.recipe)
    if recipe.search is not None:
        _no_save_pytorch_in_search(args)
        return _search(args, recipe)
    try:
        report = optimize(args.model, recipe, args.output, overwrite=args.overwrite, progress=not args.quiet,
                          save_pytorch=args.save_pytorch, device=args.device)
    except AccuracyError as err:
        print(err.report.table(), file=sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.table())
    return 0


def _no_save_pytorch_in_search(args: argparse.Namespace) -> None:
    if args.save_pytorch:
        raise RecipeError("--save-pytorch applies to a recipe without 'search:'; a search writes OUTPUT/recipe.yaml: "
                          "run that recipe with --save-pytorch to keep the PyTorch model")


def _search(args: argparse.Namespace, config) -> int:
    from optimum_lowrank.search import search

    if args.device != "cpu":
        raise RecipeError(f"--device {args.device} applies to recipe runs; the search runs on the CPU")
    try:
        report = search(args.model, config, args.output, overwrite=args.overwrite, progress=not args.quiet)
    except ObjectiveNotMetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.table())
    return 0


def _passes(args: argparse.Namespace) -> int:
    import textwrap

    from optimum_lowrank.plugins import get_registry
    from optimum_lowrank.recipe import fields_most_specific_first
    from optimum_lowrank.reference import annotation_text, default_text

    for name, entry in get_registry().entries():
        cls = entry.pass_class
        print(f"{name}  (plugin: {entry.plugin}; targets: {', '.join(t if isinstance(t, str) else t.__name__ for t in cls.target_types)})")
        if cls.summary:
            print(f"    {cls.summary}")
        fields = cls.config_class.model_fields
        for field_name in fields_most_specific_first(cls.config_class):
            field = fields[field_name]
            default = default_text(field)
            print(f"    {field_name}: {annotation_text(field.annotation)} ({default if default == 'required' else 'default ' + default})")
            if field.description:
                print(textwrap.fill(field.description, 100, initial_indent=" " * 8, subsequent_indent=" " * 8))
    _metrics_and_quantizers()
    return 0


def _metrics_and_quantizers() -> None:
    from optimum_lowrank.plugins import get_metric_registry, get_quantizer_registry

    print("\naccuracy metrics (accuracy: {metric: ...}):")
    for name, entry in get_metric_registry().entries():
        cls = entry.evaluator_class
        print(f"  {name}  (plugin: {entry.plugin}; models: {', '.join(cls.model_kinds)}; threshold: {cls.config_class.threshold_field})")
    print("\nquantizers (export: {quantize: ...}):")
    for name, entry in get_quantizer_registry().entries():
        cls = entry.quantizer_class
        print(f"  {name}  (plugin: {entry.plugin}){': ' + cls.summary if cls.summary else ''}")


def _plugins(args: argparse.Namespace) -> int:
    from optimum_lowrank.plugins import LayerRegistry, MetricRegistry, PassRegistry, QuantizerRegistry, get_plugin_manager

    pm = get_plugin_manager()
    by_plugin: dict[str, list[str]] = {}
    for registry in (PassRegistry(), MetricRegistry(), QuantizerRegistry(), LayerRegistry()):
        for plugin, names in registry.collect(pm).by_plugin().items():
            by_plugin.setdefault(plugin, []).extend(f"{name} ({registry.kind})" for name in names)
    versions = {pm.get_name(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    for plugin_name in sorted(by_plugin):
        print(f"{plugin_name}  ({versions.get(plugin_name, 'built-in')}): {', '.join(by_plugin[plugin_name])}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from optimum_lowrank.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    print(recipe.to_yaml(), end="")
    return 0


def build_parser(prog: str = "optimum-lowrank") -> argparse.ArgumentParser:
    """The ``optimum-lowrank`` parser: :func:`add_commands` on a fresh ``ArgumentParser``."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_commands(parser)
    return parser


#: One line about the command line, shown by ``optimum-lowrank --help`` and ``optimum-cli lowrank --help``.
DESCRIPTION = "Low-rank compression of transformers, exported as quantizable ONNX."


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands ``optimize``, ``passes``, ``plugins`` and ``validate`` to ``parser``.

    Shared by ``optimum-lowrank`` and ``optimum-cli lowrank`` (``optimum/commands/register/register_lowrank.py``),
    so both have the same options. The chosen command's handler is stored as ``args.lowrank_handler``
    (not ``func``: optimum-cli keeps its own ``func`` default on the parent parser); run it with :func:`run`.
    """
    sub = parser.add_subparsers(dest="lowrank_command", required=True)
    opt = sub.add_parser("optimize", help="apply a recipe (or search for one), check accuracy, export ONNX (+ int8)")
    opt.add_argument("--model", required=True, help="alias (minilm, smollm2), model folder, .gguf file or hub id")
    opt.add_argument("--recipe", help="recipe YAML file; without it, search for the smallest model within an objective")
    opt.add_argument("--output", required=True, help="output folder (onnx/, report.json; a search: recipe.yaml, search.json, plots)")
    found = opt.add_argument_group("search (no --recipe): exactly one objective; see optimum_lowrank.search")
    found.add_argument("--max-drop", type=float, help="smallest model losing at most this many metric points (STS-B Spearman x100)")
    found.add_argument("--max-increase", type=float, help="smallest model within this relative perplexity increase (0.05 = +5%%)")
    found.add_argument("--size-mb", type=float, help="best accuracy within this many MB")
    found.add_argument("--metric", help="stsb_spearman (encoders) or perplexity (decoders); default: the model kind's")
    found.add_argument("--data", help="gate data (default: STS-B dev / WikiText-2 raw test)")
    found.add_argument("--search-data", help="data the candidates are scored on (default: STS-B train / WikiText-2 valid)")
    found.add_argument("--seed", type=int, help="seed of the passes (default 0)")
    opt.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    opt.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                     help="where the passes compute (auto: cuda if available); evaluation and export run on the CPU")
    opt.add_argument("--quiet", action="store_true", help="no progress lines")
    opt.add_argument("--save-pytorch", action="store_true",
                     help="also write the compressed PyTorch model to OUTPUT/pytorch/ (optimum_lowrank.from_pretrained loads it)")
    opt.set_defaults(lowrank_handler=_optimize)
    passes = sub.add_parser("passes", help="list every registered pass (with its options), metric and quantizer")
    passes.set_defaults(lowrank_handler=_passes)
    sub.add_parser("plugins", help="list plugins, their versions and the passes, metrics, quantizers and layers they add").set_defaults(
        lowrank_handler=_plugins
    )
    val = sub.add_parser("validate", help="validate a recipe and print it normalised")
    val.add_argument("recipe")
    val.set_defaults(lowrank_handler=_validate)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=file or sys.stderr)


def _terminate(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """``optimum-lowrank ARGS``: parse ``argv`` (default ``sys.argv[1:]``) and :func:`run` the command."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the command parsed by a parser built with :func:`add_commands`; returns the exit status.

    0 success; 1 accuracy gate failed, objective not met or export failed; 2 bad input
    (any other :class:`~optimum_lowrank.errors.LowRankError`); 128 + signal number when interrupted.
    """
    previous_show = warnings.showwarning
    warnings.showwarning = _one_line_warning
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous_term = None
    try:
        return args.lowrank_handler(args)
    except LowRankError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if type(err).__name__ in ("ExportError",) else 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM through _terminate; the with-blocks have cleaned up
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print("error: interrupted", file=sys.stderr)
        return 128 + int(signum)
    finally:
        warnings.showwarning = previous_show
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

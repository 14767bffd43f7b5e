"""What every compression pass shares: its config base class, the context it
runs in, target selection, and the per-layer report it returns.

Writing a pass
--------------
Subclass :class:`CompressionPass`, give it a ``name`` (the recipe id), a
``config_class`` deriving from :class:`PassConfig`, the ``target_types`` it can
replace, and implement :meth:`CompressionPass.apply`. Register it from a plugin::

    from optimum_lowrank import hookimpl

    @hookimpl
    def lowrank_register_passes(register):
        register(MyPass)

The pipeline runs passes on a deep copy of the caller's model, so a pass that
raises half-way leaves nothing half-modified for the caller.
"""

from __future__ import annotations

import fnmatch
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from optimum_lowrank.errors import PassError, TargetError

try:  # Python 3.11+
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse
from optimum_lowrank.report import LayerReport
from optimum_lowrank.strict import StrictScalars

__all__ = ["CompressionPass", "PassConfig", "PassContext", "count_parameters", "match_names", "resolve_targets"]


class PassConfig(StrictScalars):
    """Base of every pass config: frozen, unknown keys rejected.

    Attributes
    ----------
    targets : tuple of str, at least one
        Module names (``fnmatch`` globs such as ``encoder.layer.*.attention.self.query``)
        or regular expressions prefixed with ``re:`` (matched against the whole name).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: tuple[str, ...] = Field(min_length=1, description=(
        "Module names (`fnmatch` globs such as `encoder.layer.*.attention.self.query`) or regular expressions "
        "prefixed with `re:` (matched against the whole name)."
    ))

    @field_validator("targets", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("targets")
    @classmethod
    def _valid_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if pattern.startswith("re:"):
                try:
                    compile_target(pattern)
                except TargetError as err:
                    raise ValueError(str(err)) from None
            elif not pattern:
                raise ValueError("empty target pattern")
        return value


@dataclass
class PassContext:
    """What a pass may need beyond the model.

    Attributes
    ----------
    kind : {"encoder", "decoder"}
    tokenizer : PreTrainedTokenizerBase or None
    calibration_ids : callable returning LongTensor (num_samples, seq_len)
        Token windows of the recipe's calibration text; evaluated lazily and cached,
        so passes that need no data cost nothing.
    seed : int
    token_counts_loader : callable returning TokenCounts, optional
        Occurrences of every token id in the whole calibration text (the pipeline
        tokenizes the text once and caches the counts on disk); see
        :meth:`token_counts`.
    layer_map : callable, optional
        ``layer_map(names, fn) -> {name: fn(name)}``; in a multi-process run the
        execution engine spreads the calls over the ranks and gathers the results on
        every rank. See :meth:`map_layers`.
    """

    kind: Literal["encoder", "decoder"] = "encoder"
    tokenizer: Any = None
    calibration_loader: Callable[[], torch.Tensor] | None = None
    calibration_description: str = ""
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    token_counts_loader: Callable[[], Any] | None = None
    layer_map: Callable[[list[str], Callable[[str], Any]], dict[str, Any]] | None = None
    _token_counts: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def map_layers(self, names: Iterable[str], fn: Callable[[str], Any]) -> dict[str, Any]:
        """``{name: fn(name)}`` for every name, in order; ``fn`` must be deterministic and its result picklable.

        In one process ``fn`` runs on every name here. Under ``torchrun`` (see
        :mod:`optimum_lowrank.execution.distributed`) each rank runs ``fn`` on its share of
        ``names`` and every rank receives all the results.
        """
        names = list(names)
        if self.layer_map is None:
            return {name: fn(name) for name in names}
        return self.layer_map(names, fn)

    @cached_property
    def calibration_ids(self) -> torch.Tensor:
        if self.calibration_loader is None:
            raise TargetError("this pass needs calibration data, but the pipeline gave none")
        return self.calibration_loader()

    @property
    def has_calibration(self) -> bool:
        """Whether calibration data (windows or token counts) is available."""
        return self.calibration_loader is not None or self.token_counts_loader is not None

    def token_counts(self, vocab_size: int, what: str = "the embedding"):
        """Calibration token counts for a table of ``vocab_size`` rows.

        From ``token_counts_loader`` (the whole calibration text) when given, else
        from the calibration windows.

        Returns
        -------
        optimum_lowrank.vocab.TokenCounts
            ``counts`` of shape (vocab_size,).

        Raises
        ------
        TargetError
            If the context has no calibration data at all.
        DataError
            If the text produces no tokens, or the tokenizer does not match the table.
        """
        from optimum_lowrank.vocab import count_ids

        cached = self._token_counts
        if vocab_size not in cached:
            if self.token_counts_loader is not None:
                cached[vocab_size] = self.token_counts_loader().resized(vocab_size, what)
            elif self.calibration_loader is not None:
                cached[vocab_size] = count_ids(self.calibration_ids, vocab_size, self.calibration_description or "calibration windows")
            else:
                raise TargetError("token counts need calibration data, but the pipeline gave none")
        return cached[vocab_size]


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (a tensor shared by two modules counts once)."""
    return sum(p.numel() for p in module.parameters())


def _type_names(types: tuple[type | str, ...]) -> str:
    return ", ".join(t if isinstance(t, str) else t.__name__ for t in types)


def _is_instance(module: nn.Module, types: tuple[type | str, ...]) -> bool:
    return any(type(module).__name__ == t if isinstance(t, str) else isinstance(module, t) for t in types)


#: Longest ``re:`` target (characters).
MAX_REGEX_CHARS = 500
#: Most repetitions (``*``, ``+``, ``{m,n}`` with n > 1) one path through a ``re:`` target may hold.
MAX_REGEX_REPEATS = 4
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}


def compile_target(pattern: str) -> re.Pattern:
    """Compile a ``re:`` target, refusing the ones whose matching time can explode.

    Backtracking can take exponential time on a repetition of something that can itself
    repeat or choose (``(.*.*)*X``, ``(.|.)*X``) and polynomial time of a high degree on
    many repetitions in a row (``.*.*.*.*.*.*X``). Refused: a repetition of a group that holds
    a repetition or an alternation, a backreference, more than :data:`MAX_REGEX_REPEATS`
    repetitions along one path, more than :data:`MAX_REGEX_CHARS` characters. Module names
    are matched whole (``re.fullmatch``), so ``.*`` is rarely needed at both ends.

    Parameters
    ----------
    pattern : str
        ``"re:<regex>"``.

    Raises
    ------
    TargetError
        Invalid or refused regex; the message says why and what to write instead.
    """
    body = pattern[3:]
    if len(body) > MAX_REGEX_CHARS:
        raise TargetError(f"target regex of {len(body)} characters; at most {MAX_REGEX_CHARS}")
    try:
        regex = re.compile(body)
        parsed = _sre_parse.parse(body)
    except (re.error, RecursionError, OverflowError) as err:
        raise TargetError(f"target {pattern[:80]!r} is not a valid regular expression: {err}") from None
    try:
        cost = _regex_cost(parsed)
    except ValueError as err:
        raise TargetError(f"target {pattern[:80]!r}: {err}; matching could take exponential time, "
                          "list the names or use a pattern without nested repetition") from None
    if cost > MAX_REGEX_REPEATS:
        raise TargetError(f"target {pattern[:80]!r} holds {cost} repetitions in a row (at most {MAX_REGEX_REPEATS}); "
                          "matching could take very long: simplify it or list several targets")
    return regex


def _regex_cost(items) -> int:
    """Repetitions along the costliest path of a parsed regex; ValueError for a refused construct."""
    total = 0
    for op, av in items:
        if op in _REPEATS:
            _low, high, sub = av
            inner = _regex_cost(sub)
            if high > 1 and (inner or _has_branch(sub)):
                raise ValueError("a repetition of a group that itself repeats or alternates")
            total += (1 if high > 1 else 0) + inner
        elif op is _sre.SUBPATTERN:
            total += _regex_cost(av[-1])
        elif op is _sre.BRANCH:
            total += max(_regex_cost(branch) for branch in av[1])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            total += _regex_cost(av[1])
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            total += _regex_cost(av)
        elif op in (_sre.GROUPREF, getattr(_sre, "GROUPREF_EXISTS", None)):
            raise ValueError("a backreference")
    return total


def _has_branch(items) -> bool:
    for op, av in items:
        if op is _sre.BRANCH:
            return True
        if op is _sre.SUBPATTERN and _has_branch(av[-1]):
            return True
    return False


def _check_known_behaviour(pattern: str, name: str, module: nn.Module, types: tuple[type | str, ...]) -> None:
    """Refuse a module whose class subclasses a target type and overrides its ``forward``.

    A pass replaces a target by a layer that computes what the base class computes; a
    subclass with its own ``forward`` (Gemma's ``Gemma3TextScaledWordEmbedding`` multiplies the
    looked-up rows by ``sqrt(hidden_size)``, a quantized ``Linear`` dequantises) would silently
    lose that behaviour. The exact class, a class named in ``types`` by name, or a subclass
    that keeps the base ``forward`` is accepted.

    Raises
    ------
    TargetError
        Naming the module, its class and the base class whose behaviour it changes.
    """
    cls = type(module)
    for target in types:
        if isinstance(target, str):
            if cls.__name__ == target:
                return
        elif cls is target or (isinstance(module, target) and cls.forward is target.forward):
            return
    base = next(t for t in types if not isinstance(t, str) and isinstance(module, t))
    raise TargetError(
        f"target {pattern!r} matches {name!r}, a {cls.__module__}.{cls.__qualname__}: a subclass of "
        f"{base.__module__}.{base.__qualname__} with its own forward, which this pass would drop "
        f"(the pass handles {_type_names(types)} exactly); leave it out of the targets"
    )


def match_names(pattern: str, names: Iterable[str]) -> list[str]:
    """The ``names`` that ``pattern`` matches, in order: an ``fnmatch`` glob, or a regex prefixed ``re:`` (``re.fullmatch``).

    Raises
    ------
    TargetError
        A ``re:`` target :func:`compile_target` refuses.
    """
    if pattern.startswith("re:"):
        regex = compile_target(pattern)
        return [name for name in names if regex.fullmatch(name)]
    return [name for name in names if fnmatch.fnmatchcase(name, pattern)]


def resolve_targets(model: nn.Module, patterns: tuple[str, ...], types: tuple[type | str, ...]) -> dict[str, nn.Module]:
    """Modules of ``model`` whose qualified names match any of ``patterns`` and whose type is in ``types``.

    Parameters
    ----------
    model : nn.Module
    patterns : tuple of str
        ``fnmatch`` globs, or regexes prefixed ``re:`` (``re.fullmatch``).
    types : tuple of module classes or class names
        A pattern may match other modules too (e.g. containers); those are ignored.

    Returns
    -------
    dict, name -> module, in ``named_modules`` order.

    Raises
    ------
    TargetError
        If a pattern matches no module, or matches only modules of other types
        (the message lists what it matched and the supported types).
    """
    modules = dict(model.named_modules())
    modules.pop("", None)
    selected: dict[str, nn.Module] = {}
    for pattern in patterns:
        matched = match_names(pattern, modules)
        if not matched:
            candidates = [name for name, mod in modules.items() if _is_instance(mod, types)]
            shown = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
            raise TargetError(
                f"target {pattern!r} matches no module of {type(model).__name__}; "
                f"modules of a supported type ({_type_names(types)}) include: {shown or '(none)'}"
            )
        fitting = [name for name in matched if _is_instance(modules[name], types)]
        for name in fitting:
            _check_known_behaviour(pattern, name, modules[name], types)
        if not fitting:
            found = sorted({type(modules[name]).__name__ for name in matched})
            raise TargetError(
                f"target {pattern!r} matches {len(matched)} module(s) of type {', '.join(found)} "
                f"(e.g. {matched[0]!r}); this pass supports {_type_names(types)}"
            )
        for name in fitting:
            selected.setdefault(name, modules[name])
    return selected


class CompressionPass(ABC):
    """A compression technique, applied by the pipeline to the modules matched by ``config.targets``.

    Class attributes
    ----------------
    name : str
        The recipe id (``pass: <name>``); a Python identifier, unique across plugins.
    config_class : type[PassConfig]
        Validates the recipe entry; unknown keys are errors.
    target_types : tuple of module classes or class names
        What the pass can replace.
    summary : str
        One line for ``optimum-lowrank passes``.
    example_options : dict or None
        A recipe entry (without ``pass``) that works on
        :func:`optimum_lowrank.testing.tiny_bert`; the contract test
        (:func:`optimum_lowrank.testing.check_pass_contract`) runs the pass with it.
    reduces_parameters : bool
        False for a pass that saves compute rather than parameters (``token_downsampling``
        adds small predictors); the contract then allows at most 25% more parameters.
    supports_sequential : bool
        True for a pass that can compress one transformer block at a time, seeing only that
        block and its calibration inputs (sequential onloading, ``execution: {mode:
        sequential}``, see :mod:`optimum_lowrank.execution`); such a pass implements
        :meth:`apply_block` and, if it needs calibration data, :meth:`block_collector`.
        Passes that need the whole model (a global budget, a fine-tune, tied embeddings)
        leave it False and sequential mode refuses them by name.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]] = PassConfig
    target_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
    summary: ClassVar[str] = ""
    example_options: ClassVar[dict[str, Any] | None] = None
    reduces_parameters: ClassVar[bool] = True
    supports_sequential: ClassVar[bool] = False

    def __init__(self, config: PassConfig):
        if not isinstance(config, self.config_class):
            config = self.config_class.model_validate(config)
        self.config = config

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules this pass will touch; see :func:`resolve_targets`."""
        return resolve_targets(model, self.config.targets, self.target_types)

    @abstractmethod
    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        """Replace the target modules of ``model`` in place and report per layer.

        Parameters
        ----------
        model : nn.Module
            A copy owned by the pipeline; modify it in place (``model.set_submodule``).
        targets : dict, name -> module
            From :meth:`select`.
        context : PassContext

        Returns
        -------
        list of LayerReport, one per target (skipped layers included, with the reason).

        Raises
        ------
        PassError
            If a target cannot be compressed as configured (e.g. rank out of range).
        """

    def sequential_problem(self) -> str | None:
        """Why this configured pass cannot run block by block (None when it can).

        The default says so for a pass with ``supports_sequential = False``; a pass that
        supports it may still refuse some options (e.g. a budget shared by all blocks).
        """
        if not self.supports_sequential:
            return f"pass {self.name!r} needs the whole model (it does not declare supports_sequential)"
        return None

    def block_collector(self, targets: dict[str, nn.Module]) -> AbstractContextManager[Any] | None:
        """Sequential mode: what to record while the block runs on its calibration inputs.

        Returns None for a pass that needs no calibration data. Otherwise a context
        manager: on entry it installs hooks on ``targets`` (the pass's targets inside the
        current block, possibly none) and yields the object they fill; on exit it removes
        them. The engine enters it, runs the block over the calibration windows, sums the
        statistics over ranks (each :class:`~optimum_lowrank.linalg.whitening.InputStatistics`
        value of a dict is all-reduced) and hands the object to :meth:`apply_block`.
        """
        return None

    def apply_block(self, model: nn.Module, targets: dict[str, nn.Module], collected: Any, context: PassContext) -> list[LayerReport]:
        """Sequential mode: compress the ``targets`` of one block, in place in ``model``.

        Parameters
        ----------
        model : nn.Module
            The model skeleton; only the current block (and the embeddings) hold real
            weights, the other blocks are on the ``meta`` device.
        targets : dict, name -> module
            The pass's targets inside the current block (full names, ``model.layers.3.mlp.up_proj``).
        collected : object or None
            What :meth:`block_collector` recorded, summed over ranks; None for a data-free pass.
        context : PassContext
            Use :meth:`PassContext.map_layers` to spread per-layer work over ranks.

        Returns
        -------
        list of LayerReport, one per target.

        Raises
        ------
        PassError
            The default: the pass does not support sequential mode.
        """
        raise PassError(self.sequential_problem() or f"pass {self.name!r} does not implement apply_block")

    def run(self, model: nn.Module, context: PassContext | None = None) -> list[LayerReport]:
        """Select targets and apply; convenient outside the pipeline (modifies ``model``)."""
        return self.apply(model, self.select(model), context or PassContext())

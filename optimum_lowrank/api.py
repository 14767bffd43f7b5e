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
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from optimum_lowrank.errors import TargetError
from optimum_lowrank.report import LayerReport

__all__ = ["CompressionPass", "PassConfig", "PassContext", "count_parameters", "match_names", "resolve_targets"]


class PassConfig(BaseModel):
    """Base of every pass config: frozen, unknown keys rejected.

    Attributes
    ----------
    targets : tuple of str, at least one
        Module names (``fnmatch`` globs such as ``encoder.layer.*.attention.self.query``)
        or regular expressions prefixed with ``re:`` (matched against the whole name).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: tuple[str, ...] = Field(min_length=1)

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
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(f"target {pattern!r} is not a valid regular expression: {err}") from None
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
    """

    kind: Literal["encoder", "decoder"] = "encoder"
    tokenizer: Any = None
    calibration_loader: Callable[[], torch.Tensor] | None = None
    calibration_description: str = ""
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    token_counts_loader: Callable[[], Any] | None = None
    _token_counts: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

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


def match_names(pattern: str, names: Iterable[str]) -> list[str]:
    """The ``names`` that ``pattern`` matches, in order: an ``fnmatch`` glob, or a regex prefixed ``re:`` (``re.fullmatch``)."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
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
    """

    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]] = PassConfig
    target_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
    summary: ClassVar[str] = ""
    example_options: ClassVar[dict[str, Any] | None] = None
    reduces_parameters: ClassVar[bool] = True

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

    def run(self, model: nn.Module, context: PassContext | None = None) -> list[LayerReport]:
        """Select targets and apply; convenient outside the pipeline (modifies ``model``)."""
        return self.apply(model, self.select(model), context or PassContext())

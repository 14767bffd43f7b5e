"""Recipes: the versioned YAML file that says which passes to run, how to check
accuracy and how to export.

A recipe is validated strictly, before any model is touched: an unknown key, an
unknown pass id or a value out of range is a :class:`~optimum_lowrank.errors.RecipeError`
naming the field and the allowed values.

Example
-------
.. code-block:: yaml

    version: 1
    passes:
      - {pass: svd, targets: ["re:.*intermediate\\\\.dense"], rank_ratio: 0.5}
    accuracy: {metric: stsb_spearman, data: ../shared/data/stsb/sts-dev.tsv, max_drop: 2.0}
    export: {quantize: dynamic_int8}
"""

from __future__ import annotations

import os
import warnings
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo, model_validator

from optimum_lowrank.api import PassConfig
from optimum_lowrank.data import resolve_recipe_paths
from optimum_lowrank.errors import RecipeError, UnknownMetricError, UnknownPassError
from optimum_lowrank.execution.config import ExecutionConfig
from optimum_lowrank.export_config import ExportConfig, LatencyConfig, Strict, WeightOnlyConfig, WeightOnlyOverride
from optimum_lowrank.search.config import SearchConfig
from optimum_lowrank.strict import StrictYAMLError, excerpt, load_yaml

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.plugins import MetricRegistry, PassRegistry

__all__ = [
    "AccuracyConfig",
    "CalibrationConfig",
    "ExportConfig",
    "FinetuneConfig",
    "LatencyConfig",
    "MaxDropConfig",
    "PassStep",
    "Recipe",
    "WeightOnlyConfig",
    "WeightOnlyOverride",
    "format_validation_error",
    "load_recipe",
]

SUPPORTED_VERSIONS = (1,)


_Strict = Strict


class CalibrationConfig(_Strict):
    """Calibration text used by data-driven passes and static quantization.

    ``data`` is a text file path, ``datasets:NAME[:CONFIG][:SPLIT]``, or None for
    the text that ships with Python (``pydoc_data.topics``). ``num_samples``
    windows of ``seq_len`` tokens are cut from it.
    """

    data: str | None = None
    num_samples: int = Field(32, ge=1, le=100_000)
    seq_len: int = Field(128, ge=8, le=8192)


class FinetuneConfig(_Strict):
    """A short fine-tune after the passes (see :func:`optimum_lowrank.finetune.finetune`).

    Decoders train on the language-model loss; encoders distil the original's last
    hidden states. ``train: lowrank`` (default) updates only the low-rank factors.

    ``num_samples``: train on that many *fresh* windows of ``calibration.seq_len``
    tokens, cut from the calibration text right after the calibration windows (text
    the passes did not calibrate on; each window seen once when ``steps * batch_size
    <= num_samples``). A text too short for them is a ``DataError`` that says how
    many windows it gives. Unset (default): train on the calibration windows.

    ``max_minutes``: a CPU-time budget (> 0) for the training loop instead of, or besides,
    ``steps`` (whichever ends first); at least one of the two is set. ``loss: logits``
    distils the original's next-token distribution (KL), the healing the low-rank
    recipes use.
    """

    steps: int | None = Field(None, ge=1, le=100_000)
    max_minutes: float | None = Field(None, gt=0, le=10_000)
    num_samples: int | None = Field(None, ge=1, le=1_000_000)
    lr: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(1, ge=1, le=1024)
    train: Literal["lowrank", "all"] = "lowrank"
    loss: Literal["auto", "lm", "hidden", "logits"] = "auto"
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _budget(self) -> FinetuneConfig:
        if self.steps is None and self.max_minutes is None:
            raise ValueError("finetune needs steps or max_minutes (or both)")
        return self


class AccuracyConfig(_Strict):
    """Base of every metric's accuracy-gate config: the recipe's ``accuracy:`` section.

    Each registered metric (``lowrank_register_metrics`` hook) has its own subclass,
    its ``config_class``, with the metric's options and exactly one threshold field,
    named by :attr:`threshold_field`; it validates the recipe's ``accuracy:`` section,
    so an unknown key is an error naming the metric's allowed keys. The built-in
    metrics' configs are in :mod:`optimum_lowrank.evaluation`.

    Attributes
    ----------
    metric : str
        The registered metric's ``name``.
    data : str or None
        What the metric reads (each metric documents it); None: the metric's default.
    enforce : bool
        False measures and reports without failing (for benchmarks).
    threshold_field : ClassVar[str]
        Set by each subclass: the name of its threshold field. Declare that field as
        ``float | None`` with default None and its range: a recipe must set it (the
        error says so), while :func:`~optimum_lowrank.evaluation.build_evaluator`,
        which only measures, validates with ``context={"measure_only": True}`` and
        may leave it unset.

    Raises
    ------
    pydantic.ValidationError
        If the threshold is missing (outside ``measure_only``) or a value is out of
        range; :meth:`Recipe.from_dict` turns it into a :class:`RecipeError`.
    """

    metric: str
    data: str | None = None
    enforce: bool = True

    threshold_field: ClassVar[str]

    @model_validator(mode="after")
    def _complete(self, info: ValidationInfo) -> AccuracyConfig:
        if not (info.context or {}).get("measure_only"):
            self.check_complete()
        return self

    def check_complete(self) -> None:
        """Raise ValueError if the gate cannot run as given: here, a missing threshold.

        Subclasses extend it (``stsb_spearman`` also needs ``data``); it is skipped
        when validating with ``context={"measure_only": True}``.
        """
        if getattr(self, self.threshold_field) is None:
            raise ValueError(f"metric {self.metric!r} needs the threshold {self.threshold_field!r}")

    @property
    def threshold(self) -> tuple[str, float]:
        """``(name, value)`` of this metric's threshold, e.g. ``("max_increase", 0.05)``.

        Raises
        ------
        ValueError
            If the threshold is not set (a config validated for measuring only).
        """
        value = getattr(self, self.threshold_field)
        if value is None:
            raise ValueError(f"metric {self.metric!r}: no threshold {self.threshold_field!r} set")
        return self.threshold_field, float(value)

    @abstractmethod
    def acceptable(self, original: float, value: float) -> bool:
        """Whether ``value``, measured on a compressed model, passes the gate.

        Reads only the threshold field: the pipeline rebuilds the config from the
        report's threshold to judge each figure.

        Parameters
        ----------
        original : float
            The metric on the original model, in the metric's unit.
        value : float
            The metric on the compressed model (PyTorch or an ONNX graph).
        """


class MaxDropConfig(AccuracyConfig):
    """Base of the gates of higher-is-better metrics read from a required file: ``max_drop`` points.

    Attributes
    ----------
    max_drop : float, 0 <= max_drop <= 100
        Allowed drop, in the metric's points; the compressed value passes when
        ``value >= original - max_drop``.
    data_needed : ClassVar[str]
        Set by each subclass: what ``data`` must name (said by the error when it is missing).
    """

    threshold_field: ClassVar[str] = "max_drop"
    data_needed: ClassVar[str]

    max_drop: float | None = Field(None, ge=0, le=100)

    def check_complete(self) -> None:
        super().check_complete()
        if self.data is None:
            raise ValueError(f"metric {self.metric!r} needs 'data': {self.data_needed}")

    def acceptable(self, original: float, value: float) -> bool:
        return value >= original - self.threshold[1]


@dataclass(frozen=True)
class PassStep:
    """One validated entry of ``passes:``: the pass id and its typed config."""

    pass_id: str
    config: PassConfig

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_id, **self.config.model_dump(mode="json", exclude_defaults=True)}


class Recipe(_Strict):
    """A validated recipe. Build it with :func:`load_recipe` or :meth:`Recipe.from_dict`."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    version: int
    passes: tuple[PassStep, ...] = ()
    finetune: FinetuneConfig | None = None
    accuracy: SerializeAsAny[AccuracyConfig] | None = None
    export: ExportConfig | None = None
    calibration: CalibrationConfig = CalibrationConfig()
    execution: ExecutionConfig = ExecutionConfig()
    seed: int = 0
    search: SearchConfig | None = None

    @model_validator(mode="after")
    def _search_alone(self) -> Recipe:
        """A ``search:`` recipe is run by :func:`optimum_lowrank.search.search`; it writes the passes and export itself."""
        if self.search is not None:
            extra = [k for k in ("passes", "finetune", "accuracy", "export") if getattr(self, k)]
            extra += [k for k in ("calibration", "seed") if getattr(self, k) != type(self).model_fields[k].default]
            if extra:
                raise ValueError(f"a recipe with 'search:' holds only version and search (set search.calibration / search.seed there); "
                                 f"also given: {', '.join(extra)}")
        return self

    @classmethod
    def from_dict(cls, data: Any, registry: PassRegistry | None = None, metrics: MetricRegistry | None = None) -> Recipe:
        """Validate a recipe given as a mapping (e.g. parsed YAML).

        Parameters
        ----------
        data : dict
            Keys ``version`` (required, one of 1), ``passes``, ``finetune``,
            ``accuracy``, ``export``, ``calibration``, ``execution``
            (:class:`~optimum_lowrank.execution.config.ExecutionConfig`), ``seed``; or ``version`` and ``search``
            (:class:`~optimum_lowrank.search.config.SearchConfig`, run by :func:`optimum_lowrank.search.search`).
        registry : PassRegistry, optional
            Where pass ids are looked up; the default plugin manager's registry.
        metrics : MetricRegistry, optional
            Where the ``accuracy:`` metric is looked up; the default plugin manager's.

        Raises
        ------
        RecipeError
            Unknown key, unknown version, bad value; the message names the field.
        UnknownPassError
            A ``pass:`` id no plugin registers; the message lists the known ids.
        UnknownMetricError
            An ``accuracy: {metric: ...}`` no plugin registers; the message lists the
            registered metrics by plugin.
        """
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a mapping with keys version, passes, ...; got {type(data).__name__}")
        if "version" not in data:
            raise RecipeError(f"recipe: missing required key 'version' (supported: {list(SUPPORTED_VERSIONS)})")
        if type(data["version"]) is not int or data["version"] not in SUPPORTED_VERSIONS:
            raise RecipeError(f"recipe: unknown version {excerpt(data['version'])} (supported: {list(SUPPORTED_VERSIONS)}); an integer")
        raw_passes = data.get("passes", [])
        if raw_passes is None:
            raw_passes = []
        if not isinstance(raw_passes, list):
            raise RecipeError("recipe: 'passes' must be a list of {pass: ID, targets: [...], ...} mappings")
        if registry is None:
            from optimum_lowrank.plugins import get_registry

            registry = get_registry()
        steps = tuple(_parse_step(i, raw, registry) for i, raw in enumerate(raw_passes))
        fields: dict[str, Any] = {**data, "passes": steps}
        if data.get("accuracy") is not None:
            if metrics is None:
                from optimum_lowrank.plugins import get_metric_registry

                metrics = get_metric_registry()
            fields["accuracy"] = _parse_accuracy(data["accuracy"], metrics)
        try:
            recipe = cls.model_validate(fields)
        except ValidationError as err:
            raise RecipeError(format_validation_error(err, "recipe", cls)) from None
        if recipe.export is not None:
            _check_quantizer(recipe.export.quantize)
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, ready for ``yaml.safe_dump`` (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = {"version": self.version, "passes": [step.to_dict() for step in self.passes]}
        for key in ("finetune", "accuracy", "export", "search"):
            section = getattr(self, key)
            if section is not None:
                out[key] = section.model_dump(mode="json", exclude_defaults=True)
        for key in ("calibration", "execution"):
            section = getattr(self, key).model_dump(mode="json", exclude_defaults=True)
            if section:
                out[key] = section
        if self.seed:
            out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_quantizer(name: str) -> None:
    from optimum_lowrank.plugins import get_quantizer_registry

    quantizers = get_quantizer_registry()
    if quantizers.get(name) is None:
        raise RecipeError(f"recipe: export.quantize: unknown quantizer {name!r}; registered: {', '.join(quantizers.names())}")


def _parse_step(index: int, raw: Any, registry: PassRegistry) -> PassStep:
    from optimum_lowrank.plugins import broken_note

    where = f"passes[{index}]"
    if not isinstance(raw, dict) or "pass" not in raw:
        raise RecipeError(f"{where}: each pass is a mapping with a 'pass' id; got {excerpt(raw)}")
    pass_id = raw["pass"]
    if not isinstance(pass_id, str):
        raise UnknownPassError(f"{where}: 'pass' is a pass id (a string); got {excerpt(pass_id)}; registered passes: {', '.join(registry.names())}")
    options = {k: v for k, v in raw.items() if k != "pass"}
    pass_cls = registry.get(pass_id)
    if pass_cls is None:
        raise UnknownPassError(f"{where}: unknown pass {excerpt(pass_id)}; registered passes: {', '.join(registry.names()) or '(none)'}{broken_note()}")
    try:
        config = pass_cls.config_class.model_validate(options)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, f"{where} ({pass_id})", pass_cls.config_class)) from None
    return PassStep(pass_id, config)


def _parse_accuracy(raw: Any, metrics: MetricRegistry) -> AccuracyConfig:
    """Validate ``accuracy:`` with the ``config_class`` of the metric it names."""
    if not isinstance(raw, dict) or "metric" not in raw:
        raise RecipeError(f"accuracy: a mapping with a 'metric' id and its threshold; got {excerpt(raw)}; metrics: {_metric_choices(metrics)}")
    metric = raw["metric"]
    if not isinstance(metric, str):
        raise UnknownMetricError(f"accuracy: metric: Input should be {_metric_choices(metrics)}, got {excerpt(metric)}")
    evaluator_class = metrics.get(metric)
    if evaluator_class is None:
        raise UnknownMetricError(f"accuracy: metric: Input should be {_metric_choices(metrics)}, got {excerpt(metric)}")
    config_class = evaluator_class.config_class
    wanted = config_class.threshold_field
    thresholds = {entry.evaluator_class.config_class.threshold_field for _, entry in metrics.entries()}
    others = sorted(key for key in raw if key in thresholds and key not in config_class.model_fields)
    if others:
        raise RecipeError(f"accuracy ({metric}): metric {metric!r} takes the threshold {wanted!r}, not {', '.join(others)}")
    try:
        return config_class.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, f"accuracy ({metric})", config_class)) from None


def _metric_choices(metrics: MetricRegistry) -> str:
    """The registered metrics grouped by plugin, built-ins first:
    ``'perplexity', 'stsb_spearman' or 'cosine_agreement' (built in), or 'x' (plugin 'p')``."""
    from optimum_lowrank.plugins import plugin_label

    groups = []
    for plugin, names in metrics.by_plugin().items():
        quoted = [repr(name) for name in names]
        listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        groups.append(f"{listed} ({plugin_label(plugin)})")
    return ", or ".join(groups) or "(no metric registered)"


def fields_most_specific_first(model: type[BaseModel]) -> list[str]:
    """``targets`` (passes) or the threshold (metrics' accuracy configs), then the fields the class itself
    declares, then the inherited ones (shared option groups)."""
    first = [name for name in ("targets", getattr(model, "threshold_field", None)) if name in model.model_fields]
    own = [name for name in model.model_fields if name in model.__dict__.get("__annotations__", {}) and name not in first]
    rest = [name for name in model.model_fields if name not in own and name not in first]
    return first + own + rest


def format_validation_error(err: ValidationError, where: str, model: type[BaseModel]) -> str:
    """One readable message per problem (at most 10), naming the field and, for unknown keys, the
    allowed ones; input values are shown as bounded excerpts (:func:`~optimum_lowrank.strict.excerpt`)."""
    lines = []
    for problem in err.errors():
        loc = ".".join(excerpt(part, 40) if not isinstance(part, (str, int)) else str(part)[:40] for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            owner = _owner_model(model, problem["loc"][:-1])
            allowed = ", ".join(fields_most_specific_first(owner)) if owner else "?"
            section = ".".join(str(part) for part in problem["loc"][:-1])
            lines.append(f"{where}{': ' + section if section else ''}: unknown key {excerpt(problem['loc'][-1])}; allowed keys: {allowed}")
        elif problem["type"] == "literal_error":
            lines.append(f"{where}: {loc}: {problem['msg']}, got {excerpt(problem['input'])}")
        elif problem["type"] in ("value_error", "assertion_error"):
            msg = problem["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(f"{where}{': ' + loc if loc else ''}: {msg}")
        else:
            lines.append(f"{where}: {loc}: {problem['msg']}, got {excerpt(problem['input'])}")
        if len(lines) >= 10:
            lines.append(f"... ({len(err.errors()) - 10} more problems)")
            break
    return "; ".join(lines)


def _owner_model(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def load_recipe(
    source: Recipe | dict | str | os.PathLike,
    registry: PassRegistry | None = None,
    metrics: MetricRegistry | None = None,
) -> Recipe:
    """Load and validate a recipe.

    Parameters
    ----------
    source : Recipe, dict, path to a YAML file, or a YAML string
        An ``os.PathLike`` is a path. A string is a path only when it is one line of
        at most :data:`MAX_PATH_CHARS` bytes that ends in
        ``.yaml``/``.yml`` or names an existing file; any other string is YAML text.
        The YAML is read strictly (:func:`~optimum_lowrank.strict.load_yaml`): no
        aliases, no duplicate keys, at most 32 levels of nesting, integers of at
        most 30 digits; a file is UTF-8 text of at most 1 MiB.
    registry : PassRegistry, optional
        Where pass ids are looked up (default: every installed plugin's passes).
    metrics : MetricRegistry, optional
        Where the accuracy metric is looked up (default: every installed plugin's metrics).

    Raises
    ------
    RecipeError
        Missing or unreadable file, text that is not UTF-8, malformed YAML, a YAML
        alias, a duplicate key, or any validation problem; messages show bounded
        excerpts of the input, never the whole of it.
    """
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return Recipe.from_dict(source, registry, metrics)
    if not isinstance(source, (str, os.PathLike)):
        raise RecipeError(f"a recipe is a Recipe, a dict, a path or YAML text; got {type(source).__name__}")
    folder = None
    if _is_path(source):
        text, where, folder = _read_recipe_file(Path(source)), str(source), Path(source).expanduser().absolute().parent
    else:
        text, where = source, "recipe text"
    try:
        data = load_yaml(text)
    except StrictYAMLError as err:
        raise RecipeError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"malformed YAML in {excerpt(where, 300)}: {excerpt(str(err), 600)}") from None
    except (RecursionError, MemoryError, ValueError) as err:
        raise RecipeError(f"{where}: cannot read the YAML: {type(err).__name__}: {excerpt(str(err), 200)}") from None
    if folder is not None:
        for note in resolve_recipe_paths(data, folder):
            warnings.warn(f"{where}: {note}", stacklevel=2)
    return Recipe.from_dict(data, registry, metrics)


#: Longest string :func:`load_recipe` takes for a path (bytes); longer strings are YAML text.
MAX_PATH_CHARS = 4096


def _is_path(source: str | os.PathLike) -> bool:
    """The rule of :func:`load_recipe`: a path-like, or a one-line string of at most
    :data:`MAX_PATH_CHARS` bytes that ends in ``.yaml``/``.yml`` or
    names an existing file."""
    if isinstance(source, os.PathLike):
        return True
    if "\n" in source or len(source.encode("utf-8", "surrogateescape")) > MAX_PATH_CHARS:
        return False
    if source.endswith((".yaml", ".yml")):
        return True
    try:
        return Path(source).is_file()
    except (OSError, ValueError):
        return False


def _read_recipe_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe path {path} is a folder, not a YAML file") from None
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot read the recipe file {excerpt(str(path), 300)}: {err.__class__.__name__}: {excerpt(str(err), 200)}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {path} is {len(data):,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe file {path} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 4]!r})") from None


#: Largest recipe file :func:`load_recipe` reads (bytes).
MAX_RECIPE_BYTES = 1 << 20

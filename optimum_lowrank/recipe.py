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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from optimum_lowrank.api import PassConfig
from optimum_lowrank.errors import RecipeError, UnknownPassError

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.plugins import PassRegistry

__all__ = [
    "AccuracyConfig",
    "CalibrationConfig",
    "ExportConfig",
    "FinetuneConfig",
    "LatencyConfig",
    "PassStep",
    "Recipe",
    "format_validation_error",
    "load_recipe",
]

SUPPORTED_VERSIONS = (1,)
QUANTIZATION_METHODS = ("none", "dynamic_int8", "static_int8", "weight_int8", "weight_int4")
METRICS = ("perplexity", "stsb_spearman", "cosine_agreement")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    """

    steps: int = Field(ge=1, le=100_000)
    num_samples: int | None = Field(None, ge=1, le=1_000_000)
    lr: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(1, ge=1, le=1024)
    train: Literal["lowrank", "all"] = "lowrank"
    loss: Literal["auto", "lm", "hidden", "logits"] = "auto"
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)


class AccuracyConfig(_Strict):
    """The accuracy gate: the compressed model is evaluated next to the original.

    Exactly one threshold that fits ``metric`` is set:

    - ``perplexity`` (causal LMs): ``max_increase``, the allowed relative
      increase (0.05 = +5%), in [0, 100].
    - ``stsb_spearman`` (encoders): ``max_drop``, allowed drop of Spearman x 100, in [0, 100].
    - ``cosine_agreement`` (encoders, data-free): ``min_cosine`` in (0, 1], the
      mean cosine between the original's and the compressed model's pooled outputs.

    ``enforce: false`` measures and reports without failing (for benchmarks).
    """

    metric: Literal["perplexity", "stsb_spearman", "cosine_agreement"]
    data: str | None = None
    max_increase: float | None = Field(None, ge=0, le=100)
    max_drop: float | None = Field(None, ge=0, le=100)
    min_cosine: float | None = Field(None, gt=0, le=1)
    seq_len: int = Field(512, ge=8, le=8192)
    stride: int | None = Field(None, ge=1)
    max_windows: int = Field(20, ge=1)
    max_pairs: int | None = Field(None, ge=1)
    num_samples: int = Field(64, ge=1)
    enforce: bool = True

    @model_validator(mode="after")
    def _threshold_fits_metric(self) -> AccuracyConfig:
        wanted = {"perplexity": "max_increase", "stsb_spearman": "max_drop", "cosine_agreement": "min_cosine"}
        field = wanted[self.metric]
        others = [name for name in wanted.values() if name != field and getattr(self, name) is not None]
        if others:
            raise ValueError(f"metric {self.metric!r} takes the threshold {field!r}, not {', '.join(others)}")
        if getattr(self, field) is None:
            raise ValueError(f"metric {self.metric!r} needs the threshold {field!r}")
        if self.metric == "stsb_spearman" and self.data is None:
            raise ValueError("metric 'stsb_spearman' needs 'data': a STS-B TSV of sentence pairs")
        return self

    @property
    def threshold(self) -> tuple[str, float]:
        """``(name, value)`` of the threshold set for this metric."""
        for name in ("max_increase", "max_drop", "min_cosine"):
            if getattr(self, name) is not None:
                return name, float(getattr(self, name))
        raise AssertionError("validated config has a threshold")  # pragma: no cover


class LatencyConfig(_Strict):
    """ONNX Runtime CPU latency measurement: median of ``repeats`` forward passes."""

    batch_size: int = Field(1, ge=1, le=1024)
    seq_len: int = Field(128, ge=1, le=8192)
    repeats: int = Field(20, ge=1, le=10_000)
    threads: int = Field(2, ge=1, le=256)


class ExportConfig(_Strict):
    """ONNX export through Optimum's exporter, parity check, and ORT quantization.

    ``quantize``: ``none``; ``dynamic_int8`` (weights int8 per channel,
    activations quantized at run time; good for encoders, measured to break
    small Llama decoders); ``static_int8`` (QDQ, activations calibrated on the
    recipe's calibration data); ``weight_int8`` / ``weight_int4`` (weight-only
    ``MatMulNBits``, the safe choice for decoders). ``optimization_level`` 1 or 2
    runs Optimum's ``ORTOptimizer`` on the fp32 graph before parity and
    quantization (measured here: no speed-up on low-rank BERT graphs; 0 is the default).
    """

    format: Literal["onnx"] = "onnx"
    opset: int | None = Field(None, ge=14, le=23)
    optimization_level: Literal[0, 1, 2] = 0
    quantize: Literal["none", "dynamic_int8", "static_int8", "weight_int8", "weight_int4"] = "none"
    per_channel: bool = True
    reduce_range: bool = True
    block_size: int = Field(32, ge=16, le=4096)
    parity_atol: float = Field(1e-3, gt=0)
    parity_rtol: float = Field(1e-4, ge=0, lt=1)
    latency: LatencyConfig | None = LatencyConfig()
    baseline_latency: bool = True


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
    accuracy: AccuracyConfig | None = None
    export: ExportConfig | None = None
    calibration: CalibrationConfig = CalibrationConfig()
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Any, registry: PassRegistry | None = None) -> Recipe:
        """Validate a recipe given as a mapping (e.g. parsed YAML).

        Parameters
        ----------
        data : dict
            Keys ``version`` (required, one of 1), ``passes``, ``finetune``,
            ``accuracy``, ``export``, ``calibration``, ``seed``.
        registry : PassRegistry, optional
            Where pass ids are looked up; the default plugin manager's registry.

        Raises
        ------
        RecipeError
            Unknown key, unknown version, bad value; the message names the field.
        UnknownPassError
            A ``pass:`` id no plugin registers; the message lists the known ids.
        """
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a mapping with keys version, passes, ...; got {type(data).__name__}")
        if "version" not in data:
            raise RecipeError(f"recipe: missing required key 'version' (supported: {list(SUPPORTED_VERSIONS)})")
        if data["version"] not in SUPPORTED_VERSIONS:
            raise RecipeError(f"recipe: unknown version {data['version']!r} (supported: {list(SUPPORTED_VERSIONS)})")
        raw_passes = data.get("passes", [])
        if raw_passes is None:
            raw_passes = []
        if not isinstance(raw_passes, list):
            raise RecipeError("recipe: 'passes' must be a list of {pass: ID, targets: [...], ...} mappings")
        if registry is None:
            from optimum_lowrank.plugins import get_registry

            registry = get_registry()
        steps = tuple(_parse_step(i, raw, registry) for i, raw in enumerate(raw_passes))
        try:
            return cls.model_validate({**data, "passes": steps})
        except ValidationError as err:
            raise RecipeError(format_validation_error(err, "recipe", cls)) from None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, ready for ``yaml.safe_dump`` (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = {"version": self.version, "passes": [step.to_dict() for step in self.passes]}
        for key in ("finetune", "accuracy", "export"):
            section = getattr(self, key)
            if section is not None:
                out[key] = section.model_dump(mode="json", exclude_defaults=True)
        calibration = self.calibration.model_dump(mode="json", exclude_defaults=True)
        if calibration:
            out["calibration"] = calibration
        if self.seed:
            out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parse_step(index: int, raw: Any, registry: PassRegistry) -> PassStep:
    where = f"passes[{index}]"
    if not isinstance(raw, dict) or "pass" not in raw:
        raise RecipeError(f"{where}: each pass is a mapping with a 'pass' id; got {raw!r}")
    pass_id = raw["pass"]
    options = {k: v for k, v in raw.items() if k != "pass"}
    pass_cls = registry.get(pass_id)
    if pass_cls is None:
        raise UnknownPassError(f"{where}: unknown pass {pass_id!r}; registered passes: {', '.join(registry.names()) or '(none)'}")
    try:
        config = pass_cls.config_class.model_validate(options)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, f"{where} ({pass_id})", pass_cls.config_class)) from None
    return PassStep(pass_id, config)


def fields_most_specific_first(model: type[BaseModel]) -> list[str]:
    """``targets``, then the fields the class itself declares, then the inherited ones (shared option groups)."""
    own = [name for name in model.model_fields if name in model.__dict__.get("__annotations__", {})]
    rest = [name for name in model.model_fields if name not in own and name != "targets"]
    return (["targets"] if "targets" in model.model_fields else []) + own + rest


def format_validation_error(err: ValidationError, where: str, model: type[BaseModel]) -> str:
    """One readable message per problem, naming the field and, for unknown keys, the allowed ones."""
    lines = []
    for problem in err.errors():
        loc = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            owner = _owner_model(model, problem["loc"][:-1])
            allowed = ", ".join(fields_most_specific_first(owner)) if owner else "?"
            section = ".".join(str(part) for part in problem["loc"][:-1])
            lines.append(f"{where}{': ' + section if section else ''}: unknown key {problem['loc'][-1]!r}; allowed keys: {allowed}")
        elif problem["type"] == "literal_error":
            lines.append(f"{where}: {loc}: {problem['msg']}, got {problem['input']!r}")
        elif problem["type"] in ("value_error", "assertion_error"):
            msg = problem["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(f"{where}{': ' + loc if loc else ''}: {msg}")
        else:
            lines.append(f"{where}: {loc}: {problem['msg']}, got {problem['input']!r}")
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


def load_recipe(source: Recipe | dict | str | os.PathLike, registry: PassRegistry | None = None) -> Recipe:
    """Load and validate a recipe.

    Parameters
    ----------
    source : Recipe, dict, path to a YAML file, or a YAML string
        A string naming an existing file or ending in ``.yaml``/``.yml`` is a
        path; any other string is parsed as YAML text.
    registry : PassRegistry, optional

    Raises
    ------
    RecipeError
        Missing file, malformed YAML, or any validation problem.
    """
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return Recipe.from_dict(source, registry)
    text = str(source)
    if isinstance(source, os.PathLike) or text.endswith((".yaml", ".yml")) or Path(text).is_file():
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        where = "recipe text"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"malformed YAML in {where}: {err}") from None
    return Recipe.from_dict(data, registry)

"""Typed errors raised by optimum-lowrank.

Every error the library raises on bad input derives from :class:`LowRankError`,
so a caller (or the CLI) can catch one type and print its message, which names
the offending field and the allowed values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from optimum_lowrank.report import OptimizationReport


class LowRankError(Exception):
    """Base class of every error raised by optimum-lowrank on bad input."""


class RecipeError(LowRankError, ValueError):
    """A recipe is malformed: bad YAML, unknown key, unknown pass, value out of range."""


class UnknownPassError(RecipeError):
    """A recipe names a pass id that no registered plugin provides."""


class DuplicatePassError(LowRankError):
    """Two plugins register a pass under the same id."""


class UnknownMetricError(RecipeError):
    """A recipe names an accuracy metric that no registered plugin provides."""


class DuplicateMetricError(LowRankError):
    """Two plugins register an accuracy metric under the same id."""


class DuplicateQuantizerError(LowRankError):
    """Two plugins register a quantizer under the same id."""


class DuplicateLayerError(LowRankError):
    """Two plugins register a layer class under the same name (see ``lowrank_register_layers``)."""


class TargetError(RecipeError):
    """A pass target matches no module, or only modules of a type the pass cannot handle."""


class PassError(LowRankError, ValueError):
    """A pass cannot be applied to the module it was given (rank out of range, ...)."""


class ModelLoadError(LowRankError):
    """A model specification does not resolve to a loadable model."""


class UnknownLayerError(ModelLoadError):
    """A saved compressed model names a layer class that no installed plugin registers, or a model
    to be saved holds a module of an unregistered class; the message lists the registered ones."""


class DataError(LowRankError, ValueError):
    """Evaluation or calibration data is missing, empty or malformed."""


class ExportError(LowRankError):
    """ONNX export, checking, parity or quantization failed."""


class DeviceError(LowRankError):
    """The requested device is not available (``--device cuda`` on a machine without CUDA)."""


class DistributedError(LowRankError):
    """A multi-process run cannot go on: the ranks disagree on the recipe or the model, a rank
    stopped or did not answer within the timeout, or rank 0 refused the output folder."""


class OutputError(LowRankError):
    """The output path cannot be written: a filesystem root, the home folder, the working
    directory or an ancestor of it, a symbolic link, a file, or an unwritable place."""


class OutputExistsError(OutputError):
    """The output folder exists and is not empty (pass ``overwrite=True``), or holds files
    this project did not write (no marker file), which are never replaced."""


class Interrupted(KeyboardInterrupt):
    """Raised by the CLI's SIGTERM handler so that a run unwinds (and removes its temporary
    files) as on Ctrl-C. A ``KeyboardInterrupt``, so ``except Exception`` never swallows it.

    Attributes
    ----------
    signum : int
        The signal number; the CLI exits with ``128 + signum`` (130, 143).
    """

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted ({signal.Signals(signum).name})")
        self.signum = signum


class AccuracyError(LowRankError):
    """The compressed model failed the recipe's accuracy gate.

    Attributes
    ----------
    report : OptimizationReport
        The full report, with every accuracy figure measured before the gate failed.
    """

    def __init__(self, message: str, report: OptimizationReport):
        super().__init__(message)
        self.report = report


class ObjectiveNotMetError(LowRankError):
    """A search found no configuration that meets its objective (see :mod:`optimum_lowrank.search`).

    Attributes
    ----------
    best : dict
        The best point found, with its figures (size in MB, metric on the search split and its
        damage; gate figures when it was gated). Nothing was written.
    candidates : list of dict
        Every configuration exported, quantized and scored with ONNX Runtime.
    """

    def __init__(self, message: str, best: dict | None = None, candidates: list | None = None):
        super().__init__(message)
        self.best = best or {}
        self.candidates = candidates or []

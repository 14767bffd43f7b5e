"""ONNX export of an in-memory (compressed) model, and the ORT-vs-PyTorch parity check.

The export wraps :func:`optimum.exporters.onnx.onnx_export_from_model`, which
traces the model object it is given. Optimum's ``main_export`` must never be
used on a compressed model: it reloads the stock architecture from disk and
silently exports the wrong weights.

:func:`build_dummy_feeds` (and :func:`feeds_for_input_ids`) build ONNX Runtime
inputs from a session's input metadata, so parity, latency and calibration all
feed graphs the same way: ``attention_mask`` of ones, ``token_type_ids`` of
zeros, ``position_ids`` ``0 .. seq_len - 1`` and empty past key/values
(past sequence length 0) for decoders exported with past.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from optimum_lowrank.errors import ExportError
from optimum_lowrank.exporters.noise import ExportNoise, held_back
from optimum_lowrank.exporters.runtime import first_line

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = [
    "export_onnx",
    "onnx_size_mb",
    "onnx_task",
]

ONNX_FILE_NAME = "model.onnx"


# Loggers that print progress or tracer chatter during an Optimum export.
_NOISY_LOGGERS = ("optimum", "optimum.exporters", "optimum.exporters.onnx", "torch.onnx")




def is_causal_lm(model: PreTrainedModel) -> bool:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return True
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    return hasattr(model, "lm_head") and callable(getattr(model, "can_generate", None)) and model.can_generate()


def onnx_task(model: PreTrainedModel) -> str:
    """Optimum export task for ``model``.

    Parameters
    ----------
    model : PreTrainedModel
        A Transformers model, possibly with compressed (custom) submodules.

    Returns
    -------
    str
        ``"text-generation-with-past"`` for decoder-only language models (a
        ``*ForCausalLM`` class, or a generating model with an ``lm_head``), so the
        graph takes and returns past key/values; ``"feature-extraction"`` for
        bare encoders (``BertModel`` ...); otherwise the task Optimum infers from
        the model class (e.g. ``"text-classification"``), falling back to
        ``"feature-extraction"``.
    """
    if is_causal_lm(model):
        return "text-generation-with-past"
    try:
        from optimum.exporters.tasks import TasksManager

        task = TasksManager._infer_task_from_model_or_model_class(model=model)
    except Exception:  # noqa: BLE001 - unknown classes fall back to the encoder task
        return "feature-extraction"
    return task or "feature-extraction"


def _drop_tied_weight_notes(record: logging.LogRecord) -> bool:
    # Optimum's tied-weight deduplication prints several lines when a custom
    # head reuses another module's parameters (it cannot map their names);
    # export_onnx reports the outcome in one line instead (_warn_transposed_copies).
    return record.module != "transformations_utils" or record.levelno >= logging.ERROR


def _transposed_copies(onnx_path: Path) -> list[tuple[str, str, int]]:
    """Pairs of 2-D initializers where one is the other transposed: ``(name, copy, bytes)``."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    by_shape: dict[tuple, list] = {}
    for tensor in proto.graph.initializer:
        if len(tensor.dims) == 2 and tensor.dims[0] != tensor.dims[1] and min(tensor.dims) > 1:
            by_shape.setdefault((tensor.data_type, *tensor.dims), []).append(tensor)
    arrays: dict[str, np.ndarray] = {}

    def array(tensor) -> np.ndarray:
        if tensor.name not in arrays:
            arrays[tensor.name] = numpy_helper.to_array(tensor)
        return arrays[tensor.name]

    pairs = []
    for (dtype, rows, cols), tensors in by_shape.items():
        if rows > cols:
            continue
        for candidate in by_shape.get((dtype, cols, rows), []):
            other = array(candidate)
            for tensor in tensors:
                mine = array(tensor)
                # First row against first column rules out almost every pair cheaply.
                if np.array_equal(mine[0], other[:, 0]) and np.array_equal(mine.T, other):
                    pairs.append((candidate.name, tensor.name, other.nbytes))
    return pairs


def _warn_transposed_copies(onnx_path: Path) -> None:
    if onnx_size_mb(onnx_path) > 2000:  # not worth loading every weight of a large graph again
        return
    pairs = _transposed_copies(onnx_path)
    if pairs:
        extra = sum(n for *_, n in pairs) / 1e6
        names = ", ".join(f"{a} (copy {b})" for a, b, _ in pairs)
        logger.warning(
            "%s stores %d tied parameter(s) twice, once transposed by constant folding (+%.2f MB): %s",
            onnx_path, len(pairs), extra, names,
        )


@contextlib.contextmanager
def _quiet_export(noise: ExportNoise) -> Iterator[None]:
    """Silence Optimum's progress logs during an export; hold its tolerance messages and tracer warnings back in ``noise``."""
    optimum_logger = logging.getLogger("optimum")
    optimum_logger.addFilter(_drop_tied_weight_notes)
    saved = {}
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        import transformers.utils.logging as hf_logging

        hf_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        hf_logging, hf_level = None, None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*aten::index.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            with held_back(noise):
                yield
        finally:
            optimum_logger.removeFilter(_drop_tied_weight_notes)
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)
            if hf_logging is not None:
                hf_logging.set_verbosity(hf_level)


def export_onnx(
    model: PreTrainedModel,
    output_dir: Path,
    task: str,
    opset: int | None = None,
    *,
    validate: bool = True,
    noise: ExportNoise | None = None,
) -> Path:
    """Export the in-memory ``model`` to ``output_dir/model.onnx`` with Optimum.

    Every module is switched to eval mode first (the TorchScript exporter
    restores train mode recursively, so a wrapper left in train mode would
    export dropout). Custom modules that replace ``nn.Linear``/``nn.Embedding``
    and heads that reuse another module's parameters are traced as they are.
    Optimum also writes ``config.json`` (and ``generation_config.json`` and
    tokenizer files where it finds them) next to the graph.

    A head that reuses an embedding's factors through a custom module (tied
    low-rank head) is exported correctly, but constant folding stores the
    transposed table as a second initializer, which Optimum cannot
    deduplicate for custom modules; a warning names such copies and their size.

    Parameters
    ----------
    model : PreTrainedModel
        The model to export, on CPU, fp32. It is left in eval mode.
    output_dir : Path
        Folder for the graph; created if missing. An existing ``model.onnx`` is
        overwritten.
    task : str
        Optimum task, usually from :func:`onnx_task`. Tasks that produce several
        graphs (encoder-decoder models) are not supported.
    opset : int, optional
        ONNX opset; Optimum's default for the architecture when ``None``.
    validate : bool, default True
        Run Optimum's own output validation (cheap; tolerance mismatches only
        log a warning). :func:`check_parity` is the gate.
    noise : ExportNoise, optional
        Receives the messages judged harmless (Optimum's tolerance lines at its own atol,
        TracerWarnings; :mod:`optimum_lowrank.exporters.noise`) instead of the console; the
        caller summarises them after its parity check. Without it, their summary is logged
        at INFO level.

    Returns
    -------
    Path
        ``output_dir / "model.onnx"``, which passed ``onnx.checker.check_model``.

    Raises
    ------
    ExportError
        If tracing, post-processing or validation fails, the graph is not
        written as a single ``model.onnx``, or the ONNX checker rejects it. The
        message names the cause in one line; the original exception is chained.
    """
    import onnx

    output_dir = Path(output_dir)
    model.eval()
    for module in model.modules():  # explicit: wrappers outside children() lists
        module.eval()
    try:
        from optimum.exporters.onnx import onnx_export_from_model

        held = ExportNoise() if noise is None else noise
        with _quiet_export(held):
            onnx_export_from_model(
                model,
                output=output_dir,
                task=task,
                opset=opset,
                do_validation=validate,
            )
    except Exception as exc:
        raise ExportError(
            f"ONNX export of {type(model).__name__} (task {task!r}) failed: {first_line(exc)}"
        ) from exc

    onnx_path = output_dir / ONNX_FILE_NAME
    if not onnx_path.is_file():
        written = sorted(p.name for p in output_dir.glob("*.onnx"))
        raise ExportError(
            f"ONNX export of {type(model).__name__} (task {task!r}) wrote {written or 'no graph'}, "
            f"not a single {ONNX_FILE_NAME}; multi-graph tasks are not supported"
        )
    try:
        onnx.checker.check_model(str(onnx_path))
    except Exception as exc:
        raise ExportError(f"ONNX checker rejected {onnx_path}: {first_line(exc)}") from exc
    _warn_transposed_copies(onnx_path)
    if noise is None and held:
        logger.info(held.summary("not checked here"))
    return onnx_path


def onnx_size_mb(path: Path) -> float:
    """Size of an ONNX graph on disk, in MB (1e6 bytes).

    Parameters
    ----------
    path : Path
        An ``.onnx`` file.

    Returns
    -------
    float
        Size of the file plus every external-data file its initializers refer
        to (each counted once), in 1e6 bytes.

    Raises
    ------
    FileNotFoundError
        If ``path`` or an external-data file it names does not exist.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    for location in locations:
        total += (path.parent / location).stat().st_size
    return total / 1e6

















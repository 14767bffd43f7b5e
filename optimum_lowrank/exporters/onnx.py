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
import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimum_lowrank.errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = [
    "ParityResult",
    "build_dummy_feeds",
    "check_parity",
    "export_onnx",
    "feeds_for_input_ids",
    "make_session",
    "onnx_size_mb",
    "onnx_task",
]

ONNX_FILE_NAME = "model.onnx"

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}

# Loggers that print progress or tracer chatter during an Optimum export.
_NOISY_LOGGERS = ("optimum", "optimum.exporters", "optimum.exporters.onnx", "torch.onnx")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _is_causal_lm(model: PreTrainedModel) -> bool:
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
    if _is_causal_lm(model):
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
def _quiet_export() -> Iterator[None]:
    """Silence tracer warnings and Optimum's progress logs during an export."""
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
        import torch

        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*aten::index.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
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

        with _quiet_export():
            onnx_export_from_model(
                model,
                output=output_dir,
                task=task,
                opset=opset,
                do_validation=validate,
            )
    except Exception as exc:
        raise ExportError(
            f"ONNX export of {type(model).__name__} (task {task!r}) failed: {_first_line(exc)}"
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
        raise ExportError(f"ONNX checker rejected {onnx_path}: {_first_line(exc)}") from exc
    _warn_transposed_copies(onnx_path)
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


def make_session(onnx_path: Path, *, threads: int | None = None) -> ort.InferenceSession:
    """ONNX Runtime CPU session on ``onnx_path``.

    Parameters
    ----------
    onnx_path : Path
    threads : int, optional
        ``intra_op_num_threads`` (``inter_op_num_threads`` is 1). ORT's default
        when ``None``.

    Raises
    ------
    ExportError
        If ONNX Runtime cannot load the graph.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {_first_line(exc)}") from exc


def _is_past_input(name: str) -> bool:
    return name.startswith("past_key_values") or name.startswith("past.") or name.startswith("past_")


def feeds_for_input_ids(session: ort.InferenceSession, input_ids: np.ndarray, **given: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds for one batch of token ids, from ``session.get_inputs()``.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session whose inputs are filled. Known inputs: ``input_ids``,
        ``attention_mask`` (ones, length past + seq), ``token_type_ids`` (zeros),
        ``position_ids`` (``0 .. seq_len - 1``), ``past_key_values.*`` /
        ``past.*`` (zeros with past sequence length 0) and ``use_cache_branch``
        (False).
    input_ids : np.ndarray, shape (batch, seq_len), integer
        Token ids, each in ``[0, vocab_size)``.
    **given : np.ndarray
        Arrays to feed as they are where the graph takes an input of that name
        (e.g. a padded batch's ``attention_mask``); others are ignored.

    Returns
    -------
    dict[str, np.ndarray]
        One array per session input, in the input's dtype.

    Raises
    ------
    DataError
        If ``input_ids`` is not a non-empty 2-D integer array.
    ExportError
        If the graph takes an input this function does not know how to fill.
    """
    from optimum_lowrank.errors import DataError

    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(
            f"input_ids must be a non-empty 2-D integer array (batch, seq_len), got shape {ids.shape} "
            f"dtype {ids.dtype}"
        )
    batch, seq_len = ids.shape
    feeds: dict[str, np.ndarray] = {}
    for meta in session.get_inputs():
        name = meta.name
        dtype = _ORT_DTYPES.get(meta.type)
        if dtype is None:
            raise ExportError(f"graph input {name!r} has unsupported type {meta.type}")
        if name == "input_ids":
            feeds[name] = ids.astype(dtype)
        elif name in given:
            feeds[name] = np.ascontiguousarray(given[name], dtype=dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq_len), dtype=dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq_len), dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(seq_len, dtype=dtype), (batch, seq_len)).copy()
        elif name == "use_cache_branch":
            feeds[name] = np.zeros((1,), dtype=dtype)
        elif _is_past_input(name):
            shape = []
            for axis, dim in enumerate(meta.shape):
                if isinstance(dim, int) and dim >= 0:
                    shape.append(dim)
                elif axis == 0 or (isinstance(dim, str) and "batch" in dim):
                    shape.append(batch)
                else:  # the (symbolic) past sequence axis
                    shape.append(0)
            feeds[name] = np.zeros(shape, dtype=dtype)
        else:
            raise ExportError(
                f"cannot build a feed for graph input {name!r}; known inputs are input_ids, "
                "attention_mask, token_type_ids, position_ids, use_cache_branch, past_key_values.*"
            )
    return feeds


def build_dummy_feeds(
    session: ort.InferenceSession,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Random-token feeds for a full forward pass of ``batch_size x seq_len`` tokens.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
    batch_size : int, >= 1
    seq_len : int, >= 1
        Tokens per sequence (past length is 0).
    vocab_size : int, >= 1
        Token ids are drawn uniformly from ``[0, vocab_size)``.
    seed : int
        Seed of ``numpy.random.default_rng``; equal seeds give equal ids.

    Returns
    -------
    dict[str, np.ndarray]
        See :func:`feeds_for_input_ids`.

    Raises
    ------
    ValueError
        If a size is < 1.
    ExportError
        If the graph takes an input that cannot be filled.
    """
    if batch_size < 1 or seq_len < 1 or vocab_size < 1:
        raise ValueError(
            f"batch_size, seq_len and vocab_size must be >= 1, got {batch_size}, {seq_len}, {vocab_size}"
        )
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int64)
    return feeds_for_input_ids(session, ids)


def infer_vocab_size(onnx_path: Path) -> int | None:
    """Vocabulary size of the graph at ``onnx_path``, or ``None`` if unknown.

    Read from ``config.json`` next to the graph, else from the first dimension
    of the initializer that a ``Gather`` on ``input_ids`` indexes (dense or
    low-rank embedding tables, fp32 or quantized).
    """
    onnx_path = Path(onnx_path)
    config = onnx_path.parent / "config.json"
    if config.is_file():
        try:
            vocab = json.loads(config.read_text()).get("vocab_size")
            if isinstance(vocab, int) and vocab > 0:
                return vocab
        except (OSError, ValueError):
            pass
    try:
        import onnx

        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # noqa: BLE001
        return None
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized") and len(node.input) > 1:
            if node.input[1] == "input_ids" and node.input[0] in inits:
                dims = inits[node.input[0]].dims
                if dims:
                    return int(dims[0])
    return None


@dataclass
class ParityResult:
    """Largest absolute difference between PyTorch and ONNX Runtime outputs.

    Attributes
    ----------
    max_abs_diff : float
        Largest ``|torch - ort|`` over all shapes, same units as the output
        (hidden-state values or logits); ``inf`` on a shape mismatch or a
        non-finite value.
    atol : float
        Absolute tolerance the check used.
    passed : bool
        ``max_abs_diff <= atol + rtol * reference_max_abs``.
    per_shape : dict[str, float]
        Largest difference per input shape, keyed ``"batch=B,seq=S"``.
    rtol : float
        Tolerance relative to the largest reference output magnitude.
    reference_max_abs : float
        Largest ``|torch|`` output value over all shapes (logits of a heavily
        compressed LM reach the hundreds, where fp32 round-off alone exceeds 1e-3).
    """

    max_abs_diff: float
    atol: float
    passed: bool
    per_shape: dict[str, float] = field(default_factory=dict)
    rtol: float = 0.0
    reference_max_abs: float = 0.0

    def to_dict(self) -> dict:
        """Plain-JSON form (``inf`` becomes the string ``"inf"``)."""

        def clean(x: float) -> float | str:
            return x if math.isfinite(x) else str(x)

        data = asdict(self)
        data["max_abs_diff"] = clean(self.max_abs_diff)
        data["per_shape"] = {k: clean(v) for k, v in self.per_shape.items()}
        return data


def _torch_main_output(model: PreTrainedModel, feeds: dict[str, np.ndarray], name: str) -> np.ndarray:
    import torch

    kwargs: dict[str, Any] = {}
    for key in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        if key in feeds:
            kwargs[key] = torch.from_numpy(np.ascontiguousarray(feeds[key])).long()
    if _is_causal_lm(model):
        kwargs["use_cache"] = False
    with torch.inference_mode():
        out = model(**kwargs)
    if isinstance(out, dict) and name in out:
        value = out[name]
    elif hasattr(out, name):
        value = getattr(out, name)
    else:
        value = out[0]
    return value.detach().to(torch.float64).cpu().numpy()


def check_parity(
    model: PreTrainedModel,
    onnx_path: Path,
    *,
    seq_lengths: Sequence[int] = (8, 32, 128),
    batch_size: int = 2,
    atol: float = 1e-3,
    rtol: float = 0.0,
    vocab_size: int | None = None,
    seed: int = 0,
) -> ParityResult:
    """Compare the PyTorch model with its ONNX graph on random tokens.

    For each sequence length, random token ids (fixed ``seed``) and an
    attention mask of ones go through the model (causal LMs with
    ``use_cache=False``) and through ONNX Runtime CPU (decoders with empty past
    key/values). The graph's first output (``last_hidden_state`` for encoders,
    ``logits`` for causal LMs) is compared with the model output of that name.

    Parameters
    ----------
    model : PreTrainedModel
        The exported model; switched to eval mode.
    onnx_path : Path
        Graph from :func:`export_onnx` (or a quantized copy, with a looser ``atol``).
    seq_lengths : sequence of int, each >= 1
        Lengths above ``model.config.max_position_embeddings`` are capped to it
        (``per_shape`` shows the lengths used).
    batch_size : int, >= 1
    atol : float, >= 0
        Allowed absolute difference.
    rtol : float, >= 0
        Allowed difference relative to the largest reference magnitude: the
        check passes when ``max_abs_diff <= atol + rtol * max|torch output|``.
    vocab_size : int, optional
        Token ids come from ``[0, vocab_size)``; ``model.config.vocab_size`` if ``None``.
    seed : int

    Returns
    -------
    ParityResult
        ``passed`` is False on a mismatch; nothing is raised for it.

    Raises
    ------
    ValueError
        If a size is < 1 or no vocabulary size is known.
    ExportError
        If ONNX Runtime cannot load or run the graph, or the model cannot run.
    """
    config = getattr(model, "config", None)
    if vocab_size is None:
        vocab_size = getattr(config, "vocab_size", None)
        if not vocab_size:
            raise ValueError("vocab_size is unknown: pass vocab_size= or give the model a config.vocab_size")
    if not seq_lengths or min(seq_lengths) < 1 or batch_size < 1:
        raise ValueError(f"need seq_lengths >= 1 and batch_size >= 1, got {tuple(seq_lengths)}, {batch_size}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0 and max(seq_lengths) > max_pos:
        # Longer inputs are invalid for the model: check up to its limit instead.
        seq_lengths = sorted({min(s, max_pos) for s in seq_lengths})
        logger.info("parity: sequence lengths capped at max_position_embeddings=%d", max_pos)
    model.eval()
    session = make_session(onnx_path)
    output_name = session.get_outputs()[0].name
    per_shape: dict[str, float] = {}
    scale = 0.0
    for seq_len in seq_lengths:
        feeds = build_dummy_feeds(session, batch_size, seq_len, vocab_size, seed)
        try:
            got = session.run([output_name], feeds)[0]
        except Exception as exc:
            raise ExportError(f"ONNX Runtime failed to run {onnx_path}: {_first_line(exc)}") from exc
        try:
            want = _torch_main_output(model, feeds, output_name)
        except Exception as exc:
            raise ExportError(f"PyTorch model failed on the parity inputs: {_first_line(exc)}") from exc
        if want.size:
            scale = max(scale, float(np.max(np.abs(want))))
        if got.shape != want.shape:
            logger.warning("parity: ONNX output shape %s != PyTorch %s", got.shape, want.shape)
            diff = math.inf
        else:
            diff = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
            if not math.isfinite(diff):
                diff = math.inf
        per_shape[f"batch={batch_size},seq={seq_len}"] = diff
    max_diff = max(per_shape.values()) if per_shape else math.inf
    passed = max_diff <= atol + rtol * scale
    return ParityResult(max_diff, atol, passed, per_shape, rtol=rtol, reference_max_abs=scale)

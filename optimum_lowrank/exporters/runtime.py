"""ONNX Runtime sessions and input feeds for exported graphs.

:func:`make_session` opens a CPU session; :func:`feeds_for_input_ids` and
:func:`build_dummy_feeds` build the inputs a graph declares (``input_ids``,
``attention_mask``, ``token_type_ids``, ``position_ids`` and empty
``past_key_values.*`` for decoders exported with a cache);
:func:`infer_vocab_size` reads the vocabulary size off the embedding Gather.
Works on any graph: nothing here knows about passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimum_lowrank.errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

__all__ = [
    "build_dummy_feeds",
    "feeds_for_input_ids",
    "first_line",
    "infer_vocab_size",
    "make_session",
]

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


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
        raise ValueError(f"batch_size, seq_len and vocab_size must be >= 1, got {batch_size}, {seq_len}, {vocab_size}")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int64)
    return feeds_for_input_ids(session, ids)


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
        raise DataError(f"input_ids must be a non-empty 2-D integer array (batch, seq_len), got shape {ids.shape} dtype {ids.dtype}")
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


def _is_past_input(name: str) -> bool:
    return name.startswith("past_key_values") or name.startswith("past.") or name.startswith("past_")


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
        raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")

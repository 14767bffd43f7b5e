"""Latency of an ONNX graph under ONNX Runtime on CPU."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from optimum_lowrank.errors import ExportError
from optimum_lowrank.exporters.runtime import build_dummy_feeds, feeds_for_input_ids, first_line, infer_vocab_size, make_session

logger = logging.getLogger(__name__)

__all__ = ["DecodeResult", "LatencyResult", "measure_decode", "measure_latency"]


@dataclass
class LatencyResult:
    """Wall-clock time of one forward pass.

    Attributes
    ----------
    median_ms : float
        Median over ``repeats`` runs, milliseconds.
    p90_ms : float
        90th percentile (linear interpolation), milliseconds.
    batch_size : int
    seq_len : int
        Tokens per sequence (decoders: no past).
    threads : int
        ONNX Runtime intra-op threads.
    repeats : int
        Timed runs (after warm-up).
    """

    median_ms: float
    p90_ms: float
    batch_size: int
    seq_len: int
    threads: int
    repeats: int

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


def _max_positions(onnx_path: Path) -> int | None:
    config = onnx_path.parent / "config.json"
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def measure_latency(
    onnx_path: Path,
    *,
    batch_size: int = 1,
    seq_len: int = 128,
    repeats: int = 20,
    warmup: int = 3,
    threads: int = 2,
    vocab_size: int | None = None,
) -> LatencyResult:
    """Time full forward passes of ``batch_size x seq_len`` random tokens.

    ONNX Runtime ``CPUExecutionProvider``, ``intra_op_num_threads=threads``,
    ``inter_op_num_threads=1``, sequential execution, default graph
    optimisations. Decoders get empty past key/values, so this is prefill time.
    Timing uses :func:`time.perf_counter` around ``session.run``.

    Parameters
    ----------
    onnx_path : Path
    batch_size : int, >= 1
    seq_len : int, >= 1
    repeats : int, >= 1
        Timed runs.
    warmup : int, >= 0
        Untimed runs first.
    threads : int, >= 1
    vocab_size : int, optional
        Token ids come from ``[0, vocab_size)``. When ``None``: ``config.json``
        next to the graph, else the embedding table in the graph, else 2 (ids
        0 and 1, valid for any vocabulary).

    Returns
    -------
    LatencyResult

    Raises
    ------
    ValueError
        If a count is out of range, or ``seq_len`` exceeds
        ``max_position_embeddings`` in the ``config.json`` next to the graph.
    ExportError
        If ONNX Runtime cannot load or run the graph.
    """
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, threads >= 1; got {repeats}, {warmup}, {threads}")
    onnx_path = Path(onnx_path)
    max_pos = _max_positions(onnx_path)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    if vocab_size is None:
        vocab_size = infer_vocab_size(onnx_path)
        if vocab_size is None:
            logger.warning("vocabulary size of %s unknown; timing with token ids 0 and 1", onnx_path)
            vocab_size = 2
    session = make_session(onnx_path, threads=threads)
    feeds = build_dummy_feeds(session, batch_size, seq_len, vocab_size, seed=0)
    output_names = [o.name for o in session.get_outputs()]
    times = []
    try:
        for _ in range(warmup):
            session.run(output_names, feeds)
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(output_names, feeds)
            times.append((time.perf_counter() - start) * 1e3)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime failed to run {onnx_path}: {first_line(exc)}") from exc
    return LatencyResult(
        median_ms=float(np.median(times)),
        p90_ms=float(np.percentile(times, 90)),
        batch_size=batch_size,
        seq_len=seq_len,
        threads=threads,
        repeats=repeats,
    )


@dataclass
class DecodeResult:
    """Greedy decoding with past key/values, batch 1.

    Attributes
    ----------
    prompt_tokens, new_tokens : int
    prefill_ms : float
        The prompt's forward pass, milliseconds.
    tokens_per_second : float
        ``new_tokens`` / the time of the token-by-token steps (prefill excluded).
    threads : int
    generated : list of int
        The generated ids (to check that two graphs decode alike).
    """

    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    tokens_per_second: float
    threads: int
    generated: list[int]

    def to_dict(self) -> dict:
        """Plain-JSON form (without the generated ids)."""
        out = asdict(self)
        out.pop("generated")
        return out


def measure_decode(onnx_path: Path, prompt_ids: np.ndarray, new_tokens: int = 64, *, threads: int = 2) -> DecodeResult:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt_ids`` with ONNX Runtime, past key/values fed back.

    The edge use of a decoder: one prefill of the prompt, then one forward pass of one
    token per step with the growing cache (``present.*`` outputs fed to
    ``past_key_values.*`` inputs), ``attention_mask`` and ``position_ids`` extended.

    Parameters
    ----------
    onnx_path : Path
        A decoder exported with past (task ``text-generation-with-past``).
    prompt_ids : np.ndarray, shape (1, P), integer
    new_tokens : int, >= 1
    threads : int, >= 1

    Returns
    -------
    DecodeResult

    Raises
    ------
    ExportError
        If the graph has no past key/values inputs or cannot be run.
    """
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[0] != 1 or new_tokens < 1:
        raise ValueError(f"prompt_ids must have shape (1, P) and new_tokens >= 1, got {prompt.shape}, {new_tokens}")
    session = make_session(Path(onnx_path), threads=threads)
    inputs = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    pasts = sorted(name for name in inputs if name.startswith("past_key_values."))
    if not pasts:
        raise ExportError(f"{onnx_path} takes no past_key_values inputs; export with task text-generation-with-past")
    try:
        t0 = time.perf_counter()
        values = dict(zip(outputs, session.run(None, feeds_for_input_ids(session, prompt))))
        prefill_ms = (time.perf_counter() - t0) * 1e3
        generated: list[int] = []
        length = prompt.shape[1]
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            token = int(values["logits"][0, -1].argmax())
            generated.append(token)
            feeds = {"input_ids": np.array([[token]], dtype=np.int64)}
            if "attention_mask" in inputs:
                feeds["attention_mask"] = np.ones((1, length + 1), dtype=np.int64)
            if "position_ids" in inputs:
                feeds["position_ids"] = np.array([[length]], dtype=np.int64)
            for name in pasts:
                feeds[name] = values[name.replace("past_key_values.", "present.")]
            values = dict(zip(outputs, session.run(None, feeds)))
            length += 1
        seconds = time.perf_counter() - t0
    except Exception as exc:
        raise ExportError(f"decoding with {onnx_path} failed: {first_line(exc)}") from exc
    return DecodeResult(prompt.shape[1], new_tokens, prefill_ms, new_tokens / seconds, threads, generated)

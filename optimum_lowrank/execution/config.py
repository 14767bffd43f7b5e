"""The recipe's ``execution:`` section: whole-model or sequential (block-by-block) compression.

.. code-block:: yaml

    execution: {mode: sequential}          # or auto (default) / whole
    execution: {mode: auto, memory_limit_gb: 8}

See :mod:`optimum_lowrank.execution` for what each mode does and costs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from optimum_lowrank.export_config import Strict

__all__ = ["WHOLE_MODEL_COPIES", "ExecutionConfig"]

#: Whole-model mode holds the original float32 model, the compressed deep copy and the
#: activations / statistics of one pass: about this many float32 copies of the weights.
WHOLE_MODEL_COPIES = 3.0


class ExecutionConfig(Strict):
    """How the passes run.

    Attributes
    ----------
    mode : {"auto", "whole", "sequential"}
        ``whole``: load the model, deep-copy it, run each pass on the copy (today's
        behaviour). ``sequential``: build the model on the ``meta`` device and stream one
        transformer block at a time from its safetensors files (peak memory about one
        float32 block plus the calibration activations). ``auto`` (default): sequential
        when the whole-model estimate, :data:`WHOLE_MODEL_COPIES` x the float32 size of
        the weights, exceeds ``memory_limit_gb`` and the recipe can run sequentially;
        whole otherwise. A multi-process run (``torchrun``) always runs sequentially.
    memory_limit_gb : float > 0, optional
        Threshold of ``auto``, GB (1e9 bytes); default: half the memory available when
        the run starts (``psutil.virtual_memory().available / 2``).
    batch_size : int >= 1
        Calibration windows per block forward in sequential mode; default 1, the
        ``batch_size`` default of the calibrated passes (equal batches give equal sums).
    timeout_s : float > 0
        Multi-process runs: how long a rank waits for the others in one collective
        (``init_process_group(timeout=...)``) before failing; default 600.
    spread_layers : bool
        Multi-process runs: spread the per-layer decompositions of a block over the
        ranks and gather the factors (default True); False computes them on every rank.
    """

    mode: Literal["auto", "whole", "sequential"] = "auto"
    memory_limit_gb: float | None = Field(None, gt=0)
    batch_size: int = Field(1, ge=1, le=1024)
    timeout_s: float = Field(600.0, gt=0, le=86_400)
    spread_layers: bool = True

"""Execution of the passes: whole-model or sequential (one block at a time from disk), on one or
several processes, on the CPU or CUDA.

- :mod:`~optimum_lowrank.execution.config`: the recipe's ``execution:`` section;
- :mod:`~optimum_lowrank.execution.sequential`: the block-by-block engine (sequential onloading);
- :mod:`~optimum_lowrank.execution.checkpoint`: reading safetensors tensor by tensor, the compressed checkpoint;
- :mod:`~optimum_lowrank.execution.distributed`: calibration over ``torch.distributed`` ranks;
- :mod:`~optimum_lowrank.execution.device`: ``--device cuda|cpu|auto``;
- :mod:`~optimum_lowrank.execution.plan`: which mode a run takes, and the pipeline's sequential step.
"""

from optimum_lowrank.execution.checkpoint import load_compressed
from optimum_lowrank.execution.config import ExecutionConfig
from optimum_lowrank.execution.device import resolve_device

__all__ = ["ExecutionConfig", "load_compressed", "resolve_device"]

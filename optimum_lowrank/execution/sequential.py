"""Sequential onloading: compress a model one transformer block at a time, streamed from its safetensors files.

The loop (after llm-compressor's sequential onloading and SVD-LLM's low-resource mode)::

    skeleton on the meta device (accelerate.init_empty_weights)
    load the non-block tensors (embeddings, final norm, head) once
    capture what enters block 0 for every calibration batch     (blocks.capture_block_inputs)
    for each block:
        read its tensors from the safetensors files (safe_open: only that block's bytes)
        for each pass, in recipe order:
            run the block on this pass's inputs with the pass's hooks  (statistics; outputs = next block's inputs)
            sum the statistics over ranks (multi-process runs)
            apply the pass to the block's targets
        write the compressed block to its own safetensors file (rank 0), send the block back to meta

The inputs of block ``i`` are the outputs of the *original* block ``i - 1`` (run before
the pass changes it), exactly what the whole-model passes see, so the result equals
whole-model mode (tests/execution: equal within float32 rounding). Each calibrated pass
keeps its own stream of inputs (the block as the earlier passes of the recipe left it).

Memory: one block in float32 (Llama-3.2-3B shape: 100.7 M weights, 0.40 GB), the
calibration activations of each calibrated pass (num_samples * seq_len * hidden_size
* 4 B, twice while a block runs), the pass's statistics and SVD work space for one
block, and the non-block tensors in float32 (embeddings and an untied head: 2 * vocab
* hidden * 4 B; 0.79 GB for a 32k vocabulary at hidden 3072, small beside 28 blocks of
0.40 GB, but the largest item for a 128k vocabulary).
"""

from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from optimum_lowrank.api import CompressionPass, PassContext, _is_instance, count_parameters
from optimum_lowrank.blocks import capture_block_inputs, find_blocks, run_block
from optimum_lowrank.errors import ModelLoadError, PassError, TargetError
from optimum_lowrank.execution.checkpoint import SourceCheckpoint, empty_model, replaced_layers, write_compressed_index
from optimum_lowrank.execution.distributed import Ranks
from optimum_lowrank.progress import bar
from optimum_lowrank.report import LayerReport

__all__ = ["SequentialResult", "compress_sequentially", "peak_rss_mb"]

_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (``getrusage`` ``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


@dataclass
class SequentialResult:
    """What :func:`compress_sequentially` did.

    Attributes
    ----------
    folder : Path or None
        The compressed checkpoint (rank 0 with an output folder), else None.
    layers : list of list of LayerReport
        Per recipe step, the layer reports of every block, in block order.
    params_before, params_after : int
        Parameters of the model (tied tensors once).
    block_seconds : list of float
        Wall time of each block (read, calibrate, compress, write), seconds.
    peak_rss_mb : float
        Peak resident memory of the process at the end, MB.
    """

    folder: Path | None
    layers: list[list[LayerReport]]
    params_before: int
    params_after: int
    block_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0


def _materialise(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, value in tensors.items():
        set_module_tensor_to_device(model, name, value.device, value=value)


def _select(model: nn.Module, passes: list[CompressionPass], block_path: str) -> list[list[str]]:
    """Each pass's targets (validated on the skeleton as in whole-model mode); all must lie inside the blocks."""
    selected = []
    for compression_pass in passes:
        names = list(compression_pass.select(model))
        outside = [n for n in names if not n.startswith(block_path + ".")]
        if outside:
            raise PassError(
                f"sequential mode compresses modules inside the blocks ({block_path}.N); pass {compression_pass.name!r} "
                f"also targets {', '.join(outside[:3])}: narrow its targets or run the recipe with execution: {{mode: whole}}"
            )
        selected.append(names)
    return selected


def compress_sequentially(
    source: SourceCheckpoint,
    passes: list[CompressionPass],
    context: PassContext,
    output: Path | None,
    *,
    kind: Literal["encoder", "decoder"],
    device: torch.device | None = None,
    ranks: Ranks | None = None,
    batch_size: int = 1,
    spread_layers: bool = True,
    progress: bool = False,
    on_block: Callable[[int, float], None] | None = None,
) -> SequentialResult:
    """Run ``passes`` block by block over the model in ``source``; write the compressed checkpoint to ``output``.

    Parameters
    ----------
    source : SourceCheckpoint
    passes : list of CompressionPass
        Configured passes in recipe order; each must have ``sequential_problem() is None``.
    context : PassContext
        Its calibration windows (num_samples, seq_len) are split over ranks when ``ranks`` is given.
    output : Path or None
        An empty folder for the compressed checkpoint (written on rank 0 only); None writes nothing.
    kind : {"encoder", "decoder"}
    device : torch.device, optional
        Where blocks, statistics and decompositions live (default the CPU); files are read and written on the CPU.
    ranks : Ranks, optional
        A multi-process run (see :mod:`optimum_lowrank.execution.distributed`).
    batch_size : int
        Calibration windows per block forward.
    spread_layers : bool
        With ``ranks``: spread per-layer decompositions over the ranks.
    progress : bool
        A bar over the blocks on stderr.
    on_block : callable, optional
        Called as ``on_block(i, seconds)`` after block ``i`` is written and freed (e.g. to record
        resident memory per block, or save partial results of a long run).

    Returns
    -------
    SequentialResult

    Raises
    ------
    PassError
        A pass that cannot run sequentially, or targets outside the blocks.
    TargetError
        As in whole-model mode (a pattern matching nothing); a target a previous pass replaced by another type.
    ModelLoadError
        The files lack a parameter of the architecture.
    DistributedError
        A rank stopped or timed out.
    """
    from transformers import AutoConfig

    device = device or torch.device("cpu")
    for compression_pass in passes:
        problem = compression_pass.sequential_problem()
        if problem is not None:
            raise PassError(problem)
    config = AutoConfig.from_pretrained(str(source.folder), local_files_only=True)
    model = empty_model(config)
    stack = find_blocks(model)
    selected = _select(model, passes, stack.path)
    params_before = count_parameters(model)
    nonblock = [n for n in source.where if not n.startswith(stack.path + ".")]
    _materialise(model, source.read(nonblock, device))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(stack.path + ".")]
    if empty:
        raise ModelLoadError(f"{source.folder}: the safetensors files hold no {', '.join(empty[:5])}")
    if ranks is not None and spread_layers:
        context.layer_map = ranks.map_layers
    ids = context.calibration_ids if ranks is None else ranks.shard(context.calibration_ids)
    inputs = capture_block_inputs(model, stack, ids, kind=kind, batch_size=batch_size)
    streams = [inputs if p.block_collector({}) is not None else None for p in passes]
    del inputs
    writing = output is not None and (ranks is None or ranks.is_main)
    weight_map: dict[str, str] = {}
    if writing:
        _write(output / "model-nonblock.safetensors", source.read(nonblock, dtype=None), weight_map)
    layers: list[list[LayerReport]] = [[] for _ in passes]
    replaced: dict[str, dict] = {}
    seconds: list[float] = []
    for i in bar(range(len(stack)), desc="blocks", unit="block", enabled=progress):
        started = time.perf_counter()
        prefix = f"{stack.path}.{i}."
        block = stack.blocks[i]
        keys = [n for n in source.where if n.startswith(prefix)]
        _materialise(model, source.read(keys, device))
        empty = [n for n, p in block.named_parameters() if p.is_meta]
        if empty:
            raise ModelLoadError(f"{source.folder}: the safetensors files hold no {prefix}{empty[0]}")
        for k, compression_pass in enumerate(passes):
            targets = {n: model.get_submodule(n) for n in selected[k] if n.startswith(prefix)}
            for name, module in targets.items():
                if not _is_instance(module, compression_pass.target_types):
                    raise TargetError(f"pass {compression_pass.name!r}: {name} is a {type(module).__name__} after the earlier passes")
            collected = None
            collector = compression_pass.block_collector(targets)
            if collector is not None:
                with collector as collected:
                    streams[k] = run_block(block, streams[k])
                if ranks is not None:
                    ranks.reduce_collected(collected)
            if targets:
                layers[k].extend(compression_pass.apply_block(model, targets, collected, context))
                block.to(device)
            del collected
        replaced.update(replaced_layers(block, prefix[:-1]))
        if writing:
            dtype = _TORCH_DTYPES.get(max({source.dtypes[n] for n in keys}, key=[source.dtypes[n] for n in keys].count), torch.float32)
            state = {f"{prefix}{n}": t.detach().to("cpu", dtype) for n, t in block.state_dict().items()}
            _write(output / f"block-{i:05d}.safetensors", state, weight_map)
            del state
        block.to("meta")
        gc.collect()
        seconds.append(time.perf_counter() - started)
        if on_block is not None:
            on_block(i, seconds[-1])
    if writing:
        write_compressed_index(output, weight_map, replaced, config)
    saved = sum(layer.params_before - layer.params_after for step in layers for layer in step)
    return SequentialResult(output if writing else None, layers, params_before, params_before - saved, seconds, peak_rss_mb())


def _write(path: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    weight_map.update({k: path.name for k in tensors})

"""Block-by-block execution of a transformer: find its stack of blocks, capture what enters the first one, run one block at a time.

Sequential (error-aware) calibration, as in GPTQ and SVD-LLM's sequential update,
compresses a model block by block: the calibration inputs of block ``i`` are the
outputs of blocks ``0..i-1`` *after* those were compressed, so later blocks see (and
can correct for) the truncation error of earlier ones. The same loop, with the
blocks streamed from disk, keeps only one block in memory (sequential onloading).

This module is that loop's engine, independent of any pass:

- :func:`find_blocks` locates the ``nn.ModuleList`` of transformer blocks
  (BERT's ``encoder.layer``, Llama's ``model.layers``, GPT-2's ``transformer.h`` ...);
- :func:`capture_block_inputs` runs the calibration windows through the model up to
  the first block and records, per batch, the positional and keyword arguments the
  block receives (hidden states, attention mask, rotary position embeddings ...);
- :func:`run_block` runs one block on those inputs and returns the next block's
  inputs (the same keyword arguments, the hidden states replaced).

Memory: the captured inputs hold ``num_samples * seq_len * hidden_size`` floats (the
hidden states) plus each batch's mask and position tensors; SmolLM2-135M with 128
windows of 256 tokens: 128 * 256 * 576 * 4 B = 75 MB.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from optimum_lowrank.errors import DataError, PassError

__all__ = ["BlockInput", "BlockStack", "capture_block_inputs", "find_blocks", "run_block", "run_blocks"]

# Attribute paths (relative to the model) of the block lists of the architectures
# transformers ships; checked in order, the first ``nn.ModuleList`` found wins.
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3 ... (ForCausalLM)
    "layers",  # the same base models on their own (LlamaModel)
    "encoder.layer",  # BERT, RoBERTa, ... base models (BertModel)
    "transformer.h",  # GPT-2, GPT-J, BLOOM (LMHeadModel)
    "h",  # GPT2Model
    "model.decoder.layers",  # OPT
    "decoder.layers",  # OPTModel
    "gpt_neox.layers",  # Pythia
)


@dataclass
class BlockStack:
    """The blocks of a transformer, in execution order.

    Attributes
    ----------
    path : str
        Dotted attribute path of the ``nn.ModuleList`` inside the model, e.g. ``"model.layers"``.
    blocks : nn.ModuleList
        The blocks themselves (the model's own list, not a copy).
    """

    path: str
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)

    def names(self) -> list[str]:
        """Qualified module name of each block, e.g. ``["model.layers.0", ...]``."""
        return [f"{self.path}.{i}" for i in range(len(self.blocks))]


@dataclass
class BlockInput:
    """The arguments one batch passes to a block.

    Attributes
    ----------
    args : tuple
        Positional arguments; ``args[0]`` (or ``kwargs["hidden_states"]``) is the hidden
        state, float tensor of shape (batch, seq_len, hidden_size).
    kwargs : dict
        Keyword arguments (attention mask, position ids, rotary ``position_embeddings``,
        ``use_cache`` ...), passed unchanged from block to block.
    """

    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_states(self) -> Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden_states(self, hidden: Tensor) -> BlockInput:
        """A copy whose hidden state is ``hidden`` (the other arguments are shared, not copied)."""
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs)
        return BlockInput((), {**self.kwargs, "hidden_states": hidden})


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> BlockStack:
    """Locate the list of transformer blocks of ``model``.

    Parameters
    ----------
    model : nn.Module
        A transformers model (base model or one with a head).

    Returns
    -------
    BlockStack

    Raises
    ------
    PassError
        If none of the known block paths (:data:`BLOCK_PATHS`) is a non-empty
        ``nn.ModuleList`` of ``model``; the message names the model class and the paths tried.
    """
    for path in BLOCK_PATHS:
        found = _get(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return BlockStack(path, found)
    raise PassError(
        f"cannot run {type(model).__name__} block by block: none of its attributes {', '.join(BLOCK_PATHS)} "
        "is a list of transformer blocks"
    )


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _batches(calibration_ids: Tensor, batch_size: int) -> Iterator[Tensor]:
    if calibration_ids.ndim != 2 or calibration_ids.numel() == 0 or calibration_ids.is_floating_point():
        raise DataError(f"calibration ids must be a non-empty (num_samples, seq_len) integer tensor, got shape {tuple(calibration_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, calibration_ids.shape[0], batch_size):
        yield calibration_ids[start : start + batch_size]


def capture_block_inputs(
    model: nn.Module,
    stack: BlockStack,
    calibration_ids: Tensor,
    *,
    kind: Literal["encoder", "decoder"],
    batch_size: int = 1,
) -> list[BlockInput]:
    """Record the arguments the first block receives for each calibration batch.

    The model runs (no gradients) until the first block is called; a forward pre-hook
    records its arguments and stops the forward, so no block runs here.

    Parameters
    ----------
    model : nn.Module
        The model ``stack`` was found in.
    stack : BlockStack
        From :func:`find_blocks` on ``model``.
    calibration_ids : LongTensor, shape (num_samples, seq_len)
    kind : {"encoder", "decoder"}
        Decoders run with ``use_cache=False``; encoders get an all-ones attention mask.
    batch_size : int, >= 1

    Returns
    -------
    list of BlockInput
        One per batch, in order; the hidden states are detached.

    Raises
    ------
    DataError
        If ``calibration_ids`` is malformed.
    PassError
        If the first block never ran (it is not on the forward path).
    """
    captured: list[BlockInput] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(BlockInput(tuple(args), dict(kwargs)))
        raise _StopForward

    device = next(model.parameters()).device
    handle = stack.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in _batches(calibration_ids, batch_size):
                before = len(captured)
                ids = ids.to(device)
                try:
                    if kind == "decoder":
                        model(input_ids=ids, use_cache=False)
                    else:
                        model(input_ids=ids, attention_mask=torch.ones_like(ids))
                except _StopForward:
                    pass
                if len(captured) == before:
                    raise PassError(f"{stack.path}.0 of {type(model).__name__} never ran: it is not on the forward path")
    finally:
        handle.remove()
    return captured


def _hidden_of(output: Any) -> Tensor:
    """The hidden state a block returns: a tensor (Llama in transformers >= 4.56) or the first item of a tuple."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise PassError(f"a block returned {type(output).__name__}, expected a tensor or a tuple starting with one")


def run_block(block: nn.Module, inputs: Sequence[BlockInput]) -> list[BlockInput]:
    """Run ``block`` on each batch's inputs (no gradients) and return the next block's inputs.

    Parameters
    ----------
    block : nn.Module
        One transformer block.
    inputs : sequence of BlockInput
        From :func:`capture_block_inputs` or a previous :func:`run_block`.

    Returns
    -------
    list of BlockInput
        Same length and keyword arguments as ``inputs``; hidden states replaced by the
        block's outputs, shape (batch, seq_len, hidden_size).
    """
    out: list[BlockInput] = []
    with torch.no_grad():
        for item in inputs:
            out.append(item.with_hidden_states(_hidden_of(block(*item.args, **item.kwargs))))
    return out


def run_blocks(stack: BlockStack, inputs: Sequence[BlockInput], stop: int | None = None) -> list[BlockInput]:
    """Run blocks ``0 .. stop-1`` (all when ``stop`` is None) one after another; see :func:`run_block`."""
    current = list(inputs)
    for block in list(stack.blocks)[:stop]:
        current = run_block(block, current)
    return current

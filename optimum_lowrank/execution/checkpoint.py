"""Safetensors checkpoints for sequential mode: read a model tensor by tensor, write and reload a compressed one.

:class:`SourceCheckpoint` indexes the ``*.safetensors`` files of a model folder (one
file or shards with ``model.safetensors.index.json``) from their headers only, and
reads any subset of tensors with ``safetensors.safe_open`` (memory-mapped: reading one
block's tensors touches only their bytes).

A *compressed checkpoint* is the folder sequential mode writes::

    config.json                         the source model's config
    model-nonblock.safetensors          embeddings, final norm, head: copied unchanged
    block-00000.safetensors ...         one file per transformer block, after the passes
    model.safetensors.index.json        {"weight_map": {tensor name: file}}
    lowrank_layers.json                 {module name: {"type": "LowRankLinear", in_features, out_features, rank, bias}}

:func:`load_compressed` rebuilds the compressed model from it (the source architecture
with the recorded modules replaced).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from optimum_lowrank.errors import ModelLoadError
from optimum_lowrank.layers.lowrank import LowRankLinear

__all__ = ["LAYERS_FILE", "SourceCheckpoint", "empty_model", "load_compressed", "replaced_layers", "write_compressed_index"]

LAYERS_FILE = "lowrank_layers.json"
INDEX_FILE = "model.safetensors.index.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(length)
    try:
        return raw, json.loads(raw)
    except ValueError as err:
        raise ModelLoadError(f"{path} is not a safetensors file: {err}") from None


class SourceCheckpoint:
    """The tensors of a model folder's safetensors files, indexed from the file headers.

    Parameters
    ----------
    folder : path
        Holds ``config.json`` and ``model.safetensors`` or ``model-*.safetensors`` shards.

    Attributes
    ----------
    folder : Path
    files : list of Path
    where : dict, tensor name -> file
    shapes : dict, tensor name -> tuple of int
    dtypes : dict, tensor name -> safetensors dtype string (``"BF16"``, ``"F32"`` ...)

    Raises
    ------
    ModelLoadError
        No config.json, no safetensors file (e.g. a ``pytorch_model.bin`` folder: convert it
        first), or an unreadable header.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ModelLoadError(f"sequential mode reads a model folder with config.json; {str(self.folder)!r} has none")
        self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise ModelLoadError(f"sequential mode streams weights from safetensors files; {str(self.folder)!r} has none "
                                 "(save the model with save_pretrained(safe_serialization=True))")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._headers: list[bytes] = []
        for path in self.files:
            raw, header = _header(path)
            self._headers.append(raw)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                self.where[name] = path
                self.shapes[name] = tuple(entry["shape"])
                self.dtypes[name] = entry["dtype"]

    def numel(self, names: Iterable[str] | None = None) -> int:
        """Number of weights in ``names`` (all tensors by default)."""
        total = 0
        for name in self.shapes if names is None else names:
            count = 1
            for dim in self.shapes[name]:
                count *= dim
            total += count
        return total

    def stored_bytes(self) -> int:
        """Bytes the tensors take in their stored dtypes."""
        return sum(self.numel([n]) * _DTYPE_BYTES.get(self.dtypes[n], 4) for n in self.shapes)

    def identity(self) -> bytes:
        """config.json plus every file's name, size and header: what the multi-process hash compares (cheap, no weights read)."""
        parts = [(self.folder / "config.json").read_bytes()]
        for path, raw in zip(self.files, self._headers):
            parts.append(f"{path.name}:{path.stat().st_size}:".encode() + raw)
        return b"\n".join(parts)

    def read(self, names: Iterable[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Read ``names`` (cast to ``dtype`` unless None) onto ``device``; only those tensors' bytes are touched.

        Raises
        ------
        ModelLoadError
            A name the checkpoint does not hold.
        """
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.where:
                raise ModelLoadError(f"{self.folder}: no tensor {name!r} in its safetensors files")
            by_file.setdefault(self.where[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, members in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for name in members:
                    tensor = fh.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    out[name] = tensor.to(device)
        return out


def empty_model(config) -> nn.Module:
    """The architecture of ``config`` with every parameter on the ``meta`` device (accelerate's ``init_empty_weights``;
    buffers such as rotary frequencies are real, on the CPU), in eval mode, tied embeddings tied."""
    from accelerate import init_empty_weights

    from optimum_lowrank.models import auto_class

    with init_empty_weights():
        model = auto_class(config).from_config(config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def replaced_layers(module: nn.Module, prefix: str) -> dict[str, dict]:
    """The :class:`LowRankLinear` modules inside ``module``, by full name (``prefix.name``), with their constructor arguments."""
    found = {}
    for name, sub in module.named_modules():
        if isinstance(sub, LowRankLinear):
            found[f"{prefix}.{name}" if name else prefix] = {
                "type": "LowRankLinear", "in_features": sub.in_features, "out_features": sub.out_features,
                "rank": sub.rank, "bias": sub.up.bias is not None,
            }
    return found


def write_compressed_index(folder: Path, weight_map: dict[str, str], layers: dict[str, dict], config) -> None:
    """Write config.json, the safetensors index and :data:`LAYERS_FILE` into ``folder``."""
    config.save_pretrained(folder)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"format": "optimum-lowrank sequential"}, "weight_map": weight_map}, indent=1))
    (folder / LAYERS_FILE).write_text(json.dumps(layers, indent=1, sort_keys=True))


def load_compressed(folder: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a compressed model from a checkpoint written by sequential mode.

    Parameters
    ----------
    folder : path
        See the module docstring.
    device : torch.device or str

    Returns
    -------
    nn.Module
        float32, eval mode; tied embeddings tied again.

    Raises
    ------
    ModelLoadError
        Missing files, an unknown replaced-layer type, or a parameter the files do not hold.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / LAYERS_FILE).is_file():
        raise ModelLoadError(f"{folder} is not a compressed checkpoint: no {LAYERS_FILE}")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model = empty_model(config)
    from accelerate import init_empty_weights

    for name, spec in json.loads((folder / LAYERS_FILE).read_text()).items():
        if spec.get("type") != "LowRankLinear":
            raise ModelLoadError(f"{folder}/{LAYERS_FILE}: {name} has unknown type {spec.get('type')!r}")
        with init_empty_weights():
            layer = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"])
        model.set_submodule(name, layer)
    source = SourceCheckpoint(folder)
    state = source.read(source.where, device=device)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)  # missing ones are checked below (tied ones are fine)
    if unexpected:
        raise ModelLoadError(f"{folder}: tensors the model does not have: {', '.join(unexpected[:5])}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise ModelLoadError(f"{folder}: no weights for {', '.join(still[:5])}")
    return model.to(device).eval()

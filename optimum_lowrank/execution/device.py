"""``--device cuda|cpu|auto``: where the sequential engine runs the blocks and decompositions."""

from __future__ import annotations

from typing import Literal

import torch

from optimum_lowrank.errors import DeviceError

__all__ = ["DEVICES", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: Literal["auto", "cpu", "cuda"] | str | torch.device | None = "cpu", rank: int = 0) -> torch.device:
    """The torch device a run computes on.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}, ``"cuda:N"`` or torch.device
        ``auto``: CUDA when ``torch.cuda.is_available()``, else the CPU. None means ``cpu``.
    rank : int
        Local rank of a multi-process run: ``cuda`` becomes ``cuda:<rank % device_count>``.

    Returns
    -------
    torch.device

    Raises
    ------
    DeviceError
        ``cuda`` asked for on a machine where torch sees no CUDA device (the message
        names the torch build), or an unknown device name.
    """
    name = str(device if device is not None else "cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
        name = kind
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else f" built for CUDA {torch.version.cuda}")
        raise DeviceError(f"--device {name} asked for CUDA, but torch sees no CUDA device ({build}); use --device cpu or auto")
    if ":" in name:
        return torch.device(name)
    return torch.device("cuda", rank % torch.cuda.device_count())

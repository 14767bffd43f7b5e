"""Where the project caches what it computes once: ``$OPTIMUM_LOWRANK_CACHE``, else the XDG cache folder."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$OPTIMUM_LOWRANK_CACHE`` if set, else ``$XDG_CACHE_HOME/optimum_lowrank`` (default ``~/.cache/optimum_lowrank``)."""
    env = os.environ.get("OPTIMUM_LOWRANK_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "optimum_lowrank"

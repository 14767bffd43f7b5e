"""Progress on stderr, one mechanism for the whole package.

- :func:`bar`: a tqdm bar for every loop whose length is known (calibration batches,
  layers decomposed, training steps and epochs, evaluation batches), with elapsed time
  and ETA; on stderr, gone when the loop ends (``leave=False``). On a terminal it redraws
  in place; written to a file or a pipe it adds a line at most every
  :data:`LOG_INTERVAL` seconds. A bar that is off is a disabled tqdm: the loop code is
  the same either way.
- :class:`Progress`: the pipeline's step lines (``[optimum-lowrank] exporting ONNX ...``
  and ``... done in 2.1 s``) around the long steps: loading, passes, export, evaluation.
- :func:`silenced`: turns every bar off for a block; ``optimize(progress=False)`` runs in it,
  so the bars of passes and evaluators stay quiet too.

Nothing is imported from tqdm until a bar is made.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from tqdm import tqdm

__all__ = ["Progress", "bar", "silenced"]

T = TypeVar("T")

PREFIX = "[optimum-lowrank]"

#: Seconds between a bar's updates when stderr is not a terminal (a log file, ``| tee``).
LOG_INTERVAL = 30.0

_silenced: ContextVar[bool] = ContextVar("optimum_lowrank_progress_silenced", default=False)


def bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool | None = True,
) -> tqdm:
    """A tqdm progress bar on stderr that disappears when closed.

    Use it as an iterable (``for x in bar(items, desc=...)``) or drive it by hand
    (``update``, ``set_postfix``, ``close``, or ``with bar(total=n, desc=...) as b``).
    A bar that is off is a disabled tqdm: it prints nothing and its methods do nothing;
    check ``b.disable`` before computing costly postfix figures.

    Parameters
    ----------
    iterable : iterable, optional
    desc : str
        Label before the bar.
    total : int, optional
        Number of updates expected (defaults to ``len(iterable)``).
    unit : str
        What one update is (``step``, ``epoch``, ``batch``).
    enabled : bool or None
        ``False``: off; ``True`` or ``None`` (the default of older callers): shown,
        on a terminal or not. Inside :func:`silenced` (``optimize(progress=False)``,
        ``--quiet``) every bar is off.

    Returns
    -------
    tqdm
    """
    from tqdm.auto import tqdm

    disable = _silenced.get() or enabled is False
    terminal = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, disable=disable,
                mininterval=0.1 if terminal else LOG_INTERVAL)


@contextmanager
def silenced(active: bool = True) -> Iterator[None]:
    """Turn every :func:`bar` off inside the block (when ``active``); the previous setting is restored after it."""
    token = _silenced.set(_silenced.get() or active)
    try:
        yield
    finally:
        _silenced.reset(token)


class Progress:
    """Step lines on stderr for the pipeline's long steps (loading, passes, export, evaluation).

    Parameters
    ----------
    enabled : bool
        False prints nothing (the steps still run).

    Examples
    --------
    >>> say = Progress(False)
    >>> with say.step("exporting ONNX (feature-extraction)"):
    ...     pass
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def line(self, text: str) -> None:
        """One ``[optimum-lowrank] text`` line (when enabled)."""
        if self.enabled:
            print(f"{PREFIX} {text}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """``what ...`` before the block and ``what: done in S s`` after it (not after an error)."""
        t0 = time.perf_counter()
        self.line(f"{what} ...")
        yield
        self.line(f"{what}: done in {time.perf_counter() - t0:.1f} s")

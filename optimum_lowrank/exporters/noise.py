"""Third-party export messages the project judges harmless, held back and summarised in one line.

An Optimum export prints two kinds of chatter that say nothing about the graph's correctness
once the project's own parity check (:func:`optimum_lowrank.exporters.parity.check_parity`,
tolerances from the recipe) has passed:

- Optimum's own validation at a fixed ``atol`` of 1e-05: ``-[x] values not close enough, max
  diff: ... (atol: 1e-05)`` per output, then ``The ONNX export succeeded with the warning: ...``
  (about 110 lines for SmolLM2, whose logits reach 1e1 and whose past key/values are 60 outputs);
- torch's ``TracerWarning`` (Python control flow on tensor values while tracing).

:func:`held_back` collects both into an :class:`ExportNoise`; the pipeline prints
:meth:`ExportNoise.summary` after a passing parity check and puts :meth:`ExportNoise.details`
into the error when parity fails. Any other message passes through unchanged.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["ExportNoise", "held_back"]

#: Optimum's tolerance messages (its validation at its own ``atol``).
TOLERANCE = re.compile(r"values not close enough|not within the set tolerance|export succeeded with the warning")


@dataclass
class ExportNoise:
    """Messages held back during one or more exports.

    Attributes
    ----------
    tolerance : list of str
        Optimum's tolerance messages, one entry per log record (first line).
    tracer : list of str
        ``torch.jit.TracerWarning`` messages (one per source location, as Python shows them).
    """

    tolerance: list[str] = field(default_factory=list)
    tracer: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tolerance) + len(self.tracer)

    def summary(self, verdict: str) -> str | None:
        """One line (None when nothing was held back), e.g. ``held back 112 third-party export messages
        judged harmless (110 from Optimum's own check at atol 1e-05, 2 torch TracerWarnings); <verdict>``."""
        if not self:
            return None
        parts = []
        if self.tolerance:
            atol = re.search(r"atol: ([\d.e+-]+)", " ".join(self.tolerance))
            parts.append(f"{len(self.tolerance)} from Optimum's own output check" + (f" at atol {atol.group(1)}" if atol else ""))
        if self.tracer:
            parts.append(f"{len(self.tracer)} torch TracerWarning{'s' if len(self.tracer) > 1 else ''}")
        noun = "message" if len(self) == 1 else "messages"
        return f"held back {len(self)} third-party export {noun} judged harmless ({', '.join(parts)}); {verdict}"

    def details(self, limit: int = 20) -> str:
        """The held-back messages, one per line (the first ``limit``, then how many more)."""
        lines = [f"optimum: {m}" for m in self.tolerance] + [f"TracerWarning: {m}" for m in self.tracer]
        more = [f"... {len(lines) - limit} more"] if len(lines) > limit else []
        return "\n".join(lines[:limit] + more)


class _HoldBack(logging.Filter):
    """A handler filter that keeps Optimum's tolerance records out of the handler and in ``noise``."""

    def __init__(self, noise: ExportNoise) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not record.name.startswith("optimum") or not TOLERANCE.search(message):
            return True
        if not getattr(record, "_held_back", False):  # one record reaches several handlers
            record._held_back = True
            self.noise.tolerance.append(message.strip().splitlines()[0].strip())
        return False


@contextmanager
def held_back(noise: ExportNoise) -> Iterator[None]:
    """Collect the harmless messages of the block into ``noise``; everything else is shown as usual.

    Optimum's tolerance records are filtered out of every handler that could print them (the
    ``optimum`` logger's, the root logger's and logging's last-resort handler); TracerWarnings are
    recorded; any other warning raised in the block is shown again when it ends.
    """
    import torch

    hold = _HoldBack(noise)
    handlers = [*logging.getLogger("optimum").handlers, *logging.getLogger().handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        handler.addFilter(hold)
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters in force still apply
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(hold)
    for item in caught:
        if issubclass(item.category, torch.jit.TracerWarning):
            noise.tracer.append(str(item.message).strip().splitlines()[0])
        else:
            warnings.showwarning(item.message, item.category, item.filename, item.lineno)

"""Built-in compression passes, one module per technique; each registers itself through the plugin hooks."""

from optimum_lowrank.passes.base import CompressionPass, PassConfig, PassContext, resolve_targets

__all__ = ["CompressionPass", "PassConfig", "PassContext", "resolve_targets"]

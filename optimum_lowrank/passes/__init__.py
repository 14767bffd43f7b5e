"""Built-in compression passes; each module registers its pass through the plugin hooks.

``svd`` (truncated SVD of linears and embeddings), :mod:`.linear` (activation-aware
SVD, SoftLMs) and :mod:`.embedding` (autoencoder, tensor-train, Fourier
embeddings). The plugin API itself is :mod:`optimum_lowrank.api`, re-exported
from ``optimum_lowrank``; the names below stay importable from here for older plugins.
"""

from optimum_lowrank.api import CompressionPass, PassConfig, PassContext, resolve_targets

__all__ = ["CompressionPass", "PassConfig", "PassContext", "resolve_targets"]

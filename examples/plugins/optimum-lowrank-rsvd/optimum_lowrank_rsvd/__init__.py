"""An example optimum-lowrank plugin: a pass (randomized SVD), an accuracy metric (top-1 agreement)
and a quantizer (per-tensor int8), one module each.

The entry point (``pyproject.toml``) names this package: pluggy registers every ``@hookimpl``
function it finds here, so the three hook functions are imported below.
"""

from optimum_lowrank_rsvd.metric import Top1AgreementConfig, Top1AgreementEvaluator, lowrank_register_metrics
from optimum_lowrank_rsvd.quantizer import PerTensorInt8Quantizer, lowrank_register_quantizers
from optimum_lowrank_rsvd.rsvd import RandomizedSVDConfig, RandomizedSVDPass, lowrank_register_passes

__all__ = [
    "PerTensorInt8Quantizer",
    "RandomizedSVDConfig",
    "RandomizedSVDPass",
    "Top1AgreementConfig",
    "Top1AgreementEvaluator",
    "lowrank_register_metrics",
    "lowrank_register_passes",
    "lowrank_register_quantizers",
]

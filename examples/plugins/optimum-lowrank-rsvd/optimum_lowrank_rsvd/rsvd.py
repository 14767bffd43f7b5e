"""The pass: rank-r factorization of linear layers by randomized SVD.

References
----------
.. [1] Halko, Martinsson, Tropp, "Finding structure with randomness: Probabilistic algorithms
   for constructing approximate matrix decompositions", SIAM Review 53(2), 2011, arXiv 0909.4061.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from optimum_lowrank import CompressionPass, LayerReport, LowRankLinear, PassConfig, PassContext, PassError, Spectrum, hookimpl


class RandomizedSVDConfig(PassConfig):
    """Options of ``randomized_svd``; ``targets`` comes from PassConfig. Each Field's description
    is what ``optimum-lowrank passes`` prints."""

    rank: int = Field(ge=1, description="Rank kept in every target (>= 1, below the layer's break-even rank out * in / (out + in)).")
    oversampling: int = Field(8, ge=0, description="Extra random directions beyond the rank (Halko et al.'s p); more is more accurate.")
    power_iterations: int = Field(2, ge=0, le=10, description="Subspace (power) iterations, 0..10; they sharpen slowly decaying spectra.")


class RandomizedSVDPass(CompressionPass):
    """Rank-``rank`` factorization of each target ``nn.Linear`` by randomized SVD.

    Recipe::

        - {pass: randomized_svd, targets: ["re:.*intermediate\\\\.dense"], rank: 64}

    Raises
    ------
    PassError
        If ``rank`` exceeds ``min(out_features, in_features)`` or would not reduce the layer.
    """

    name = "randomized_svd"
    config_class = RandomizedSVDConfig
    target_types = (nn.Linear,)
    summary = "rank-r factorization of Linear layers by randomized SVD (Halko et al. 2011)"
    example_options = {"targets": ["re:.*intermediate\\.dense"], "rank": 4}

    config: RandomizedSVDConfig

    def apply(self, model: nn.Module, targets: dict[str, nn.Module], context: PassContext) -> list[LayerReport]:
        generator_state = torch.random.get_rng_state()  # torch.svd_lowrank draws from the global generator
        torch.manual_seed(context.seed)
        try:
            return [self._factorize(model, name, module) for name, module in targets.items()]
        finally:
            torch.random.set_rng_state(generator_state)

    def _factorize(self, model: nn.Module, name: str, linear: nn.Linear) -> LayerReport:
        out_features, in_features = linear.weight.shape
        rank = self.config.rank
        if rank * (out_features + in_features) >= out_features * in_features or rank > min(out_features, in_features):
            raise PassError(f"{name}: rank {rank} does not reduce a {out_features}x{in_features} layer "
                            f"(break-even rank {out_features * in_features / (out_features + in_features):.1f})")
        q = min(rank + self.config.oversampling, min(out_features, in_features))
        u, s, v = torch.svd_lowrank(linear.weight.detach().float(), q=q, niter=self.config.power_iterations)
        root = s[:rank].sqrt()
        layer = LowRankLinear(in_features, out_features, rank, bias=linear.bias is not None)
        layer.load_factors(u[:, :rank] * root, (v[:, :rank] * root).t(), linear.bias)  # A (out, rank) @ B (rank, in)
        model.set_submodule(name, layer)
        before = sum(p.numel() for p in linear.parameters())
        kept = float(s[:rank].square().sum() / s.square().sum())
        return LayerReport(
            name=name, module_type="Linear", action="factorized", params_before=before,
            params_after=sum(p.numel() for p in layer.parameters()), rank=rank,
            metrics={"energy_kept_of_sampled": kept},
            spectrum=Spectrum.from_singular_values(s, rank, basis="weight (randomized: the first rank + oversampling values)",
                                                   length=min(out_features, in_features)),
        )


@hookimpl
def lowrank_register_passes(register) -> None:
    register(RandomizedSVDPass)

"""Torch-only numerical linear algebra: truncated/weighted/whitened SVD, TT-SVD, rank allocation.

No ``nn.Module`` and no pass lives here; layers and passes build on it.
Submodules: :mod:`~optimum_lowrank.linalg.svd`, :mod:`~optimum_lowrank.linalg.whitening`,
:mod:`~optimum_lowrank.linalg.tt`, :mod:`~optimum_lowrank.linalg.budget`.
"""

"""The token-embedding pass family: autoencoder, tensor-train and Fourier embeddings, and what they share.

Shared pieces: :mod:`.usage` (frequency weighting, the hybrid exact/compressed
table, ``prepare_embedding`` / ``finish_embedding``), :mod:`.refine`
(output-aware refinement), :mod:`.training` (the reconstruction fit), and
:mod:`.install` (installing the layer and the tied head).
"""

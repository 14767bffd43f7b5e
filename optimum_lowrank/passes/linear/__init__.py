"""Passes on linear layers that use calibration data: activation-aware SVD (ASVD, SVD-LLM) and SoftLMs."""

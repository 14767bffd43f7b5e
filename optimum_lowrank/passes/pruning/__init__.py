"""Structured pruning (CoFi-style hard-concrete L0 gates) and the training objective
shared with :mod:`optimum_lowrank.passes.tokens` (Infor-Coef)."""

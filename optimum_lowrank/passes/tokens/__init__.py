"""Passes that save compute by processing fewer tokens: ``token_downsampling`` (Infor-Coef)."""

"""Training our DiT (the embedded default model)."""

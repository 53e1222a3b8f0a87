"""Inference for v4jax: generation over V4's compressed KV cache (see generate.py)."""

"""Sparse attention over index lists (window ++ compressed entries) with an attention sink."""

from kernels.sparse_attention.reference import sparse_attention

__all__ = ["sparse_attention"]

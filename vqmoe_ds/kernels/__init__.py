"""Custom kernels of vqmoe-ds.

``nearest_code`` finds every token's nearest codebook entry with O(tokens) extra memory; see
``vqmoe_ds/kernels/nearest_code.py`` for its exact semantics and ``docs/kernels.md`` for speed.
"""
from .nearest_code import kernel_available, nearest_code

__all__ = ["nearest_code", "kernel_available"]

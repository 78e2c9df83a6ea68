"""Suffix-product scans over Jacobian chains (the exact backward of an LBI model).

Importing this package registers the ``lbi_fx::suffix_scan`` and
``lbi_fx::suffix_adjoints`` custom ops; it does not import Triton (see ``ops``).
"""

from .ops import BACKENDS, TritonFallbackWarning, suffix_adjoints, suffix_scan, triton_available
from .scan_torch import chunk_size, suffix_scan_reference

__all__ = [
    "BACKENDS",
    "TritonFallbackWarning",
    "chunk_size",
    "suffix_adjoints",
    "suffix_scan",
    "suffix_scan_reference",
    "triton_available",
]

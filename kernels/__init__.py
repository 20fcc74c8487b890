"""Triton kernels, each beside its pure-torch reference (imported as ``secondorder.kernels``).

Every op has a ``*_reference`` (the CPU path and the test oracle), a ``*_triton`` launcher
and a dispatcher that picks Triton for CUDA tensors. ``SECONDORDER_REFERENCE_KERNELS=1``
forces the references everywhere.
"""

from ._triton import HAS_TRITON
from .factor import (
    symmetric_factor_update,
    symmetric_factor_update_reference,
    symmetric_factor_update_triton,
)

__all__ = [
    "HAS_TRITON",
    "symmetric_factor_update",
    "symmetric_factor_update_reference",
    "symmetric_factor_update_triton",
]

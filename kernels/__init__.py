"""Triton kernels, each beside its pure-torch reference (imported as ``secondorder.kernels``).

Every op has a ``*_reference`` (the CPU path and the test oracle), a ``*_triton`` launcher
and a dispatcher that picks Triton for CUDA tensors. ``SECONDORDER_REFERENCE_KERNELS=1``
forces the references everywhere.
"""

from ._triton import HAS_TRITON
from .adafisher import adafisher_update, adafisher_update_reference, adafisher_update_triton
from .conv_factor import (
    conv2d_factor_update,
    conv2d_factor_update_reference,
    conv2d_factor_update_triton,
)
from .factor import (
    symmetric_factor_update,
    symmetric_factor_update_reference,
    symmetric_factor_update_triton,
)
from .mfac import (
    mfac_coefficients,
    mfac_coefficients_reference,
    mfac_coefficients_triton,
    mfac_gram_row,
    mfac_gram_row_reference,
    mfac_gram_row_triton,
    mfac_ihvp,
    mfac_ihvp_reference,
    mfac_ihvp_triton,
)

__all__ = [
    "HAS_TRITON",
    "adafisher_update",
    "adafisher_update_reference",
    "adafisher_update_triton",
    "conv2d_factor_update",
    "conv2d_factor_update_reference",
    "conv2d_factor_update_triton",
    "mfac_coefficients",
    "mfac_coefficients_reference",
    "mfac_coefficients_triton",
    "mfac_gram_row",
    "mfac_gram_row_reference",
    "mfac_gram_row_triton",
    "mfac_ihvp",
    "mfac_ihvp_reference",
    "mfac_ihvp_triton",
    "symmetric_factor_update",
    "symmetric_factor_update_reference",
    "symmetric_factor_update_triton",
]

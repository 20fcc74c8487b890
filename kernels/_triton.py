"""Guarded Triton import and the rule that picks a kernel or its pure-torch reference.

The package must import and run where Triton is absent (macOS, Windows, CPU-only wheels), so
``triton`` and ``tl`` are ``None`` there and ``HAS_TRITON`` is ``False``; kernel modules define
their ``@triton.jit`` functions only when ``HAS_TRITON`` holds.

Two environment variables matter:

- ``TRITON_INTERPRET=1`` makes Triton run kernels in its CPU interpreter. Triton reads it when a
  kernel is *decorated*, i.e. when the kernel module is imported, so it must be set before that.
- ``SECONDORDER_REFERENCE_KERNELS=1`` forces the pure-torch reference everywhere, which is the
  switch to flip when a kernel is suspected of a bug.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = None
    tl = None

HAS_TRITON: bool = triton is not None

__all__ = ["HAS_TRITON", "interpreting", "tl", "triton", "use_triton"]


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the dispatch functions should run the Triton kernel on ``t``.

    True when Triton is importable, ``t`` lives on a CUDA device, and
    ``SECONDORDER_REFERENCE_KERNELS`` is not ``"1"``. CPU tensors always take the reference,
    even under ``TRITON_INTERPRET=1``: the interpreter is a testing tool, far slower than torch.
    """
    if not HAS_TRITON or not isinstance(t, torch.Tensor) or not t.is_cuda:
        return False
    return os.environ.get("SECONDORDER_REFERENCE_KERNELS", "0") != "1"

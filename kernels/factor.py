"""The fused symmetric factor update ``a <- beta * a + alpha * x^T x``.

K-FAC-family estimators accumulate every Kronecker factor statistic with it. Three
functions with one contract:

* :func:`symmetric_factor_update_reference` -- pure torch, the CPU path and the oracle;
* :func:`symmetric_factor_update_triton` -- the Triton kernel: only the upper triangle of
  tiles is computed, each off-diagonal tile is mirrored, so the result is exactly
  symmetric and the work is about half of a full ``x^T x``;
* :func:`symmetric_factor_update` -- dispatch: Triton for CUDA tensors, else the reference
  (``SECONDORDER_REFERENCE_KERNELS=1`` forces the reference).

Contract: ``a`` is float32 or float64, shape ``(d, d)`` or ``(b, d, d)``, and symmetric
(the kernel reads only its upper triangle); ``x`` is ``(n, d)`` or ``(b, n, d)`` with the
same batch, of dtype float32, float16, bfloat16 or float64. ``x`` is cast to ``a``'s dtype
and the product accumulated in it, the result is written into ``a`` in place, and ``a`` is
returned. With ``beta == 0`` the old contents of ``a`` are never read, so a fresh
``torch.empty`` (even holding NaN) is a valid ``a``. Any strides are accepted.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._triton import HAS_TRITON, interpreting, tl, triton, use_triton

_A_DTYPES = (torch.float32, torch.float64)
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(a: Tensor, x: Tensor) -> None:
    for name, t in (("a", a), ("x", x)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype not in _A_DTYPES:
        raise TypeError(f"a must be float32 or float64, got {a.dtype}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if a.dim() not in (2, 3) or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be (d, d) or (b, d, d), got shape {tuple(a.shape)}")
    if x.dim() != a.dim() or x.shape[-1] != a.shape[-1] or x.shape[:-2] != a.shape[:-2]:
        raise ValueError(
            f"x must be (n, d) or (b, n, d) matching a {tuple(a.shape)}, got {tuple(x.shape)}"
        )
    if x.device != a.device:
        raise ValueError(f"a and x must be on one device, got {a.device} and {x.device}")


def symmetric_factor_update_reference(
    a: Tensor, x: Tensor, *, beta: float = 1.0, alpha: float = 1.0
) -> Tensor:
    """``a <- beta * a + alpha * x^T x`` in pure torch (in place; returns ``a``).

    One fused BLAS call (``addmm_`` / ``baddbmm_``) in ``a``'s dtype, ``x`` cast to it
    first. With ``beta == 0`` the old ``a`` is ignored, NaN and Inf included. The result is
    symmetric up to round-off (BLAS promises no more); see the module docstring for the rest
    of the contract.

    Raises:
        TypeError: ``a`` is not float32/float64, or ``x`` not one of the four float dtypes.
        ValueError: the shapes of ``a`` and ``x`` do not match, or they are on two devices.
    """
    _check(a, x)
    xx = x.to(a.dtype)
    if a.dim() == 2:
        a.addmm_(xx.T, xx, beta=beta, alpha=alpha)
    else:
        a.baddbmm_(xx.transpose(-1, -2), xx, beta=beta, alpha=alpha)
    return a


if HAS_TRITON:

    @triton.jit
    def _store_symmetric_tile(
        acc, a_base, cols_i, cols_j, bi, bj, d, stride_ar, stride_ac, beta, alpha,
        USE_BETA: tl.constexpr,
    ):  # fmt: skip
        """Write tile ``(bi, bj)`` (``bi <= bj``) of ``a <- beta a + alpha acc`` and its
        mirror: the epilogue of every kernel that fills one triangle of a symmetric ``a``."""
        if bi == bj:
            # x_i^T x_i need not come out of tl.dot exactly symmetric (the MMA may sum in
            # any order); averaging with the transpose makes it so, bit for bit.
            acc = (acc + tl.trans(acc)) * 0.5
        out = acc * alpha
        ok_i = cols_i < d
        ok_j = cols_j < d
        mask_ij = ok_i[:, None] & ok_j[None, :]
        if USE_BETA:
            # Read a's upper triangle only: off the diagonal (bi < bj) min/max change
            # nothing; on a diagonal tile they fold the lower half onto the upper, so the
            # output is exactly symmetric even when a is symmetric only up to round-off.
            # beta == 0 compiles without this load: a may hold NaN garbage then.
            r = tl.minimum(cols_i[:, None], cols_j[None, :])
            c = tl.maximum(cols_i[:, None], cols_j[None, :])
            out += beta * tl.load(a_base + r * stride_ar + c * stride_ac, mask=mask_ij, other=0.0)
        tl.store(a_base + cols_i[:, None] * stride_ar + cols_j[None, :] * stride_ac, out, mask_ij)
        if bi != bj:
            ji = a_base + cols_j[:, None] * stride_ar + cols_i[None, :] * stride_ac
            tl.store(ji, tl.trans(out), mask=ok_j[:, None] & ok_i[None, :])

    @triton.jit
    def _symmetric_update_kernel(
        a_ptr,
        x_ptr,
        pairs_ptr,
        n,
        d,
        stride_ab,
        stride_ar,
        stride_ac,
        stride_xb,
        stride_xn,
        stride_xd,
        beta,
        alpha,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_BETA: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # int64 offsets: x of a large conv layer can exceed 2^31 elements
        batch = tl.program_id(1).to(tl.int64)
        bi = tl.load(pairs_ptr + 2 * pid)
        bj = tl.load(pairs_ptr + 2 * pid + 1)
        cols_i = bi * BLOCK_D + tl.arange(0, BLOCK_D)
        cols_j = bj * BLOCK_D + tl.arange(0, BLOCK_D)
        x_base = x_ptr + batch * stride_xb
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N).to(tl.int64)
            row_ok = (rows < n)[:, None]
            xi = tl.load(
                x_base + rows[:, None] * stride_xn + cols_i[None, :] * stride_xd,
                mask=row_ok & (cols_i < d)[None, :],
                other=0.0,
            )
            xj = tl.load(
                x_base + rows[:, None] * stride_xn + cols_j[None, :] * stride_xd,
                mask=row_ok & (cols_j < d)[None, :],
                other=0.0,
            )
            if UPCAST:
                # The Triton 3.8 interpreter returns garbage from tl.dot on bf16/fp16
                # operands (checked against torch); after .to(float32) it is exact.
                # Compiled kernels keep the native half-precision dot (fp32 accumulate).
                xi = xi.to(tl.float32)
                xj = xj.to(tl.float32)
            acc += tl.dot(tl.trans(xi), xj, input_precision=PRECISION)
        _store_symmetric_tile(
            acc, a_ptr + batch * stride_ab, cols_i, cols_j, bi, bj, d, stride_ar, stride_ac,
            beta, alpha, USE_BETA,
        )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _tile_pairs(tiles: int, device: torch.device) -> Tensor:
    """Upper-triangular tile coordinates ``(bi, bj)``, ``bi <= bj``, as int32 pairs."""
    pairs = [(i, j) for i in range(tiles) for j in range(i, tiles)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1)


_PRECISIONS = ("ieee", "tf32", "tf32x3")
_HALF = (torch.float16, torch.bfloat16)


def _check_launch(
    a: Tensor, block_d: int | None, block_n: int, input_precision: str, dispatcher: str
) -> bool:
    """Check a tiled symmetric kernel's launch options and device; returns whether the
    Triton interpreter runs it."""
    if block_d is not None and (block_d < 16 or block_d & (block_d - 1)):
        raise ValueError(f"block_d must be a power of two >= 16, got {block_d}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {_PRECISIONS}, got {input_precision!r}")
    interpret = interpreting()
    if not a.is_cuda and not interpret:
        raise ValueError(
            f"a and x must be CUDA tensors (got {a.device}); CPU tensors run only under "
            f"TRITON_INTERPRET=1 -- use {dispatcher} for automatic dispatch"
        )
    return interpret


def _block_d(d: int) -> int:
    # tl.dot needs tiles of at least 16 a side; 64 x 64 keeps a tile's fp32 accumulator in
    # registers with 4 warps. Not autotuned yet: no GPU measurement has been taken.
    return max(16, min(64, triton.next_power_of_2(d)))


def symmetric_factor_update_triton(
    a: Tensor,
    x: Tensor,
    *,
    beta: float = 1.0,
    alpha: float = 1.0,
    block_d: int | None = None,
    block_n: int = 32,
    input_precision: str = "ieee",
) -> Tensor:
    """``a <- beta * a + alpha * x^T x`` with the Triton kernel (in place; returns ``a``).

    Only the upper triangle of ``block_d x block_d`` tiles is computed, ``x`` streamed in
    chunks of ``block_n`` rows with float32 accumulation; each off-diagonal tile is also
    written mirrored, so the result is exactly symmetric. ``a`` is taken to be symmetric:
    only its upper triangle is read (and with ``beta == 0`` nothing of it is read).

    Args:
        a, x, beta, alpha: as in :func:`symmetric_factor_update_reference`. float64 ``a``
            falls back to the reference (the kernel accumulates in float32); float64 ``x``
            with float32 ``a`` is cast to float32 first, as the reference does.
        block_d (int, optional): tile side over ``d``, a power of two >= 16
            (default: the next power of two of ``d``, clamped to [16, 64]).
        block_n (int, optional): rows of ``x`` per step, a power of two >= 16 (default: 32).
        input_precision (str, optional): ``tl.dot`` precision for float32 ``x``: ``"ieee"``,
            ``"tf32"`` or ``"tf32x3"`` (default: ``"ieee"``). Half-precision ``x`` always
            multiplies natively with float32 accumulation.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests only). Any
    strides are accepted; nothing is copied except a float64 ``x``.

    Raises:
        RuntimeError: Triton is not installed.
        ValueError: bad shapes, block sizes, ``input_precision``, or CPU tensors without
            the interpreter.
        TypeError: bad dtypes.
    """
    if not HAS_TRITON:
        raise RuntimeError("symmetric_factor_update_triton needs Triton, which is not installed")
    _check(a, x)
    if a.dtype == torch.float64:
        return symmetric_factor_update_reference(a, x, beta=beta, alpha=alpha)
    interpret = _check_launch(a, block_d, block_n, input_precision, "symmetric_factor_update")
    if x.dtype == torch.float64:
        x = x.to(torch.float32)
    a3 = a if a.dim() == 3 else a.unsqueeze(0)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    batch, n, d = x3.shape
    if d == 0 or batch == 0:
        return a
    block = block_d or _block_d(d)
    pairs = _tile_pairs(triton.cdiv(d, block), a.device)
    # Tile pairs on axis 0 (up to 2^31 programs), the batch of factors on axis 1 (CUDA
    # allows 65535 there, far more groups than any layer has).
    grid = (pairs.numel() // 2, batch)
    _symmetric_update_kernel[grid](
        a3,
        x3,
        pairs,
        n,
        d,
        a3.stride(0),
        a3.stride(1),
        a3.stride(2),
        x3.stride(0),
        x3.stride(1),
        x3.stride(2),
        float(beta),
        float(alpha),
        BLOCK_D=block,
        BLOCK_N=block_n,
        USE_BETA=beta != 0,
        UPCAST=interpret and x.dtype in _HALF,
        PRECISION=input_precision,
    )
    return a


def symmetric_factor_update(
    a: Tensor, x: Tensor, *, beta: float = 1.0, alpha: float = 1.0
) -> Tensor:
    """``a <- beta * a + alpha * x^T x``, in place; returns ``a``.

    The Triton kernel when :func:`~._triton.use_triton` holds for ``x`` (CUDA tensor, Triton
    installed, ``SECONDORDER_REFERENCE_KERNELS`` not ``"1"``) and ``a`` is float32; the torch
    reference otherwise. Both honour the contract in the module docstring and raise the same
    errors for bad input; they agree to float32 round-off, and the kernel's result is
    exactly symmetric.
    """
    if use_triton(x) and a.dtype == torch.float32:
        return symmetric_factor_update_triton(a, x, beta=beta, alpha=alpha)
    return symmetric_factor_update_reference(a, x, beta=beta, alpha=alpha)

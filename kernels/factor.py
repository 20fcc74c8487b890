"""The fused symmetric factor update ``a <- beta * a + alpha * x^T x``.

K-FAC-family estimators accumulate every Kronecker factor statistic with it. Three
functions with one contract:

* :func:`symmetric_factor_update_reference` -- pure torch, the CPU path and the oracle;
* :func:`symmetric_factor_update_triton` -- the Triton kernel: only the upper triangle of
  tiles is computed, each off-diagonal tile is mirrored, so the result is exactly
  symmetric and the work is about half of a full ``x^T x``;
* :func:`symmetric_factor_update` -- dispatch: Triton for CUDA tensors, else the reference
  (``SECONDORDER_REFERENCE_KERNELS=1`` forces the reference).

Contract: ``a`` is float32 or float64, shape ``(d, d)`` or ``(b, d, d)``, and symmetric;
``x`` is ``(n, d)`` or ``(b, n, d)`` of any floating dtype. The product is accumulated in
``a``'s precision (float32 at least), the result is written into ``a`` in place, and ``a``
is returned. With ``beta == 0`` the old contents of ``a`` are never read, so a fresh
``torch.empty`` (even holding NaN) is a valid ``a``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._triton import HAS_TRITON, interpreting, tl, triton, use_triton

_A_DTYPES = (torch.float32, torch.float64)


def _check(a: Tensor, x: Tensor) -> None:
    if not isinstance(a, Tensor) or not isinstance(x, Tensor):
        raise TypeError("a and x must be torch.Tensors")
    if a.dtype not in _A_DTYPES:
        raise TypeError(f"a must be float32 or float64, got {a.dtype}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
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

    See the module docstring for the contract.
    """
    _check(a, x)
    xx = x.to(a.dtype)
    prod = xx.transpose(-1, -2) @ xx
    if beta == 0:
        a.copy_(prod.mul_(alpha))
    else:
        a.mul_(beta).add_(prod, alpha=alpha)
    return a


if HAS_TRITON:

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
        batch = tl.program_id(1)
        bi = tl.load(pairs_ptr + 2 * pid)
        bj = tl.load(pairs_ptr + 2 * pid + 1)
        cols_i = bi * BLOCK_D + tl.arange(0, BLOCK_D)
        cols_j = bj * BLOCK_D + tl.arange(0, BLOCK_D)
        x_base = x_ptr + batch * stride_xb
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
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
        if bi == bj:
            # Round-off can make a diagonal tile slightly asymmetric; average it away.
            acc = (acc + tl.trans(acc)) * 0.5
        out = acc * alpha
        a_base = a_ptr + batch * stride_ab
        ij = a_base + cols_i[:, None] * stride_ar + cols_j[None, :] * stride_ac
        mask_ij = (cols_i < d)[:, None] & (cols_j < d)[None, :]
        if USE_BETA:
            out += beta * tl.load(ij, mask=mask_ij, other=0.0)
        tl.store(ij, out, mask=mask_ij)
        if bi != bj:
            ji = a_base + cols_j[:, None] * stride_ar + cols_i[None, :] * stride_ac
            mask_ji = (cols_j < d)[:, None] & (cols_i < d)[None, :]
            tl.store(ji, tl.trans(out), mask=mask_ji)


@functools.lru_cache(maxsize=64)
def _tile_pairs(tiles: int, device: torch.device) -> Tensor:
    """Upper-triangular tile coordinates ``(bi, bj)``, ``bi <= bj``, as int32 pairs."""
    pairs = [(i, j) for i in range(tiles) for j in range(i, tiles)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1)


def _block_d(d: int) -> int:
    # tl.dot needs tiles of at least 16; 64 keeps a tile's fp32 accumulator in registers.
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

    Only the upper triangle of ``block_d x block_d`` tiles is computed; the rest is
    mirrored, so the result is exactly symmetric (``a`` is assumed symmetric: only its
    upper tiles are read). float64 ``a`` falls back to the reference. ``input_precision``
    is Triton's ``tl.dot`` precision for float32 ``x`` (``"ieee"``, ``"tf32"``,
    ``"tf32x3"``). Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if not HAS_TRITON:
        raise RuntimeError("symmetric_factor_update_triton needs Triton, which is not installed")
    _check(a, x)
    if a.dtype == torch.float64:
        return symmetric_factor_update_reference(a, x, beta=beta, alpha=alpha)
    if block_d is not None and (block_d < 16 or block_d & (block_d - 1)):
        raise ValueError(f"block_d must be a power of two >= 16, got {block_d}")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    a3 = a if a.dim() == 3 else a.unsqueeze(0)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    batch, n, d = x3.shape
    if d == 0 or batch == 0:
        return a
    block = block_d or _block_d(d)
    pairs = _tile_pairs(triton.cdiv(d, block), a.device)
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
        UPCAST=interpreting(),
        PRECISION=input_precision,
    )
    return a


def symmetric_factor_update(
    a: Tensor, x: Tensor, *, beta: float = 1.0, alpha: float = 1.0
) -> Tensor:
    """``a <- beta * a + alpha * x^T x`` (in place; returns ``a``): the Triton kernel for
    CUDA tensors, the torch reference otherwise. See the module docstring."""
    if use_triton(x) and a.dtype == torch.float32:
        return symmetric_factor_update_triton(a, x, beta=beta, alpha=alpha)
    return symmetric_factor_update_reference(a, x, beta=beta, alpha=alpha)

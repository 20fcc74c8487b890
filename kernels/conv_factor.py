"""The Conv2d K-FAC input factor without the unfolded patch matrix.

A convolution's ``A`` statistic is ``Σ_rows ã ãᵀ`` over its receptive-field patches, one
row per output position of each example: ``ã = [x patch, 1]`` with the patch in the
weight's column order (channel, then kernel row, then kernel column) and the homogeneous
1 last when the layer has a bias. Unfolding the patches first (``F.unfold``) costs
``k_h·k_w`` times the input in memory. Here:

* :func:`conv2d_factor_update_reference` -- pure torch, the CPU path and the oracle: the
  patches of a *chunk* of examples at a time (by default no more patch values than the
  input has values, one example at least), each folded in with one batched ``baddbmm``,
  so the peak is about the input's size, not ``k_h·k_w`` times it;
* :func:`conv2d_factor_update_triton` -- the Triton kernel: implicit im2col. Each program
  computes one tile of the upper triangle of ``A``; for a block of rows it computes the
  input address of every (row, column) pair of its tile -- example, output position,
  channel, kernel offset -- and loads the values straight from the input (zero padding as
  a load mask, the bias column as a constant 1), accumulating in float32. Off-diagonal
  tiles are mirrored: the result is exactly symmetric and nothing of size
  ``rows x columns`` ever exists;
* :func:`conv2d_factor_update_correlation` -- pure torch, for stride 1 and dilation 1 (the
  3 x 3 convolutions of a ResNet): every block from the channels' cross-correlation at the
  two kernel offsets' difference (one convolution of the input with itself gives all of
  them), corrected at the input's boundary rows and columns; ``(2k − 1)²`` instead of
  ``k⁴`` products of the input's size per channel pair, exact to round-off;
* :func:`conv2d_factor_update` -- dispatch: Triton for CUDA tensors, else the correlation
  path where it applies, else the reference (``SECONDORDER_REFERENCE_KERNELS=1`` forces
  the reference).

Contract: ``a`` is ``(groups, D, D)``, float32 or float64, symmetric, with
``D = C/groups · k_h · k_w (+ 1 with bias)``; ``x`` is ``(B, C, H, W)`` of any float dtype
(cast to ``a``'s) and any strides. ``padding`` is *zero* padding ``(p_h, p_w)`` on both
sides; other padding modes and asymmetric ('same') padding are applied to ``x`` before the
call. ``a <- beta a + alpha Σ_rows ã ãᵀ`` in place; ``a`` is returned. With ``beta == 0``
the old ``a`` is never read (NaN garbage is fine).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import HAS_TRITON, tl, triton, use_triton
from .factor import _block_d, _check_launch, _tile_pairs

Pair = tuple[int, int]
_A_DTYPES = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
#: the chunk of examples whose rows are built at once by paths that need the rows
#: (Conv3d, tied layers): at most this many values (16 MiB of float32), one example at least
CHUNK_ELEMENTS = 1 << 22


def _pair(name: str, value: int | Pair, low: int) -> Pair:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= low for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {low}, got {value!r}")
    return pair  # type: ignore[return-value]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (as ``nn.Conv2d``)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check(
    a: Tensor,
    x: Tensor,
    kernel_size: int | Pair,
    stride: int | Pair,
    padding: int | Pair,
    dilation: int | Pair,
    groups: int,
    bias: bool,
) -> tuple[Pair, Pair, Pair, Pair]:
    for name, t in (("a", a), ("x", x)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype not in _A_DTYPES:
        raise TypeError(f"a must be float32 or float64, got {a.dtype}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    k, s = _pair("kernel_size", kernel_size, 1), _pair("stride", stride, 1)
    p, d = _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"groups must be a positive divisor of C={x.shape[1]}, got {groups!r}")
    dim = x.shape[1] // groups * k[0] * k[1] + int(bool(bias))
    if tuple(a.shape) != (groups, dim, dim):
        raise ValueError(f"a must have shape {(groups, dim, dim)}, got {tuple(a.shape)}")
    if x.device != a.device:
        raise ValueError(f"a and x must be on one device, got {a.device} and {x.device}")
    for axis in (0, 1):
        if conv_output_size(x.shape[2 + axis], k[axis], s[axis], p[axis], d[axis]) < 1:
            raise ValueError(f"the kernel does not fit the input {tuple(x.shape[2:])}")
    return k, s, p, d


def conv2d_patch_rows(
    x: Tensor,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    bias: bool,
) -> Tensor:
    """The patch rows ``(groups, B·H_o·W_o, D)`` of ``x`` (the unfold the reference folds
    in by chunks; rows example-major, then output row, then output column)."""
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    for axis in (0, 1):
        k, s, dil = kernel_size[axis], stride[axis], dilation[axis]
        xp = xp.unfold(2 + axis, dil * (k - 1) + 1, s)
        if dil > 1:
            xp = xp[..., ::dil]
    b, _, ho, wo = xp.shape[:4]
    # (B, C, Ho, Wo, kh, kw) -> (B, Ho, Wo, C, kh, kw): the weight's column order
    rows = xp.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, groups, -1).transpose(0, 1)
    if bias:
        rows = torch.cat([rows, rows.new_ones(groups, rows.shape[1], 1)], dim=2)
    return rows


def conv2d_factor_update_reference(
    a: Tensor,
    x: Tensor,
    *,
    kernel_size: int | Pair,
    stride: int | Pair = 1,
    padding: int | Pair = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
    bias: bool = False,
    beta: float = 1.0,
    alpha: float = 1.0,
    chunk_elements: int | None = None,
) -> Tensor:
    """``a <- beta a + alpha Σ_rows ã ãᵀ`` over the patches of ``x``, in pure torch (in
    place; returns ``a``): the patches of as many examples at a time as fit in
    ``chunk_elements`` values (default: as many as ``x`` has; one example at least), each
    chunk folded in with one ``baddbmm`` in ``a``'s dtype. See the module docstring for
    the contract.

    Raises:
        TypeError: ``a`` is not float32/float64 or ``x`` not floating point.
        ValueError: bad shapes or convolution parameters.
    """
    k, s, p, d = _check(a, x, kernel_size, stride, padding, dilation, groups, bias)
    if chunk_elements is None:
        chunk_elements = x.numel()
    elif not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    b = x.shape[0]
    ho = conv_output_size(x.shape[2], k[0], s[0], p[0], d[0])
    wo = conv_output_size(x.shape[3], k[1], s[1], p[1], d[1])
    per_example = ho * wo * groups * a.shape[-1]
    step = max(1, chunk_elements // max(per_example, 1))
    if b == 0:
        if beta != 1.0:
            a.copy_(a * beta if beta else torch.zeros_like(a))
        return a
    for start in range(0, b, step):
        rows = conv2d_patch_rows(x[start : start + step].to(a.dtype), k, s, p, d, groups, bias)
        first = start == 0
        a.baddbmm_(rows.transpose(1, 2), rows, beta=beta if first else 1.0, alpha=alpha)
    return a


def _correlations(x: Tensor, max_shift: Pair) -> Tensor:
    """``F[c, c', di, dj] = Σ_{b, u, v} x[b, c, u, v] x[b, c', u + di, v + dj]`` (zero outside
    the input) for ``|di| ≤ max_shift[0]``, ``|dj| ≤ max_shift[1]``, indexed from
    ``-max_shift``: one convolution of the input with itself (batch as channels)."""
    xt = x.transpose(0, 1).contiguous()  # (C, B, H, W), one copy for input and weight
    out = F.conv2d(xt, xt, padding=max_shift)  # out[c, c', oy, ox] = F(oy - s_h, ...)[c', c]
    return out.transpose(0, 1)


def _line_correlations(x: Tensor, y: Tensor, max_shift: int) -> Tensor:
    """The 1-D version along the last dimension, of two lines: ``x``, ``y`` ``(B, C, L)`` ->
    ``G[c, c', s] = Σ_{b, u} x[b, c, u] y[b, c', u + s]`` ``(C, C, 2s + 1)``: one product of
    ``x`` with the ``2s + 1`` shifted windows of ``y`` (a ``conv1d`` with the batch as its
    channels and a line as its kernel is several times slower on the CPU)."""
    batch, channels, length = x.shape
    windows = F.pad(y, (max_shift, max_shift)).unfold(2, 2 * max_shift + 1, 1)  # (B, C, L, S)
    left = x.permute(1, 0, 2).reshape(channels, batch * length)
    right = windows.permute(0, 2, 1, 3).reshape(batch * length, -1)  # (B·L, C·S)
    return (left @ right).view(channels, channels, 2 * max_shift + 1)


def _window(o: int, size: int, out: int, pad: int, diff: int) -> tuple[int, int]:
    """The input positions (along one dimension) that kernel offset ``o`` reads for the
    ``out`` output positions, whose partner shifted by ``diff`` is inside the input too."""
    return max(o - pad, 0, -diff), min(o - pad + out, size, size - diff)


def _outside(o: int, size: int, out: int, pad: int, diff: int) -> list[int]:
    """The positions of the full range of difference ``diff`` outside :func:`_window`."""
    lo, hi = _window(o, size, out, pad, diff)
    full = range(max(0, -diff), min(size, size - diff))
    return list(full) if hi <= lo else [r for r in full if not lo <= r < hi]


def _correlation_blocks(new: Tensor, x: Tensor, k: Pair, p: Pair, out: Pair, bias: bool) -> None:
    """One group's ``Σ_rows ã ãᵀ`` into ``new`` (``(D, D)``, zeros) from ``x`` ``(B, C, H,
    W)`` (:func:`conv2d_factor_update_correlation`)."""
    (kh, kw), (ph, pw), (ho, wo) = k, p, out
    batch, cg, height, width = x.shape
    patch = cg * kh * kw
    # (2k_h − 1, 2k_w − 1, C, C): each difference's block contiguous
    corr = _correlations(x, (kh - 1, kw - 1)).permute(2, 3, 0, 1).contiguous()
    rows: dict[tuple[int, int], Tensor] = {}  # (row r, di) -> over columns, (C, C, 2k_w − 1)
    cols: dict[tuple[int, int], Tensor] = {}  # (column v, dj) -> over rows, (C, C, 2k_h − 1)
    offsets = [(i, j) for i in range(kh) for j in range(kw)]
    # (offset, offset', C, C), written into the factor's (channel, offset) order at the end
    blocks = x.new_empty(kh * kw, kh * kw, cg, cg)
    for n1, (i, j) in enumerate(offsets):
        for n2 in range(n1, len(offsets)):
            di, dj = offsets[n2][0] - i, offsets[n2][1] - j
            block = corr[di + kh - 1, dj + kw - 1].clone()
            out_rows = _outside(i, height, ho, ph, di)
            out_cols = _outside(j, width, wo, pw, dj)
            for r in out_rows:  # row r against row r + di, over the columns
                if (r, di) not in rows:
                    rows[r, di] = _line_correlations(x[:, :, r], x[:, :, r + di], kw - 1)
                block -= rows[r, di][:, :, dj + kw - 1]
            for v in out_cols:  # column v against column v + dj, over the rows
                if (v, dj) not in cols:
                    cols[v, dj] = _line_correlations(x[:, :, :, v], x[:, :, :, v + dj], kh - 1)
                block -= cols[v, dj][:, :, di + kh - 1]
            for r in out_rows:  # the corners, subtracted twice
                for v in out_cols:
                    block += x[:, :, r, v].T @ x[:, :, r + di, v + dj]
            blocks[n1, n2] = block
            if n2 != n1:
                blocks[n2, n1] = block.T
    new[:patch, :patch] = blocks.permute(2, 0, 3, 1).reshape(patch, patch)
    if bias:
        plane = x.sum(dim=0)  # (C, H, W): the windows' sums from it, not from the batch
        sums = [
            plane[
                :, slice(*_window(i, height, ho, ph, 0)), slice(*_window(j, width, wo, pw, 0))
            ].sum(dim=(1, 2))
            for i, j in offsets
        ]
        column = torch.stack(sums, dim=-1).reshape(patch)  # channel-major, as the weight
        new[:patch, -1] = column
        new[-1, :patch] = column
        new[-1, -1] = batch * ho * wo


def conv2d_factor_update_correlation(
    a: Tensor,
    x: Tensor,
    *,
    kernel_size: int | Pair,
    padding: int | Pair = 0,
    groups: int = 1,
    bias: bool = False,
    beta: float = 1.0,
    alpha: float = 1.0,
) -> Tensor:
    """``a <- beta a + alpha Σ_rows ã ãᵀ`` for a convolution with stride 1 and dilation 1,
    from the channels' cross-correlations instead of the patches (in place; returns ``a``).

    The block of kernel offsets ``o = (i, j)``, ``o' = (i', j')`` is
    ``Σ x[:, u, v] x[:, u + di, v + dj]ᵀ`` (``di = i' − i``, ``dj = j' − j``) over the input
    positions that offset ``o`` reads for some output position and whose partner lies in
    the input. It depends on the offsets through their difference, but for that window:
    every block is the full correlation at its difference (all ``(2k_h − 1)(2k_w − 1)`` of
    them from one convolution of the input with itself), minus the input rows and columns
    the window leaves out (the boundary rows and columns within the padding's reach: 1-D
    correlations along them), plus the corners counted twice. The same sums as the patches'
    in another order, so exact to round-off; about ``(2k − 1)²`` instead of ``k⁴`` products
    of the input's size per channel pair (25 instead of 81 for 3 x 3). The bias column is
    each offset's window sum, its corner the row count. Contract as in the module docstring
    (``padding`` is zero padding).
    """
    k, _, p, _ = _check(a, x, kernel_size, 1, padding, 1, groups, bias)
    (kh, kw), (ph, pw) = k, p
    ho = conv_output_size(x.shape[2], kh, 1, ph, 1)
    wo = conv_output_size(x.shape[3], kw, 1, pw, 1)
    cg = x.shape[1] // groups
    xd = x.to(a.dtype)
    new = a.new_zeros(groups, a.shape[-1], a.shape[-1])
    for g in range(groups):
        _correlation_blocks(
            new[g], xd[:, g * cg : (g + 1) * cg], (kh, kw), (ph, pw), (ho, wo), bias
        )
    if beta == 0:
        a.copy_(new.mul_(alpha))
    else:
        a.mul_(beta).add_(new, alpha=alpha)
    return a


if HAS_TRITON:
    from .factor import _store_symmetric_tile

    @triton.jit
    def _conv_factor_kernel(
        a_ptr,
        x_ptr,
        pairs_ptr,
        rows_total,
        dim,
        patch,
        cg,
        height,
        width,
        out_w,
        out_hw,
        kh_kw,
        kw,
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        stride_xn,
        stride_xc,
        stride_xh,
        stride_xw,
        stride_ag,
        stride_ar,
        stride_ac,
        beta,
        alpha,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_BETA: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        group = tl.program_id(1).to(tl.int64)
        bi = tl.load(pairs_ptr + 2 * pid)
        bj = tl.load(pairs_ptr + 2 * pid + 1)
        cols_i = bi * BLOCK_D + tl.arange(0, BLOCK_D)
        cols_j = bj * BLOCK_D + tl.arange(0, BLOCK_D)
        # column -> (channel, kernel row, kernel column), the weight's order
        chan_i = group * cg + cols_i // kh_kw
        chan_j = group * cg + cols_j // kh_kw
        ki_i = (cols_i % kh_kw) // kw
        ki_j = (cols_j % kh_kw) // kw
        kj_i = cols_i % kw
        kj_j = cols_j % kw
        in_i = cols_i < patch
        in_j = cols_j < patch
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for start in range(0, rows_total, BLOCK_N):
            # int64 addresses: the input of a large layer can exceed 2^31 elements
            rows = start + tl.arange(0, BLOCK_N).to(tl.int64)
            row_ok = rows < rows_total
            n = rows // out_hw
            pq = rows % out_hw
            top = (pq // out_w) * sh - ph
            left = (pq % out_w) * sw - pw
            base = x_ptr + n * stride_xn
            h_i = top[:, None] + ki_i[None, :] * dh
            w_i = left[:, None] + kj_i[None, :] * dw
            ok_i = row_ok[:, None] & in_i[None, :]
            ok_i = ok_i & (h_i >= 0) & (h_i < height) & (w_i >= 0) & (w_i < width)
            xi = tl.load(
                base[:, None] + chan_i[None, :] * stride_xc + h_i * stride_xh + w_i * stride_xw,
                mask=ok_i,
                other=0.0,
            )
            h_j = top[:, None] + ki_j[None, :] * dh
            w_j = left[:, None] + kj_j[None, :] * dw
            ok_j = row_ok[:, None] & in_j[None, :]
            ok_j = ok_j & (h_j >= 0) & (h_j < height) & (w_j >= 0) & (w_j < width)
            xj = tl.load(
                base[:, None] + chan_j[None, :] * stride_xc + h_j * stride_xh + w_j * stride_xw,
                mask=ok_j,
                other=0.0,
            )
            if UPCAST:
                # the Triton interpreter's tl.dot is wrong on half inputs (see factor.py)
                xi = xi.to(tl.float32)
                xj = xj.to(tl.float32)
            if HAS_BIAS:
                one = (row_ok[:, None] & (cols_i == patch)[None, :]).to(xi.dtype)
                xi = xi + one
                one = (row_ok[:, None] & (cols_j == patch)[None, :]).to(xj.dtype)
                xj = xj + one
            acc += tl.dot(tl.trans(xi), xj, input_precision=PRECISION)
        _store_symmetric_tile(
            acc, a_ptr + group * stride_ag, cols_i, cols_j, bi, bj, dim, stride_ar, stride_ac,
            beta, alpha, USE_BETA,
        )  # fmt: skip


def conv2d_factor_update_triton(
    a: Tensor,
    x: Tensor,
    *,
    kernel_size: int | Pair,
    stride: int | Pair = 1,
    padding: int | Pair = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
    bias: bool = False,
    beta: float = 1.0,
    alpha: float = 1.0,
    block_d: int | None = None,
    block_n: int = 32,
    input_precision: str = "ieee",
) -> Tensor:
    """``a <- beta a + alpha Σ_rows ã ãᵀ`` with the implicit-im2col Triton kernel (in place;
    returns ``a``), float32 accumulation. float64 ``a`` falls back to the reference.

    Args:
        a, x, kernel_size, stride, padding, dilation, groups, bias, beta, alpha: as in
            :func:`conv2d_factor_update_reference`.
        block_d (int, optional): tile side over ``D``, a power of two >= 16 (default: the
            next power of two of ``D``, clamped to [16, 64]).
        block_n (int, optional): rows per step, a power of two >= 16 (default: 32).
        input_precision (str, optional): ``tl.dot`` precision for float32 inputs:
            ``"ieee"``, ``"tf32"`` or ``"tf32x3"`` (default: ``"ieee"``).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests only).

    Raises:
        RuntimeError: Triton is not installed.
        ValueError / TypeError: as the reference, plus bad block sizes or precision.
    """
    if not HAS_TRITON:
        raise RuntimeError("conv2d_factor_update_triton needs Triton, which is not installed")
    k, s, p, d = _check(a, x, kernel_size, stride, padding, dilation, groups, bias)
    if a.dtype == torch.float64:
        return conv2d_factor_update_reference(
            a, x, kernel_size=k, stride=s, padding=p, dilation=d, groups=groups, bias=bias,
            beta=beta, alpha=alpha,
        )  # fmt: skip
    interpret = _check_launch(a, block_d, block_n, input_precision, "conv2d_factor_update")
    if x.dtype == torch.float64:
        x = x.to(torch.float32)
    b, c, h, w = x.shape
    ho = conv_output_size(h, k[0], s[0], p[0], d[0])
    wo = conv_output_size(w, k[1], s[1], p[1], d[1])
    dim = a.shape[-1]
    patch = c // groups * k[0] * k[1]
    if b == 0:
        if beta != 1.0:
            a.copy_(a * beta if beta else torch.zeros_like(a))
        return a
    block = block_d or _block_d(dim)
    pairs = _tile_pairs(triton.cdiv(dim, block), a.device)
    grid = (pairs.numel() // 2, groups)
    _conv_factor_kernel[grid](
        a, x, pairs, b * ho * wo, dim, patch, c // groups, h, w, wo, ho * wo,
        k[0] * k[1], k[1], s[0], s[1], p[0], p[1], d[0], d[1],
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        a.stride(0), a.stride(1), a.stride(2), float(beta), float(alpha),
        BLOCK_D=block, BLOCK_N=block_n, USE_BETA=beta != 0, HAS_BIAS=bool(bias),
        UPCAST=interpret and x.dtype in _HALF, PRECISION=input_precision,
    )  # fmt: skip
    return a


def conv2d_factor_update(
    a: Tensor,
    x: Tensor,
    *,
    kernel_size: int | Pair,
    stride: int | Pair = 1,
    padding: int | Pair = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
    bias: bool = False,
    beta: float = 1.0,
    alpha: float = 1.0,
) -> Tensor:
    """``a <- beta a + alpha Σ_rows ã ãᵀ`` over the patches of ``x``, in place.

    The Triton kernel when :func:`~._triton.use_triton` holds for ``x`` and ``a`` is float32;
    otherwise, for stride 1, dilation 1 and a kernel larger than 1 x 1,
    :func:`conv2d_factor_update_correlation` (unless ``SECONDORDER_REFERENCE_KERNELS=1``), and
    the chunked torch reference for the rest; all honour the module docstring's contract.
    """
    kw = {
        "kernel_size": kernel_size, "stride": stride, "padding": padding,
        "dilation": dilation, "groups": groups, "bias": bias, "beta": beta, "alpha": alpha,
    }  # fmt: skip
    if use_triton(x) and a.dtype == torch.float32:
        return conv2d_factor_update_triton(a, x, **kw)
    k, s, _, d = _check(a, x, kernel_size, stride, padding, dilation, groups, bias)
    if (
        s == (1, 1)
        and d == (1, 1)
        and k != (1, 1)
        and os.environ.get("SECONDORDER_REFERENCE_KERNELS", "0") != "1"
    ):
        del kw["stride"], kw["dilation"]
        return conv2d_factor_update_correlation(a, x, **kw)
    return conv2d_factor_update_reference(a, x, **kw)

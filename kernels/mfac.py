"""Dynamic M-FAC linear algebra: the coefficient factorisation and the inverse-Fisher product.

M-FAC (Frantar, Kurtic & Alistarh, 2021, https://arxiv.org/abs/2107.03356) keeps a window
``W`` of the last ``k`` gradients as rows and preconditions with the inverse of

    F = λ I + (1/k) Wᵀ W,      F⁻¹ x = x/λ − Wᵀ (k I + W Wᵀ/λ)⁻¹ W x / λ²      (Woodbury).

The ``k x k`` matrix ``K = k I + W Wᵀ/λ`` is factored by Cholesky, ``K = L Lᵀ`` (the paper's
reference code uses an unpivoted LU and a row-by-row coefficient recursion instead; Cholesky
gives the same product with less work and is backward stable for this positive definite
``K``). Three ops, each as a pure-torch ``*_reference`` (the CPU path and the oracle), a
``*_triton`` launcher and a dispatcher (Triton for CUDA tensors, see
:func:`~._triton.use_triton`):

* :func:`mfac_coefficients` -- ``L`` from the dot-product matrix ``gram = W Wᵀ``; the Triton
  version is a blocked right-looking Cholesky.
* :func:`mfac_ihvp` -- ``F⁻¹ x`` from the window, ``L`` and ``x``: exactly two passes over
  the window (``q = W x``, then ``x/λ − Wᵀ c/λ²`` with ``c = K⁻¹ q``), and no temporary of
  the window's size, so a bfloat16 window is never converted as a whole.
* :func:`mfac_gram_row` -- the dot products of one window row with the first ``k`` rows,
  to update one row and column of ``gram`` per new gradient.

Shapes: the window is ``(nb, m, B)`` -- ``nb`` independent blocks of ``B`` coordinates, each
with a ring buffer of ``m`` rows of which rows ``0 .. count-1`` are valid -- or ``(m, B)``
for one block; ``gram`` is ``(nb, m, m)`` or ``(m, m)``; ``x`` is ``(nb, B)`` or ``(B,)``.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

from ._triton import HAS_TRITON, interpreting, tl, triton, use_triton

__all__ = [
    "mfac_coefficients",
    "mfac_coefficients_reference",
    "mfac_coefficients_triton",
    "mfac_gram_row",
    "mfac_gram_row_reference",
    "mfac_gram_row_triton",
    "mfac_ihvp",
    "mfac_ihvp_reference",
    "mfac_ihvp_triton",
]

_GRAM_DTYPES = (torch.float32, torch.float64)
_WINDOW_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_X_DTYPES = (torch.float32, torch.float64)

# The references stream the window in tiles of about this many elements (1 MiB of float32,
# cache-sized on a CPU) whenever it must be converted, so that nothing of the window's size
# is ever allocated. A tile is at least _MIN_TILE_COLS columns wide (or the whole row) so
# the Python loop stays short when there are many blocks.
_TILE_ELEMENTS = 1 << 18
_MIN_TILE_COLS = 256


# ---- argument checks ---------------------------------------------------------------------


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must be one of ({names}), got {t.dtype}")


def _check_damping(damping: object) -> float:
    if (
        isinstance(damping, bool)
        or not isinstance(damping, numbers.Real)
        or not math.isfinite(damping)
        or damping <= 0
    ):
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    return float(damping)


def _check_count(count: object, m: int) -> int:
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be an int, got {type(count).__name__}")
    if not 1 <= count <= m:
        raise ValueError(f"count must satisfy 1 <= count <= m = {m}, got {count}")
    return int(count)


def _check_gram(gram: Tensor, count: int, damping: float) -> tuple[Tensor, int, float]:
    """Validate, and return ``gram`` as ``(nb, m, m)`` with the checked scalars."""
    _check_tensor("gram", gram, _GRAM_DTYPES)
    if gram.dim() not in (2, 3) or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be (m, m) or (nb, m, m), got shape {tuple(gram.shape)}")
    damping = _check_damping(damping)
    count = _check_count(count, gram.shape[-1])
    return (gram if gram.dim() == 3 else gram.unsqueeze(0)), count, damping


def _check_window(window: Tensor, count: int) -> tuple[Tensor, int]:
    _check_tensor("window", window, _WINDOW_DTYPES)
    if window.dim() not in (2, 3):
        raise ValueError(f"window must be (m, B) or (nb, m, B), got shape {tuple(window.shape)}")
    count = _check_count(count, window.shape[-2])
    return (window if window.dim() == 3 else window.unsqueeze(0)), count


def _check_ihvp(
    window: Tensor, chol: Tensor, x: Tensor, damping: float, count: int
) -> tuple[Tensor, Tensor, Tensor, float, int]:
    """Validate, and return window, chol, x as ``(nb, m, B)``, ``(nb, k, k)``, ``(nb, B)``."""
    w3, count = _check_window(window, count)
    _check_tensor("chol", chol, _GRAM_DTYPES)
    _check_tensor("x", x, _X_DTYPES)
    damping = _check_damping(damping)
    cols = w3.shape[2]
    if x.dim() != window.dim() - 1 or x.shape != (*window.shape[:-2], cols):
        want = "(B,)" if window.dim() == 2 else "(nb, B)"
        raise ValueError(
            f"x must be {want} matching window {tuple(window.shape)}, got {tuple(x.shape)}"
        )
    if chol.dim() != window.dim() or chol.shape != (*window.shape[:-2], count, count):
        raise ValueError(
            f"chol must be (count, count) = ({count}, {count}) per block of window "
            f"{tuple(window.shape)} (from mfac_coefficients with the same count), "
            f"got {tuple(chol.shape)}"
        )
    if not (x.device == window.device == chol.device):
        raise ValueError(
            f"window, chol and x must be on one device, got {window.device}, {chol.device} "
            f"and {x.device}"
        )
    x2 = x if x.dim() == 2 else x.unsqueeze(0)
    c3 = chol if chol.dim() == 3 else chol.unsqueeze(0)
    return w3, c3, x2, damping, count


def _check_row(row: object, m: int) -> int:
    if isinstance(row, bool) or not isinstance(row, numbers.Integral):
        raise TypeError(f"row must be an int, got {type(row).__name__}")
    if not 0 <= row < m:
        raise ValueError(f"row must satisfy 0 <= row < m = {m}, got {row}")
    return int(row)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any operand is float64, else float32 (bfloat16 is accumulated in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _require_device(t: Tensor, fn: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{fn} needs Triton, which is not installed")
    if not t.is_cuda and not interpreting():
        raise ValueError(
            f"{fn}: tensors must be CUDA tensors (got {t.device}); CPU tensors run only "
            f"under TRITON_INTERPRET=1 -- use {fn.removesuffix('_triton')} for automatic dispatch"
        )


def _check_block(name: str, value: int, low: int, high: int) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or value > high
        or value & (value - 1)
    ):
        raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value!r}")


def _solve(chol: Tensor, q: Tensor, dtype: torch.dtype) -> Tensor:
    """``K⁻¹ q`` per block from ``K = L Lᵀ`` (``count x count``: tiny, left to torch)."""
    solve_dtype = _compute_dtype(chol.dtype, dtype)
    c = torch.cholesky_solve(q.to(solve_dtype).unsqueeze(-1), chol.to(solve_dtype))
    return c.squeeze(-1).to(dtype)


def _nan_failed(chol: Tensor, failed: Tensor) -> Tensor:
    """All of a block's factor NaN where its ``K`` was not numerically positive definite."""
    return chol.masked_fill(failed[..., None, None], float("nan"))


# ---- references --------------------------------------------------------------------------


def _tiles(nb: int, rows: int, cols: int):
    """(block slice, column slice) pairs covering ``(nb, rows, cols)``, ~_TILE_ELEMENTS each."""
    if nb == 0 or cols == 0:
        return
    width = min(cols, max(_MIN_TILE_COLS, _TILE_ELEMENTS // (nb * rows)))
    group = min(nb, max(1, _TILE_ELEMENTS // (rows * width)))
    for b0 in range(0, nb, group):
        for c0 in range(0, cols, width):
            yield slice(b0, b0 + group), slice(c0, c0 + width)


def _matvec(w: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """``w @ v`` per block, ``w (nb, r, B)``, ``v (nb, B)``, accumulated in ``dtype``.

    When ``w`` must be converted it is converted one tile at a time.
    """
    if w.dtype == dtype and v.dtype == dtype:
        return torch.bmm(w, v.unsqueeze(-1)).squeeze(-1)
    nb, rows, cols = w.shape
    out = torch.zeros(nb, rows, dtype=dtype, device=w.device)
    for bs, cs in _tiles(nb, rows, cols):
        tile = w[bs, :, cs].to(dtype)
        out[bs] += torch.bmm(tile, v[bs, cs].to(dtype).unsqueeze(-1)).squeeze(-1)
    return out


def _update(w: Tensor, c: Tensor, x: Tensor, damping: float, dtype: torch.dtype) -> Tensor:
    """``x/λ − wᵀ c/λ²`` per block, ``w (nb, r, B)``, ``c (nb, r)``, ``x (nb, B)``, in ``dtype``."""
    alpha = -1.0 / (damping * damping)
    if w.dtype == dtype and x.dtype == dtype:
        xs = (x / damping).unsqueeze(-1)
        return torch.baddbmm(xs, w.transpose(1, 2), c.unsqueeze(-1), alpha=alpha).squeeze(-1)
    nb, rows, cols = w.shape
    out = torch.empty(nb, cols, dtype=dtype, device=w.device)
    for bs, cs in _tiles(nb, rows, cols):
        tile = w[bs, :, cs].to(dtype).transpose(1, 2)
        xs = (x[bs, cs].to(dtype) / damping).unsqueeze(-1)
        out[bs, cs] = torch.baddbmm(xs, tile, c[bs].unsqueeze(-1), alpha=alpha).squeeze(-1)
    return out


def mfac_coefficients_reference(gram: Tensor, count: int, damping: float) -> Tensor:
    """Lower Cholesky factor of ``K = count·I + gram[..., :count, :count] / damping``.

    Args:
        gram (Tensor): ``(nb, m, m)`` or ``(m, m)``, float32 or float64: the dot products
            of the window rows (symmetric positive semidefinite). Only the lower triangle
            of the leading ``count x count`` part is read.
        count (int): valid window rows, ``1 <= count <= m``.
        damping (float): λ > 0.

    Returns:
        ``L`` of shape ``(nb, count, count)`` (``(count, count)`` for a 2-D ``gram``), same
        dtype, lower triangular with a positive diagonal, ``L Lᵀ = K``. A block whose ``K``
        is not numerically positive definite (a float32 ``gram`` with a tiny damping can
        do that) comes back all NaN: no exception and no host synchronisation.

    Raises:
        TypeError: ``gram`` is not a float32/float64 tensor, or ``count`` not an int.
        ValueError: bad shape, ``damping <= 0``, or ``count`` out of ``[1, m]``.
    """
    g3, count, damping = _check_gram(gram, count, damping)
    k = g3[:, :count, :count] / damping
    k.diagonal(dim1=1, dim2=2).add_(count)
    chol, info = torch.linalg.cholesky_ex(k)
    chol = _nan_failed(chol, info != 0)
    return chol if gram.dim() == 3 else chol.squeeze(0)


def mfac_ihvp_reference(
    window: Tensor, chol: Tensor, x: Tensor, damping: float, count: int
) -> Tensor:
    """``F⁻¹ x`` for ``F = damping·I + (1/count) Wᵀ W``, ``W = window[..., :count, :]``.

    Two passes over ``W``: ``q = W x``, ``c = K⁻¹ q`` by ``cholesky_solve`` with ``chol``,
    then ``x/damping − Wᵀ c/damping²``. Arithmetic is in float64 when ``window``, ``x`` or
    ``chol`` is float64 (the solve) and in float32 otherwise; a bfloat16 window is
    converted one tile (about 2^18 elements) at a time, so no temporary of size
    ``count x B`` is ever allocated. A float32 window with a float32 ``x`` is used in place.

    Args:
        window (Tensor): ``(nb, m, B)`` or ``(m, B)``, float32, float64 or bfloat16; rows
            ``0 .. count-1`` hold the gradients.
        chol (Tensor): ``(nb, count, count)`` (``(count, count)`` for a 2-D window), float32
            or float64: :func:`mfac_coefficients` of the window's ``gram`` with the same
            ``count`` and ``damping``.
        x (Tensor): ``(nb, B)`` (``(B,)`` for a 2-D window), float32 or float64.
        damping (float): λ > 0.
        count (int): valid window rows, ``1 <= count <= m``.

    Returns:
        ``F⁻¹ x`` with ``x``'s shape and dtype.

    Raises:
        TypeError: a bad dtype or a non-int ``count``.
        ValueError: mismatched shapes or devices, ``damping <= 0``, ``count`` out of range.
    """
    w3, c3, x2, damping, count = _check_ihvp(window, chol, x, damping, count)
    dtype = _compute_dtype(w3.dtype, x2.dtype)
    w = w3[:, :count]
    q = _matvec(w, x2, dtype)
    c = _solve(c3, q, dtype)
    out = _update(w, c, x2, damping, dtype).to(x.dtype)
    return out.view(x.shape)


def mfac_gram_row_reference(window: Tensor, row: int, count: int) -> Tensor:
    """Dot products ``window[..., :count, :] @ window[..., row, :]``.

    Args:
        window (Tensor): ``(nb, m, B)`` or ``(m, B)``, float32, float64 or bfloat16.
        row (int): ``0 <= row < m``.
        count (int): ``1 <= count <= m``.

    Returns:
        ``(nb, count)`` (``(count,)`` for a 2-D window): float64 for a float64 window,
        float32 otherwise (bfloat16 products are exact in float32 and summed there). No
        temporary of the window's size is allocated.

    Raises:
        TypeError: a bad dtype or non-int ``row``/``count``.
        ValueError: bad shape, ``row`` or ``count`` out of range.
    """
    w3, count = _check_window(window, count)
    row = _check_row(row, w3.shape[1])
    dtype = _compute_dtype(w3.dtype)
    out = _matvec(w3[:, :count], w3[:, row], dtype)
    return out if window.dim() == 3 else out.squeeze(0)


# ---- Triton kernels ----------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _reciprocal(x, IS_FP64: tl.constexpr):
        # Triton's float32 "/" may lower to an approximate division; the factor deserves
        # the correctly rounded one (div_rn and sqrt_rn exist for float32 only; float64
        # division and square root are correctly rounded anyway).
        if IS_FP64:
            return 1.0 / x
        else:
            return tl.div_rn(1.0, x)

    @triton.jit
    def _reciprocal_sqrt(pivot, IS_FP64: tl.constexpr):
        if IS_FP64:
            return _reciprocal(tl.sqrt(pivot), IS_FP64)
        else:
            return _reciprocal(tl.sqrt_rn(pivot), IS_FP64)

    @triton.jit
    def _load_diagonal_tile(base, n, col0, stride_r, stride_c, BLOCK: tl.constexpr):
        """The lower triangle of ``A[col0:col0+BLOCK, col0:col0+BLOCK]``, zeros above.

        Rows and columns past ``n`` are padded with an identity block: the pivots there are
        1 and the padding never mixes with the real entries.
        """
        idx = tl.arange(0, BLOCK)
        cols = (col0 + idx).to(tl.int64)
        a = tl.load(
            base + cols[:, None] * stride_r + cols[None, :] * stride_c,
            mask=(idx[:, None] >= idx[None, :]) & (cols < n)[:, None],
            other=0.0,
        )
        return tl.where((idx[:, None] == idx[None, :]) & (cols >= n)[:, None], 1.0, a)

    @triton.jit
    def _factor_tile(a, BLOCK: tl.constexpr, IS_FP64: tl.constexpr):
        """Cholesky of a ``BLOCK x BLOCK`` tile held in registers (lower triangle read).

        Right-looking, one column per step; each step pulls column ``k`` out of the tile by
        a masked sum (registers cannot be indexed). Returns ``L`` with exact zeros above
        the diagonal.
        """
        idx = tl.arange(0, BLOCK)
        lower = idx[:, None] >= idx[None, :]
        for k in range(BLOCK):
            at_k = idx[None, :] == k
            colk = tl.sum(tl.where(at_k, a, 0.0), axis=1)
            r = _reciprocal_sqrt(tl.sum(tl.where(idx == k, colk, 0.0), axis=0), IS_FP64)
            lcol = tl.where(idx >= k, colk * r, 0.0)
            trailing = (idx[:, None] > k) & (idx[None, :] > k) & lower
            a = tl.where(trailing, a - lcol[:, None] * lcol[None, :], a)
            a = tl.where(at_k, lcol[:, None], a)
        return a

    @triton.jit
    def _chol_panel_kernel(
        l_ptr,
        n,
        col0,
        tiles,
        stride_b,
        stride_r,
        stride_c,
        BLOCK: tl.constexpr,
        IS_FP64: tl.constexpr,
    ):
        """``L21 = A21 L11⁻ᵀ`` for panel tile ``1 + program % tiles`` below the diagonal.

        Every program factors the diagonal tile ``A11`` itself (BLOCK³/3 flops, cheaper
        than a launch and a round trip through memory) and solves its panel tile by
        forward substitution over the columns. ``A11`` is not written here: other
        programs of this launch still read it (the trailing launch stores ``L11``).
        """
        pid = tl.program_id(0)
        batch = (pid // tiles).to(tl.int64)
        tile = pid % tiles + 1
        base = l_ptr + batch * stride_b
        l11 = _factor_tile(
            _load_diagonal_tile(base, n, col0, stride_r, stride_c, BLOCK), BLOCK, IS_FP64
        )
        idx = tl.arange(0, BLOCK)
        cols = (col0 + idx).to(tl.int64)
        rows = cols + tile * BLOCK
        ok = (rows < n)[:, None] & (cols < n)[None, :]
        ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
        p = tl.load(ptrs, mask=ok, other=0.0)
        for k in range(BLOCK):
            at_k = idx[None, :] == k
            lcol = tl.sum(tl.where(at_k, l11, 0.0), axis=1)  # L11[:, k]
            r = _reciprocal(tl.sum(tl.where(idx == k, lcol, 0.0), axis=0), IS_FP64)
            pk = tl.sum(tl.where(at_k, p, 0.0), axis=1) * r
            p = tl.where(idx[None, :] > k, p - pk[:, None] * lcol[None, :], p)
            p = tl.where(at_k, pk[:, None], p)
        tl.store(ptrs, p, mask=ok)

    @triton.jit
    def _chol_trailing_kernel(
        l_ptr,
        pairs_ptr,
        n,
        col0,
        npairs,
        stride_b,
        stride_r,
        stride_c,
        BLOCK: tl.constexpr,
        IS_FP64: tl.constexpr,
        K_CHUNK: tl.constexpr,
    ):
        """``A_rs -= L_r L_sᵀ`` for one lower tile of the trailing matrix, or store ``L11``.

        Programs ``0 .. npairs-1`` of a block update the trailing tiles named by ``pairs``
        (relative to the first tile after the panel); program ``npairs`` factors the
        diagonal tile once more and stores it -- nothing of this launch reads it.
        """
        pid = tl.program_id(0)
        batch = (pid // (npairs + 1)).to(tl.int64)
        pair = pid % (npairs + 1)
        base = l_ptr + batch * stride_b
        idx = tl.arange(0, BLOCK)
        if pair == npairs:
            l11 = _factor_tile(
                _load_diagonal_tile(base, n, col0, stride_r, stride_c, BLOCK), BLOCK, IS_FP64
            )
            cols = (col0 + idx).to(tl.int64)
            ok = (cols < n)[:, None] & (cols < n)[None, :]
            tl.store(base + cols[:, None] * stride_r + cols[None, :] * stride_c, l11, mask=ok)
        else:
            ti = tl.load(pairs_ptr + 2 * pair)
            tj = tl.load(pairs_ptr + 2 * pair + 1)
            rows = (col0 + (ti + 1) * BLOCK + idx).to(tl.int64)
            cols = (col0 + (tj + 1) * BLOCK + idx).to(tl.int64)
            row_ok = rows < n
            col_ok = cols < n
            if IS_FP64:
                # float64 tl.dot lowers differently per backend and architecture (no f64 MMA
                # on Blackwell or before sm80): multiply-and-sum compiles everywhere.
                upd = tl.zeros((BLOCK, BLOCK), dtype=tl.float64)
                for k0 in range(0, BLOCK, K_CHUNK):
                    kk = (col0 + k0 + tl.arange(0, K_CHUNK)).to(tl.int64)
                    k_ok = (kk < n)[None, :]
                    lr = tl.load(
                        base + rows[:, None] * stride_r + kk[None, :] * stride_c,
                        mask=row_ok[:, None] & k_ok,
                        other=0.0,
                    )
                    ls = tl.load(
                        base + cols[:, None] * stride_r + kk[None, :] * stride_c,
                        mask=col_ok[:, None] & k_ok,
                        other=0.0,
                    )
                    upd += tl.sum(lr[:, None, :] * ls[None, :, :], axis=2)
            else:
                kk = (col0 + idx).to(tl.int64)
                k_ok = (kk < n)[None, :]
                lr = tl.load(
                    base + rows[:, None] * stride_r + kk[None, :] * stride_c,
                    mask=row_ok[:, None] & k_ok,
                    other=0.0,
                )
                ls = tl.load(
                    base + cols[:, None] * stride_r + kk[None, :] * stride_c,
                    mask=col_ok[:, None] & k_ok,
                    other=0.0,
                )
                # "ieee": the default tf32 would drop 13 bits of every factorisation input
                upd = tl.dot(lr, tl.trans(ls), input_precision="ieee")
            ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
            ok = row_ok[:, None] & col_ok[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) - upd, mask=ok)

    @triton.jit
    def _window_matvec_kernel(
        w_ptr,
        x_ptr,
        part_ptr,
        count,
        n_cols,
        cols_per_split,
        row_blocks,
        splits,
        stride_wb,
        stride_wr,
        stride_wc,
        stride_xb,
        stride_xc,
        stride_pb,
        stride_ps,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Partial ``W x`` of one row block over one column range (``part[b, split, rows]``).

        Columns are split across programs so that a short window (few row blocks) still
        fills the GPU; the partial sums are added by the launcher (deterministic, unlike
        atomics).
        """
        pid = tl.program_id(0)
        per_batch = row_blocks * splits
        batch = (pid // per_batch).to(tl.int64)
        rest = pid % per_batch
        split = rest % splits
        rows = ((rest // splits) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < count
        start = split * cols_per_split
        end = tl.minimum(start + cols_per_split, n_cols)
        w_base = w_ptr + batch * stride_wb + rows[:, None] * stride_wr
        x_base = x_ptr + batch * stride_xb
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        for c0 in range(start, end, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            col_ok = cols < end
            w = tl.load(
                w_base + cols[None, :] * stride_wc,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            xv = tl.load(x_base + cols * stride_xc, mask=col_ok, other=0.0)
            acc += w.to(ACC) * xv.to(ACC)[None, :]
        out = part_ptr + batch * stride_pb + split * stride_ps + rows
        tl.store(out, tl.sum(acc, axis=1), mask=row_ok)

    @triton.jit
    def _window_update_kernel(
        w_ptr,
        c_ptr,
        x_ptr,
        out_ptr,
        scale_ptr,
        count,
        n_cols,
        col_blocks,
        stride_wb,
        stride_wr,
        stride_wc,
        stride_cb,
        stride_xb,
        stride_xc,
        stride_ob,
        stride_oc,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """``out = x/λ − Wᵀ c/λ²`` on one column block; ``scale = [1/λ, 1/λ²]`` in ``ACC``.

        The scales come through memory: a Python float argument would be a float32 scalar,
        and ``1/λ²`` rounded to float32 would cost float64 windows their accuracy.
        """
        pid = tl.program_id(0)
        batch = (pid // col_blocks).to(tl.int64)
        cols = ((pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        col_ok = cols < n_cols
        w_base = w_ptr + batch * stride_wb + cols[None, :] * stride_wc
        c_base = c_ptr + batch * stride_cb
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        for r0 in range(0, count, BLOCK_R):
            rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            row_ok = rows < count
            w = tl.load(
                w_base + rows[:, None] * stride_wr,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            cv = tl.load(c_base + rows, mask=row_ok, other=0.0)
            acc += w.to(ACC) * cv[:, None]
        wtc = tl.sum(acc, axis=0)
        xv = tl.load(x_ptr + batch * stride_xb + cols * stride_xc, mask=col_ok, other=0.0).to(ACC)
        inv = tl.load(scale_ptr)
        inv2 = tl.load(scale_ptr + 1)
        out = xv * inv - wtc * inv2
        dst = out_ptr + batch * stride_ob + cols * stride_oc
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=col_ok)


@functools.lru_cache(maxsize=64)
def _lower_tile_pairs(tiles: int, device: torch.device) -> Tensor:
    """Lower-triangular tile coordinates ``(i, j)``, ``j <= i < tiles``, as int32 pairs."""
    pairs = [(i, j) for i in range(tiles) for j in range(i + 1)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1)


@functools.lru_cache(maxsize=8)
def _target_programs(device: torch.device) -> int:
    """Programs that keep every SM of ``device`` busy for a bandwidth-bound pass."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs, each one slow


def _cholesky_block(count: int) -> int:
    # One tile when it fits (a single launch); 32 otherwise: the in-register factorisation
    # costs BLOCK steps of O(BLOCK²) work per program, and 32 keeps a tile at 8 registers
    # per thread with 4 warps. Not tuned on a GPU yet.
    return max(16, triton.next_power_of_2(count)) if count <= 64 else 32


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def mfac_coefficients_triton(
    gram: Tensor, count: int, damping: float, *, block_size: int | None = None
) -> Tensor:
    """:func:`mfac_coefficients_reference` by a blocked right-looking Cholesky in Triton.

    ``K`` is formed in the output tensor (lower triangle) and factored in place, one block
    column of ``block_size`` at a time, with two launches each, batched over the blocks of
    ``gram``: (1) every program factors the diagonal tile ``A11`` in registers and solves
    one panel tile below it, ``L21 = A21 L11⁻ᵀ``; (2) each lower tile of the trailing
    matrix subtracts ``L_r L_sᵀ`` (``tl.dot`` in float32 with IEEE precision,
    multiply-and-sum in float64), and one more program per block stores ``L11``. Same
    contract and errors as the reference, NaN blocks included.

    Args:
        block_size (int, optional): tile side, a power of two in [16, 64] (default: the
            next power of two of ``count`` up to 64, else 32).

    Raises:
        RuntimeError: Triton is not installed.
        ValueError: as the reference, a bad ``block_size``, or CPU tensors without
            ``TRITON_INTERPRET=1``.
    """
    g3, count, damping = _check_gram(gram, count, damping)
    if block_size is not None:
        _check_block("block_size", block_size, 16, 64)
    _require_device(gram, "mfac_coefficients_triton")
    block = block_size or _cholesky_block(count)
    nb = g3.shape[0]
    chol = torch.tril(g3[:, :count, :count]).div_(damping)
    chol.diagonal(dim1=1, dim2=2).add_(count)
    if nb == 0:
        return chol if gram.dim() == 3 else chol.squeeze(0)
    is_fp64 = chol.dtype == torch.float64
    tiles = triton.cdiv(count, block)
    strides = (chol.stride(0), chol.stride(1), chol.stride(2))
    for j in range(tiles):
        col0 = j * block
        # (1) the panel below diagonal tile j; (2) the trailing update, and L11 stored by
        # one extra program per block (written only once every panel program has read A11).
        # The grids are 1-D, blocks times tiles: grid axis 1 would cap nb at 65535.
        below = tiles - j - 1
        if below:
            _chol_panel_kernel[(nb * below,)](
                chol, count, col0, below, *strides, BLOCK=block, IS_FP64=is_fp64
            )
        # with no trailing tile the pairs are never read, but the pointer must be valid
        pairs = _lower_tile_pairs(max(below, 1), chol.device)
        npairs = below * (below + 1) // 2
        _chol_trailing_kernel[(nb * (npairs + 1),)](
            chol,
            pairs,
            count,
            col0,
            npairs,
            *strides,
            BLOCK=block,
            IS_FP64=is_fp64,
            # float64 multiply-and-sum holds BLOCK x BLOCK x K_CHUNK products: <= 8192
            K_CHUNK=min(block, 8192 // (block * block)),
        )
    # a non-positive pivot leaves NaN or Inf from its column on; mark the whole block as
    # the reference does
    chol = _nan_failed(chol, ~torch.isfinite(chol).all(dim=2).all(dim=1))
    return chol if gram.dim() == 3 else chol.squeeze(0)


def _matvec_triton(
    w: Tensor, v: Tensor, count: int, dtype: torch.dtype, block_rows: int, block_cols: int
) -> Tensor:
    """``w[:, :count] @ v`` per block with the Triton kernel, in ``dtype``: ``(nb, count)``."""
    nb, _, cols = w.shape
    row_blocks = triton.cdiv(count, block_rows)
    col_chunks = max(1, triton.cdiv(cols, block_cols))
    wanted = triton.cdiv(_target_programs(w.device), max(1, nb * row_blocks))
    cols_per_split = triton.cdiv(col_chunks, min(col_chunks, wanted)) * block_cols
    splits = max(1, triton.cdiv(cols, cols_per_split))
    part = torch.empty(nb, splits, count, dtype=dtype, device=w.device)
    if nb:
        _window_matvec_kernel[(nb * row_blocks * splits,)](
            w,
            v,
            part,
            count,
            cols,
            cols_per_split,
            row_blocks,
            splits,
            w.stride(0),
            w.stride(1),
            w.stride(2),
            v.stride(0),
            v.stride(1),
            part.stride(0),
            part.stride(1),
            BLOCK_R=block_rows,
            BLOCK_C=block_cols,
            ACC=_triton_dtype(dtype),
        )
    return part.sum(dim=1) if splits > 1 else part[:, 0]


def mfac_ihvp_triton(
    window: Tensor,
    chol: Tensor,
    x: Tensor,
    damping: float,
    count: int,
    *,
    block_rows: int = 16,
    block_cols: int = 256,
) -> Tensor:
    """:func:`mfac_ihvp_reference` with two Triton passes over the window.

    Pass 1 (programs over row blocks and column ranges, a loop over columns) computes
    ``q = W x``; ``c = K⁻¹ q`` is a ``count``-sized ``cholesky_solve`` in torch; pass 2
    (programs over column blocks, a loop over rows) computes ``Wᵀ c`` fused with
    ``x/λ − .../λ²`` and the cast to ``x``'s dtype. bfloat16 windows are loaded as they
    are and converted in registers; sums are in float32 (float64 when the window or ``x``
    is float64). Same contract and errors as the reference.

    Args:
        block_rows (int, optional): window rows per tile, a power of two in [1, 256]
            (default: 16).
        block_cols (int, optional): columns per tile, a power of two in [16, 4096]
            (default: 256). Neither is tuned on a GPU yet.

    Raises:
        RuntimeError: Triton is not installed.
        ValueError: as the reference, bad block sizes, or CPU tensors without
            ``TRITON_INTERPRET=1``.
    """
    w3, c3, x2, damping, count = _check_ihvp(window, chol, x, damping, count)
    _check_block("block_rows", block_rows, 1, 256)
    _check_block("block_cols", block_cols, 16, 4096)
    _require_device(window, "mfac_ihvp_triton")
    dtype = _compute_dtype(w3.dtype, x2.dtype)
    nb, _, cols = w3.shape
    q = _matvec_triton(w3, x2, count, dtype, block_rows, block_cols)
    c = _solve(c3, q, dtype).contiguous()
    # filled on the device: torch.tensor([...]) from host memory would synchronise the stream
    scale = torch.full((2,), 1.0 / damping, dtype=dtype, device=x.device)
    scale[1].fill_(1.0 / (damping * damping))
    out = torch.empty(nb, cols, dtype=x.dtype, device=x.device)
    col_blocks = triton.cdiv(cols, block_cols)
    if nb and cols:
        _window_update_kernel[(nb * col_blocks,)](
            w3,
            c,
            x2,
            out,
            scale,
            count,
            cols,
            col_blocks,
            w3.stride(0),
            w3.stride(1),
            w3.stride(2),
            c.stride(0),
            x2.stride(0),
            x2.stride(1),
            out.stride(0),
            out.stride(1),
            BLOCK_R=block_rows,
            BLOCK_C=block_cols,
            ACC=_triton_dtype(dtype),
        )
    return out.view(x.shape)


def mfac_gram_row_triton(
    window: Tensor, row: int, count: int, *, block_rows: int = 16, block_cols: int = 256
) -> Tensor:
    """:func:`mfac_gram_row_reference` with the Triton ``W x`` pass (``x`` = the row itself,
    read in place in its own dtype). Same contract and errors as the reference; block
    options as in :func:`mfac_ihvp_triton`."""
    w3, count = _check_window(window, count)
    row = _check_row(row, w3.shape[1])
    _check_block("block_rows", block_rows, 1, 256)
    _check_block("block_cols", block_cols, 16, 4096)
    _require_device(window, "mfac_gram_row_triton")
    dtype = _compute_dtype(w3.dtype)
    out = _matvec_triton(w3, w3[:, row], count, dtype, block_rows, block_cols)
    return out if window.dim() == 3 else out.squeeze(0)


# ---- dispatch ----------------------------------------------------------------------------


def mfac_coefficients(gram: Tensor, count: int, damping: float) -> Tensor:
    """Lower Cholesky factor ``L`` of ``K = count·I + gram[..., :count, :count] / damping``.

    ``(nb, count, count)`` (2-D for a 2-D ``gram``) in ``gram``'s dtype; only the lower
    triangle of ``gram``'s leading block is read; a block whose ``K`` is not numerically
    positive definite comes back all NaN. The Triton kernel for CUDA tensors (see
    :func:`~._triton.use_triton`), the torch reference otherwise; both agree to round-off.
    Full contract and errors: :func:`mfac_coefficients_reference`.
    """
    if use_triton(gram):
        return mfac_coefficients_triton(gram, count, damping)
    return mfac_coefficients_reference(gram, count, damping)


def mfac_ihvp(window: Tensor, chol: Tensor, x: Tensor, damping: float, count: int) -> Tensor:
    """``F⁻¹ x`` for ``F = damping·I + (1/count) Wᵀ W``, ``W = window[..., :count, :]``.

    ``chol`` is :func:`mfac_coefficients` of the window's dot products with the same
    ``count`` and ``damping``. Returns ``x``'s shape and dtype; reads the window exactly
    twice and allocates nothing of its size (a bfloat16 window is converted tile by tile,
    or in registers). The Triton kernels for CUDA tensors, the torch reference otherwise.
    Full contract and errors: :func:`mfac_ihvp_reference`.
    """
    if use_triton(window):
        return mfac_ihvp_triton(window, chol, x, damping, count)
    return mfac_ihvp_reference(window, chol, x, damping, count)


def mfac_gram_row(window: Tensor, row: int, count: int) -> Tensor:
    """Dot products of ``window[..., row, :]`` with rows ``0 .. count-1``: ``(nb, count)``.

    float64 for a float64 window, float32 otherwise; nothing of the window's size is
    allocated. The Triton kernel for CUDA tensors, the torch reference otherwise. Full
    contract and errors: :func:`mfac_gram_row_reference`.
    """
    if use_triton(window):
        return mfac_gram_row_triton(window, row, count)
    return mfac_gram_row_reference(window, row, count)

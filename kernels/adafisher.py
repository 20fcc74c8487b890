"""AdaFisher's fused update of one weight matrix (or a batch of same-shaped ones).

AdaFisher (Gomes et al., 2024, https://arxiv.org/abs/2405.16397) preconditions the
bias-corrected first moment of a ``(g_dim, a_dim)`` weight block by the diagonal Fisher
approximation ``F̃[i, j] = s_diag[i] · h_diag[j] + λ`` (the outer product of the diagonals
of the two Kronecker factors, plus damping). One call does, element by element::

    g' = g + wd·w                       (coupled / L2 decay; decoupled=False only)
    m  ← β m + (1 − β) g'
    w  ← w − lr · (m / bias_correction / F̃ + wd·w)      (the wd·w term: decoupled=True only)

with ``bias_correction = 1 − βᵗ``, and writes ``m`` and ``w`` in place. Three functions with
one contract:

* :func:`adafisher_update_reference` -- pure torch, the CPU path and the oracle;
* :func:`adafisher_update_triton` -- the Triton kernel: one pass over ``w``, ``g`` and ``m``
  in tiles, ``F̃`` formed in registers from the two diagonals (never materialised);
* :func:`adafisher_update` -- dispatch: Triton for CUDA tensors, else the reference
  (``SECONDORDER_REFERENCE_KERNELS=1`` forces the reference).

Contract: ``param`` is ``(rows, cols)`` or ``(batch, rows, cols)``, float32, float64,
bfloat16 or float16, with any strides (a transposed view is fine: the embedding block is
one); ``grad`` and ``exp_avg`` have its shape and a floating dtype; ``s_diag`` is ``(rows,)``
or ``(batch, rows)`` and ``h_diag`` ``(cols,)`` or ``(batch, cols)`` (broadcast views with
stride 0 are fine). The arithmetic is float64 when ``param`` is float64 and float32
otherwise (half-precision tensors are upcast on load and rounded once on store; float64
diagonals of a float32 ``param`` are rounded to float32). ``grad`` and the diagonals are
never written.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._triton import HAS_TRITON, interpreting, tl, triton, use_triton

__all__ = ["adafisher_update", "adafisher_update_reference", "adafisher_update_triton"]

_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_scalar(name: str, value: object, allowed: str) -> float:
    """``value`` as a float if it is a finite real in the range ``allowed`` names."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = {
        ">= 0": value >= 0.0,
        "> 0": value > 0.0,
        "in [0, 1)": 0.0 <= value < 1.0,
        "in (0, 1]": 0.0 < value <= 1.0,
    }[allowed]
    if not (math.isfinite(value) and ok):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    return value


def _check(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    s_diag: Tensor,
    h_diag: Tensor,
    lr: float,
    beta: float,
    bias_correction: float,
    damping: float,
    weight_decay: float,
) -> tuple[float, float, float, float, float]:
    for name, t in (
        ("param", param),
        ("grad", grad),
        ("exp_avg", exp_avg),
        ("s_diag", s_diag),
        ("h_diag", h_diag),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if param.dtype not in _PARAM_DTYPES:
        raise TypeError(f"param must be float32, float64, bfloat16 or float16, got {param.dtype}")
    if param.dim() not in (2, 3):
        raise ValueError(
            f"param must be (rows, cols) or (batch, rows, cols), got {tuple(param.shape)}"
        )
    for name, t in (("grad", grad), ("exp_avg", exp_avg)):
        if t.shape != param.shape:
            raise ValueError(
                f"{name} must have param's shape {tuple(param.shape)}, got {tuple(t.shape)}"
            )
    lead = tuple(param.shape[:-2])
    rows, cols = param.shape[-2:]
    if tuple(s_diag.shape) != (*lead, rows):
        raise ValueError(f"s_diag must have shape {(*lead, rows)}, got {tuple(s_diag.shape)}")
    if tuple(h_diag.shape) != (*lead, cols):
        raise ValueError(f"h_diag must have shape {(*lead, cols)}, got {tuple(h_diag.shape)}")
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("s_diag", s_diag), ("h_diag", h_diag)):
        if t.device != param.device:
            raise ValueError(f"{name} must be on param's device {param.device}, got {t.device}")
    return (
        _check_scalar("lr", lr, ">= 0"),
        _check_scalar("beta", beta, "in [0, 1)"),
        _check_scalar("bias_correction", bias_correction, "in (0, 1]"),
        _check_scalar("damping", damping, "> 0"),
        _check_scalar("weight_decay", weight_decay, ">= 0"),
    )


def adafisher_update_reference(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    s_diag: Tensor,
    h_diag: Tensor,
    *,
    lr: float,
    beta: float,
    bias_correction: float,
    damping: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> Tensor:
    """AdaFisher's update in pure torch; writes ``param`` and ``exp_avg`` in place and
    returns ``param``.

    ``F̃ = s_diag ⊗ h_diag + damping`` is materialised here (it is the oracle, not the fast
    path). See the module docstring for the formula and the contract.

    Args:
        param, grad, exp_avg: the weight block, its gradient and first moment.
        s_diag, h_diag: the diagonals of the output-gradient and input factors.
        lr (float): learning rate, >= 0.
        beta (float): first-moment decay β, in [0, 1).
        bias_correction (float): ``1 − βᵗ`` at step ``t`` (>= 1), in (0, 1].
        damping (float): λ, > 0.
        weight_decay (float, optional): decay coefficient, >= 0 (default: 0).
        decoupled (bool, optional): decoupled decay ``w ← w − lr·wd·w`` (AdaFisherW)
            instead of adding ``wd·w`` to the gradient (AdaFisher) (default: False).

    Raises:
        TypeError: a tensor is not a floating tensor, ``param`` has another dtype than
            the four allowed, or a scalar is not a real number.
        ValueError: shapes or devices do not match, or a scalar is out of range.
    """
    lr, beta, bias_correction, damping, weight_decay = _check(
        param, grad, exp_avg, s_diag, h_diag, lr, beta, bias_correction, damping, weight_decay
    )
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    w = param.to(dtype)
    g = grad.to(dtype)
    if weight_decay != 0 and not decoupled:
        g = g + weight_decay * w
    m = exp_avg.to(dtype) * beta + (1.0 - beta) * g
    fisher = s_diag.to(dtype).unsqueeze(-1) * h_diag.to(dtype).unsqueeze(-2) + damping
    step = m / bias_correction / fisher
    if weight_decay != 0 and decoupled:
        step = step + weight_decay * w
    exp_avg.copy_(m)
    param.copy_(w - lr * step)
    return param


if HAS_TRITON:

    @triton.jit
    def _adafisher_kernel(
        w_ptr,
        g_ptr,
        m_ptr,
        s_ptr,
        h_ptr,
        rows,
        cols,
        stride_wb,
        stride_wr,
        stride_wc,
        stride_gb,
        stride_gr,
        stride_gc,
        stride_mb,
        stride_mr,
        stride_mc,
        stride_sb,
        stride_sr,
        stride_hb,
        stride_hc,
        lr,
        beta,
        bias_correction,
        damping,
        weight_decay,
        DECOUPLED: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # int64 offsets: an embedding block can exceed 2^31 elements
        batch = tl.program_id(2).to(tl.int64)
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        ok_r = r < rows
        ok_c = c < cols
        mask = ok_r[:, None] & ok_c[None, :]
        w_at = w_ptr + batch * stride_wb + r[:, None] * stride_wr + c[None, :] * stride_wc
        m_at = m_ptr + batch * stride_mb + r[:, None] * stride_mr + c[None, :] * stride_mc
        g_at = g_ptr + batch * stride_gb + r[:, None] * stride_gr + c[None, :] * stride_gc
        w = tl.load(w_at, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_at, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_at, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + batch * stride_sb + r * stride_sr, mask=ok_r, other=0.0)
        h = tl.load(h_ptr + batch * stride_hb + c * stride_hc, mask=ok_c, other=0.0)
        if not DECOUPLED:
            g = g + weight_decay * w
        m = beta * m + (1.0 - beta) * g
        # F̃ in registers: one product and one add per element, never stored
        fisher = s.to(tl.float32)[:, None] * h.to(tl.float32)[None, :] + damping
        step = m / bias_correction / fisher
        if DECOUPLED:
            step = step + weight_decay * w
        tl.store(m_at, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(w_at, (w - lr * step).to(w_ptr.dtype.element_ty), mask=mask)


# A tile of this many elements per program: the op is bandwidth bound (3 loads, 2 stores per
# element), and 4K elements keep 4 warps busy with 32 elements each. Not autotuned yet: no
# GPU measurement has been taken.
_TILE = 4096
_MAX_BLOCK_C = 256


def _blocks(rows: int, cols: int) -> tuple[int, int]:
    # Narrow blocks (cols = 1: a bias, a norm layer's scale) put the whole tile on the rows,
    # so that no lane is masked off.
    block_c = min(triton.next_power_of_2(max(cols, 1)), _MAX_BLOCK_C)
    block_r = max(1, min(_TILE // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_c


def adafisher_update_triton(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    s_diag: Tensor,
    h_diag: Tensor,
    *,
    lr: float,
    beta: float,
    bias_correction: float,
    damping: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    block_r: int | None = None,
    block_c: int | None = None,
) -> Tensor:
    """AdaFisher's update with the Triton kernel (in place; returns ``param``).

    Arguments as in :func:`adafisher_update_reference`; float64 ``param`` falls back to the
    reference (the kernel computes in float32). ``block_r`` / ``block_c`` (powers of two)
    override the tile shape (default: up to 256 columns, 4096 elements a tile).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests only).

    Raises:
        RuntimeError: Triton is not installed.
        ValueError: bad shapes, block sizes, or CPU tensors without the interpreter.
        TypeError: bad dtypes.
    """
    if not HAS_TRITON:
        raise RuntimeError("adafisher_update_triton needs Triton, which is not installed")
    kwargs = {
        "lr": lr,
        "beta": beta,
        "bias_correction": bias_correction,
        "damping": damping,
        "weight_decay": weight_decay,
        "decoupled": decoupled,
    }
    lr, beta, bias_correction, damping, weight_decay = _check(
        param, grad, exp_avg, s_diag, h_diag, lr, beta, bias_correction, damping, weight_decay
    )
    if param.dtype == torch.float64:
        return adafisher_update_reference(param, grad, exp_avg, s_diag, h_diag, **kwargs)
    for name, block in (("block_r", block_r), ("block_c", block_c)):
        if block is not None and (block < 1 or block & (block - 1)):
            raise ValueError(f"{name} must be a power of two, got {block}")
    if not param.is_cuda and not interpreting():
        raise ValueError(
            f"param must be a CUDA tensor (got {param.device}); CPU tensors run only under "
            "TRITON_INTERPRET=1 -- use adafisher_update for automatic dispatch"
        )
    w3, g3, m3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (param, grad, exp_avg))
    s2, h2 = (t if t.dim() == 2 else t.unsqueeze(0) for t in (s_diag, h_diag))
    batch, rows, cols = w3.shape
    if w3.numel() == 0:
        return param
    default_r, default_c = _blocks(rows, cols)
    br, bc = block_r or default_r, block_c or default_c
    # rows on axis 0 (up to 2^31 programs), columns on axis 1 and the batch (groups of a
    # grouped convolution) on axis 2 (CUDA allows 65535 there)
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc), batch)
    _adafisher_kernel[grid](
        w3,
        g3,
        m3,
        s2,
        h2,
        rows,
        cols,
        *w3.stride(),
        *g3.stride(),
        *m3.stride(),
        *s2.stride(),
        *h2.stride(),
        lr,
        beta,
        bias_correction,
        damping,
        weight_decay,
        DECOUPLED=bool(decoupled),
        BLOCK_R=br,
        BLOCK_C=bc,
    )
    return param


def adafisher_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    s_diag: Tensor,
    h_diag: Tensor,
    *,
    lr: float,
    beta: float,
    bias_correction: float,
    damping: float,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> Tensor:
    """AdaFisher's fused update, in place; returns ``param``.

    The Triton kernel when :func:`~._triton.use_triton` holds for ``param`` (CUDA tensor,
    Triton installed, ``SECONDORDER_REFERENCE_KERNELS`` not ``"1"``) and ``param`` is not
    float64; the torch reference otherwise. Both honour the contract in the module docstring
    and raise the same errors for bad input; they agree to float32 round-off.
    """
    kwargs = {
        "lr": lr,
        "beta": beta,
        "bias_correction": bias_correction,
        "damping": damping,
        "weight_decay": weight_decay,
        "decoupled": decoupled,
    }
    if use_triton(param) and param.dtype != torch.float64:
        return adafisher_update_triton(param, grad, exp_avg, s_diag, h_diag, **kwargs)
    return adafisher_update_reference(param, grad, exp_avg, s_diag, h_diag, **kwargs)

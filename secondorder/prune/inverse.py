r"""The static M-FAC inverse: ``F⁻¹`` of ``F = λI + GᵀG/m`` from ``m`` stored gradients.

``G`` is ``m x d`` (one gradient per row). By Woodbury,

.. math::
    F^{-1} = \tfrac{1}{\lambda} I - \tfrac{1}{\lambda^2} G^\top K^{-1} G,
    \qquad K = m I + \tfrac{1}{\lambda} G G^\top = L L^\top,

so with ``U = L⁻¹ G / λ`` (``m x d``, computed once) ``F⁻¹ = I/λ − UᵀU``: an
inverse-Hessian-vector product is two passes over ``U`` (``x/λ − Uᵀ(U x)``), the diagonal is
``1/λ − Σᵢ U_{ij}²`` and a column is ``e_j/λ − Uᵀ U_{:j}``. This is the M-FAC paper's
static algorithm (Frantar et al. 2021, section 3): its row-by-row recursion builds the same
``U`` (the rows are its scaled ``vᵢ``), here as one Cholesky factorisation and a triangular
solve, in float64.

**Blocked form** (``block_size=B``): the coordinates are cut into consecutive blocks of ``B``
(the last one zero-padded) and each block gets its own ``F_b = λI + G_bᵀG_b/m``, i.e. the
block-diagonal approximation; ``blocks_per_batch`` blocks are factored at once (one batched
``m x m`` Cholesky each). Memory: ``U`` (``m x d`` floats) plus one batch of ``m x m`` and
``m x B`` float64 temporaries, never ``d x d`` nor even ``(d/B) x m x m`` at once.

**Paged form** (``pages=P``): the columns of each batch of blocks are visited in ``P``
pages, so that with the gradients (and ``U``) kept in CPU memory and ``device="cuda"`` only a
page at a time is on the device: the ``m x m`` Gram matrix is accumulated page by page, then
``U`` is computed page by page; the products work page by page too. With ``block_size=None``
(the full ``d x d`` inverse) this is the reference's paged full-block estimation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["StaticFisherInverse"]


def _positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class StaticFisherInverse:
    """``F⁻¹`` for ``F = damping·I + GᵀG/m`` (blocked and/or paged), see the module docs.

    Args:
        grads (Tensor): ``(m, d)`` floating-point gradients, one per row. They are not
            modified; ``U`` is stored on their device, in float64 if they are float64 and in
            float32 otherwise (float16/bfloat16 gradients are widened to float32).
        damping (float): λ > 0.
        block_size (int, optional): ``B``: the block-diagonal approximation with blocks of
            ``B`` consecutive coordinates; None (default) or ``B >= d`` is the full inverse.
        pages (int, optional): column pages per batch of blocks (default: 1). Each page is
            moved to ``device`` on its own. A page holds at least one column, so more pages
            than ``B`` (or ``d`` in full form) are capped at that number.
        device (torch.device or str, optional): where the arithmetic runs (default: the
            gradients' device). With the gradients in CPU memory and a CUDA device, only a
            page of the gradients is on the GPU at a time.
        blocks_per_batch (int, optional): blocks factored together (default: as many as keep
            a batch of ``G`` near 2^24 elements).

    Raises:
        TypeError: ``grads`` is not a floating-point tensor, or a count is not an int.
        ValueError: ``grads`` is not 2-D or is empty, ``damping`` is not a positive finite
            number, a count is below 1, or the gradients are not finite.
    """

    def __init__(
        self,
        grads: Tensor,
        damping: float,
        *,
        block_size: int | None = None,
        pages: int = 1,
        device: torch.device | str | None = None,
        blocks_per_batch: int | None = None,
    ) -> None:
        if not isinstance(grads, Tensor) or not grads.is_floating_point():
            raise TypeError(f"grads must be a floating-point tensor, got {_kind(grads)}")
        if grads.dim() != 2 or grads.numel() == 0:
            raise ValueError(f"grads must be a non-empty (m, d) matrix, got {tuple(grads.shape)}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise TypeError(f"damping must be a number, got {type(damping).__name__}")
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"damping must be a positive finite number, got {damping!r}")
        block_size = _positive_int("block_size", block_size, allow_none=True)
        pages = _positive_int("pages", pages)
        if not torch.isfinite(grads).all():
            raise ValueError("grads contain NaN or Inf")
        m, d = grads.shape
        self.m, self.d, self.damping = m, d, float(damping)
        self.block_size = d if block_size is None or block_size >= d else block_size
        self.num_blocks = -(-d // self.block_size)
        self.pages = min(pages, self.block_size)
        self.device = torch.device(device) if device is not None else grads.device
        if blocks_per_batch is None:
            blocks_per_batch = max(1, (1 << 24) // (m * self.block_size))
        self.blocks_per_batch = _positive_int("blocks_per_batch", blocks_per_batch)
        self.dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        self.storage = grads.device
        self._u = self._factor(grads)

    # -- construction ------------------------------------------------------------------------

    def _blocked(self, flat: Tensor) -> Tensor:
        """``(..., d)`` -> ``(..., nb, B)``, zero-padded."""
        pad = self.num_blocks * self.block_size - self.d
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        return flat.reshape(*flat.shape[:-1], self.num_blocks, self.block_size)

    def _pages(self) -> Iterator[tuple[slice, list[slice]]]:
        step = -(-self.block_size // self.pages)
        cols = [slice(c, min(c + step, self.block_size)) for c in range(0, self.block_size, step)]
        for b in range(0, self.num_blocks, self.blocks_per_batch):
            yield slice(b, min(b + self.blocks_per_batch, self.num_blocks)), cols

    def _factor(self, grads: Tensor) -> Tensor:
        # (nb, m, B) on the storage device, in the storage dtype
        g = self._blocked(grads.to(self.dtype)).permute(1, 0, 2).contiguous()
        if g.data_ptr() == grads.data_ptr():  # a view of the caller's gradients: copy
            g = g.clone()
        work = torch.float64
        for bs, cols in self._pages():
            gram = torch.zeros(bs.stop - bs.start, self.m, self.m, dtype=work, device=self.device)
            for cs in cols:
                page = g[bs, :, cs].to(self.device, work)
                gram.baddbmm_(page, page.transpose(1, 2))
            k = gram / self.damping
            k.diagonal(dim1=1, dim2=2).add_(self.m)
            chol, info = torch.linalg.cholesky_ex(k)
            if bool(info.any()):  # K = mI + PSD/λ is positive definite unless λ underflows
                raise FloatingPointError(
                    f"Cholesky of m*I + G G^T/damping failed (damping {self.damping:g} too small "
                    "for these gradients)"
                )
            for cs in cols:
                page = g[bs, :, cs].to(self.device, work)
                u = torch.linalg.solve_triangular(chol, page, upper=False) / self.damping
                g[bs, :, cs] = u.to(self.storage, self.dtype)
        return g

    # -- products ----------------------------------------------------------------------------

    def _check_vector(self, name: str, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_kind(x)}")
        if x.shape != (self.d,):
            raise ValueError(f"{name} must have shape ({self.d},), got {tuple(x.shape)}")
        return x

    def ihvp(self, x: Tensor) -> Tensor:
        """``F⁻¹ x`` for ``x`` of shape ``(d,)``; returns ``x``'s dtype and device."""
        x = self._check_vector("x", x)
        xb = self._blocked(x.to(self.storage, torch.float64))  # (nb, B)
        out = torch.empty_like(xb)
        for bs, cols in self._pages():
            q = torch.zeros(bs.stop - bs.start, self.m, 1, dtype=torch.float64, device=self.device)
            for cs in cols:
                q += self._u[bs, :, cs].to(self.device, torch.float64) @ xb[bs, cs, None].to(
                    self.device
                )
            for cs in cols:
                u = self._u[bs, :, cs].to(self.device, torch.float64)
                xs = xb[bs, cs].to(self.device)
                out[bs, cs] = (xs / self.damping - (u.transpose(1, 2) @ q).squeeze(-1)).to(
                    self.storage
                )
        return out.reshape(-1)[: self.d].to(x.device, x.dtype)

    def diag(self) -> Tensor:
        """The diagonal of ``F⁻¹``, shape ``(d,)``, in the storage dtype and device."""
        out = torch.empty(self.num_blocks, self.block_size, dtype=torch.float64)
        out = out.to(self.storage)
        for bs, cols in self._pages():
            for cs in cols:
                u = self._u[bs, :, cs].to(self.device, torch.float64)
                out[bs, cs] = (1.0 / self.damping - u.square().sum(1)).to(self.storage)
        return out.reshape(-1)[: self.d].to(self.dtype)

    def column(self, j: int) -> Tensor:
        """``F⁻¹ e_j`` (zero outside ``j``'s block), shape ``(d,)``."""
        j = self._index("j", j)
        e = torch.zeros(self.d, dtype=self.dtype, device=self.storage)
        e[j] = 1
        return self.ihvp(e)

    def entry(self, i: int, j: int) -> float:
        """``[F⁻¹]_ij`` (0 for coordinates in different blocks)."""
        i, j = self._index("i", i), self._index("j", j)
        bi, bj = divmod(i, self.block_size), divmod(j, self.block_size)
        if bi[0] != bj[0]:
            return 0.0
        u = self._u[bi[0]].to(torch.float64)
        value = -float(u[:, bi[1]] @ u[:, bj[1]])
        return value + (1.0 / self.damping if i == j else 0.0)

    def entries(self, rows: Sequence[int], cols: Sequence[int]) -> Tensor:
        """The ``len(rows) x len(cols)`` submatrix ``[F⁻¹]_{rows, cols}`` (float64)."""
        return torch.tensor([[self.entry(i, j) for j in cols] for i in rows], dtype=torch.float64)

    def _index(self, name: str, j: object) -> int:
        if isinstance(j, bool) or not isinstance(j, int):
            raise TypeError(f"{name} must be an int, got {type(j).__name__}")
        if not 0 <= j < self.d:
            raise ValueError(f"{name} must be in [0, {self.d}), got {j}")
        return j

    @property
    def nbytes(self) -> int:
        """Bytes held by the factor ``U`` (``m x`` the padded ``d``)."""
        return self._u.numel() * self._u.element_size()


def _kind(x: object) -> str:
    return f"{x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__

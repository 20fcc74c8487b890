"""How one Kronecker factor of a layer is stored: in full, as diagonal blocks, or as its
diagonal (:class:`FactorLayout`), and the choice between them (:func:`choose_layout`).

A factor of width ``n`` split into ``k`` blocks is approximated by
``blockdiag(F_1, ..., F_k)``: the blocks are contiguous ranges of coordinates, as equal as
possible (sizes ``⌈n/k⌉`` and ``⌈n/k⌉ - 1``). Every block is stored at the padded size
``b = ⌈n/k⌉``, a block one short having a zero last row and column, so that the ``k``
blocks of a factor are one ``(groups, k, b, b)`` tensor and decompose in one batched call.
A zero row and column change nothing that is used: ``blockdiag(F_i, 0) + λI`` is block
diagonal, so its inverse applied to a vector that is zero on the padding coordinate is
``(F_i + λI)⁻¹`` on the others and zero there, in the eigen and the Cholesky forms alike.
Vectors move between the ``n`` coordinates and the ``k·b`` padded ones with
:meth:`FactorLayout.pad` and :meth:`FactorLayout.unpad`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

_KINDS = ("full", "blocks", "diagonal")


@dataclass(frozen=True)
class FactorLayout:
    """The storage of one factor (``A`` or ``G``) of width :attr:`dim`.

    ``kind`` is ``"full"`` (``(groups, n, n)``), ``"blocks"`` (``(groups, k, b, b)``,
    see the module docstring) or ``"diagonal"`` (``(groups, n)``: only ``Σ x²`` per
    coordinate is accumulated; the inverse is elementwise)."""

    dim: int
    kind: str = "full"
    blocks: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "blocks" and not 2 <= self.blocks <= self.dim:
            raise ValueError(f"a factor of width {self.dim} cannot have {self.blocks} blocks")

    @classmethod
    def blocked(cls, dim: int, max_block: int) -> FactorLayout:
        """``dim`` split into the fewest blocks of at most ``max_block`` (full when it fits)."""
        k = math.ceil(dim / max_block)
        return cls(dim) if k <= 1 else cls(dim, "blocks", k)

    @property
    def block_size(self) -> int:
        """``b``: the (padded) size of every block; ``dim`` when not blocked."""
        return math.ceil(self.dim / self.blocks) if self.kind == "blocks" else self.dim

    @property
    def padded_dim(self) -> int:
        """``k·b``: the number of coordinates of the padded layout."""
        return self.blocks * self.block_size if self.kind == "blocks" else self.dim

    def block_sizes(self) -> list[int]:
        """The true sizes of the blocks (``[dim]`` when not blocked)."""
        if self.kind != "blocks":
            return [self.dim]
        b, k = self.block_size, self.blocks
        full = self.dim - k * (b - 1)  # the blocks of size b; the others are b - 1
        return [b] * full + [b - 1] * (k - full)

    def shape(self, groups: int) -> tuple[int, ...]:
        """The shape of the stored factor."""
        if self.kind == "diagonal":
            return (groups, self.dim)
        if self.kind == "blocks":
            return (groups, self.blocks, self.block_size, self.block_size)
        return (groups, self.dim, self.dim)

    def numel(self, groups: int) -> int:
        return math.prod(self.shape(groups))

    def describe(self) -> str:
        """``"full 785"``, ``"3 blocks of 683"``, ``"2 blocks of 393/392"`` (sizes ``b`` and
        ``b - 1``) or ``"diagonal 32000"``."""
        if self.kind == "blocks":
            sizes = sorted(set(self.block_sizes()), reverse=True)
            return f"{self.blocks} blocks of {'/'.join(map(str, sizes))}"
        return f"{self.kind} {self.dim}"

    # ---- coordinates --------------------------------------------------------------------
    @property
    def needs_padding(self) -> bool:
        return self.padded_dim != self.dim

    def _split(self) -> tuple[int, int]:
        """``(head, short)``: the first ``head`` coordinates are the blocks of size ``b``
        (the same in both layouts); the ``short`` blocks of size ``b - 1`` follow."""
        b = self.block_size
        head = (self.dim - self.blocks * (b - 1)) * b
        return head, self.blocks - head // b

    def pad(self, x: Tensor, dim: int = -1) -> Tensor:
        """``x`` with axis ``dim`` (``n`` coordinates) in the padded layout (``k·b``).

        Strided copies into one new tensor (no gather: an index_select along the last axis
        is several times slower on the CPU); only the padding positions are zeroed."""
        if not self.needs_padding:
            return x
        dim = dim % x.dim()
        (head, short), b = self._split(), self.block_size
        out = x.new_empty((*x.shape[:dim], self.padded_dim, *x.shape[dim + 1 :]))
        out.narrow(dim, 0, head).copy_(x.narrow(dim, 0, head))
        tail = out.narrow(dim, head, short * b).unflatten(dim, (short, b))
        tail.narrow(dim + 1, 0, b - 1).copy_(
            x.narrow(dim, head, short * (b - 1)).unflatten(dim, (short, b - 1))
        )
        tail.narrow(dim + 1, b - 1, 1).zero_()
        return out

    def unpad(self, x: Tensor, dim: int = -1) -> Tensor:
        """Inverse of :meth:`pad`: the ``n`` true coordinates of axis ``dim``."""
        if not self.needs_padding:
            return x
        dim = dim % x.dim()
        (head, short), b = self._split(), self.block_size
        out = x.new_empty((*x.shape[:dim], self.dim, *x.shape[dim + 1 :]))
        out.narrow(dim, 0, head).copy_(x.narrow(dim, 0, head))
        out.narrow(dim, head, short * (b - 1)).unflatten(dim, (short, b - 1)).copy_(
            x.narrow(dim, head, short * b).unflatten(dim, (short, b)).narrow(dim + 1, 0, b - 1)
        )
        return out

    def diagonal_blocks(self, full: Tensor) -> Tensor:
        """The diagonal blocks of a whole factor ``(groups, n, n)``, in the stored shape
        ``(groups, k, b, b)`` (padding coordinates zero): what :meth:`block_rows`' rows
        would accumulate."""
        padded = self.pad(self.pad(full, dim=-1), dim=-2)
        groups, k, b = full.shape[0], self.blocks, self.block_size
        return padded.view(groups, k, b, k, b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)

    def block_rows(self, rows: Tensor) -> Tensor:
        """Rows ``(groups, R, n)`` as ``(groups·k, R, b)``: each block's columns, the
        batch a blocked factor's statistics are accumulated from."""
        groups, r = rows.shape[:2]
        padded = self.pad(rows).reshape(groups, r, self.blocks, self.block_size)
        return padded.transpose(1, 2).reshape(groups * self.blocks, r, self.block_size)


def choose_layout(
    dim: int,
    groups: int,
    itemsize: int,
    *,
    max_factor_dim: int | None,
    diagonal_factor_dim: int | None,
    factor_memory: int | None,
) -> tuple[FactorLayout, bool]:
    """The layout of a factor of width ``dim`` (``groups`` of them), and whether the
    memory budget changed it.

    Above ``diagonal_factor_dim``: diagonal. Else above ``max_factor_dim``: blocks of at
    most ``max_factor_dim``. Else full. Then, if the factor would take more than
    ``factor_memory`` bytes (``itemsize`` bytes a number): blocks of the largest size that
    fits, or the diagonal when no block size of at least 2 does."""
    if diagonal_factor_dim is not None and dim > diagonal_factor_dim:
        layout = FactorLayout(dim, "diagonal")
    elif max_factor_dim is not None and dim > max_factor_dim:
        layout = FactorLayout.blocked(dim, max_factor_dim)
    else:
        layout = FactorLayout(dim)
    if factor_memory is None or layout.numel(groups) * itemsize <= factor_memory:
        return layout, False
    # k blocks of b take about groups·dim·b numbers: start there and shrink until it fits
    block = min(layout.block_size, factor_memory // max(1, groups * dim * itemsize))
    while block >= 2:
        candidate = FactorLayout.blocked(dim, block)
        if candidate.kind == "blocks" and candidate.numel(groups) * itemsize <= factor_memory:
            return candidate, True
        block -= max(1, block // 16)
    return FactorLayout(dim, "diagonal"), True

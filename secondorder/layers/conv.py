"""``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: receptive-field patches as input
rows, one row per output position (or one per example, ``conv_positions="reduce"``).

The helpers accept any stride, padding (ints, tuples, ``'same'``, ``'valid'``; every
padding mode), dilation and groups, and batched or unbatched inputs. By default
(``conv_positions="expand"``, Grosse & Martens' KFC) each output position of each example
is a row: its input row is the receptive-field patch (``in_channels/groups * k1 * ... *
kN`` values, channel-major as in the weight), its output-gradient row the gradient at that
position. Rows are ordered example first, then output positions in row-major order. A
grouped convolution is ``groups`` independent blocks.

``conv_positions="reduce"`` (K-FAC-reduce, Eschenhagen et al. 2023, for the convolution's
weight sharing over positions, as ``linear_sequence="reduce"`` for tokens): one row per
example, the *mean* of its patches (with the homogeneous 1) and the *sum* of its output
gradients over the positions. ``A`` then costs ``n · a_dim²`` multiply-adds instead of
``n · positions · a_dim²`` (1024 positions per example in a CIFAR ResNet's first stage),
and the patch means need no patch matrix: one strided sum of the padded input per kernel
offset. It is exact (``A ⊗ G`` is the example's empirical Fisher block) when every
position has the same output gradient (a global mean pool right after the layer), where
``"expand"`` is not; in general it is another approximation of the same block, with its
own scale (a mean patch varies less than a patch), so the damping that suits it may differ.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..kernels import symmetric_factor_update
from ..kernels.conv_factor import (
    CHUNK_ELEMENTS,
    conv2d_factor_update,
    conv2d_factor_update_correlation,
)
from .base import KroneckerHelper

_POSITION_MODES = ("expand", "reduce")


class _ConvNdHelper(KroneckerHelper):
    """Shared code of the convolution helpers; subclasses set
    :attr:`~secondorder.layers.base.KroneckerHelper.spatial_dims` (and
    ``unbatched_dims = spatial_dims + 1``).

    Args:
        module (nn.Conv1d | nn.Conv2d | nn.Conv3d): the layer.
        name (str): its qualified name in the model.
        include_bias (bool, optional): see :class:`~secondorder.layers.base.LayerHelper`
            (default: None).
        conv_positions (str, optional): ``"expand"`` (a row per output position) or
            ``"reduce"`` (a row per example: mean patch, summed output gradient); see the
            module docstring (default: ``"expand"``). Passed by the optimizers'
            ``layer_options``.
    """

    module: nn.Conv1d | nn.Conv2d | nn.Conv3d
    options = ("conv_positions",)

    def __init__(
        self,
        module: nn.Module,
        name: str,
        *,
        include_bias: bool | None = None,
        conv_positions: str = "expand",
    ) -> None:
        if conv_positions not in _POSITION_MODES:
            raise ValueError(
                f"conv_positions must be one of {_POSITION_MODES}, got {conv_positions!r}"
            )
        super().__init__(module, name, include_bias=include_bias)
        self.conv_positions = conv_positions

    @property
    def reduces(self) -> bool:
        """Whether the rows are per example (``conv_positions="reduce"``)."""
        return self.conv_positions == "reduce"

    @property
    def groups(self) -> int:
        return self.module.groups

    @property
    def _patch_size(self) -> int:
        m = self.module
        return m.in_channels // m.groups * math.prod(m.kernel_size)

    @property
    def a_dim(self) -> int:
        return self._patch_size + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels // self.module.groups

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (self.module.groups, self.g_dim, self._patch_size)

    def _batched(self, t: Tensor) -> Tensor:
        return t if t.dim() == self.spatial_dims + 2 else t.unsqueeze(0)

    def a_rows(self, inputs: Tensor) -> Tensor:
        if self.reduces:
            return self.append_ones(self._mean_patches(inputs))
        m = self.module
        n = self.spatial_dims
        # Pad explicitly so that string paddings ('same', possibly asymmetric) and
        # non-zero padding modes give exactly the patches the forward pass multiplied.
        x = self._padded(inputs)
        # A strided view (no copy) per spatial dimension: unfold appends the window
        # (dilated extent, sub-sampled by the dilation) after the output positions.
        for d, (k, s, dil) in enumerate(zip(m.kernel_size, m.stride, m.dilation, strict=True)):
            x = x.unfold(2 + d, dil * (k - 1) + 1, s)
            if dil > 1:
                x = x[..., ::dil]
        # x is (B, C, L1..LN, k1..kN): rows example-major, then output positions; each
        # patch channel-major, then kernel offsets, as the weight's columns
        kernel = " ".join(f"k{d}" for d in range(n))
        patches = rearrange(x, f"b (x c) ... {kernel} -> x (b ...) (c {kernel})", x=m.groups)
        return self.append_ones(patches)

    def a_factor_update(self, inputs: Tensor, a: Tensor, *, beta: float) -> None:
        """``a <- beta a + Σ_rows ã ãᵀ`` (``a`` is ``(groups, a_dim, a_dim)``) without the
        patch matrix of the whole input: Conv1d/Conv2d go through
        :func:`~secondorder.kernels.conv_factor.conv2d_factor_update` (the implicit-im2col
        Triton kernel on GPU, patches of a few examples at a time on the CPU), after
        applying non-zero padding modes and asymmetric ('same') padding to the input;
        Conv3d folds in the patches of a chunk of examples at a time."""
        if self.reduces:  # a row per example: the mean patches are small
            super().a_factor_update(inputs, a, beta=beta)
            return
        form = self._conv2d_form(inputs)
        if form is None:
            x = self._batched(inputs)
            per_example = math.prod(x.shape[2:]) * self.a_dim * self.module.groups
            step = max(1, CHUNK_ELEMENTS // max(per_example, 1))
            for start in range(0, x.shape[0], step):
                rows = self.a_rows(x[start : start + step])
                symmetric_factor_update(a, rows, beta=beta if start == 0 else 1.0)
            if x.shape[0] == 0:  # no rows: only the decay
                a.copy_(a * beta if beta else torch.zeros_like(a))
            return
        x, args = form
        conv2d_factor_update(a, x, **args, beta=beta)

    def _conv2d_form(self, inputs: Tensor) -> tuple[Tensor, dict[str, Any]] | None:
        """The input and the keywords of
        :func:`~secondorder.kernels.conv_factor.conv2d_factor_update` for this layer (a
        Conv1d as a ``1 x k`` Conv2d; non-zero or asymmetric padding applied to the input),
        or None for a Conv3d or a tied module's zero bias column (the patches' path)."""
        m = self.module
        if self.spatial_dims == 3 or self.zero_bias_column:
            return None
        pad = list(m._reversed_padding_repeated_twice)  # (last dim left, right, ...)
        if m.padding_mode == "zeros" and all(pad[i] == pad[i + 1] for i in range(0, len(pad), 2)):
            x = self._batched(inputs)
            padding = tuple(pad[::-2])  # implicit: masked loads, no padded copy
        else:
            x = self._padded(inputs)
            padding = (0,) * self.spatial_dims
        kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
        if self.spatial_dims == 1:  # a 1 x k convolution over a height of 1
            x = x.unsqueeze(2)
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
            padding = (0, *padding)
        args = {
            "kernel_size": tuple(kernel), "stride": tuple(stride), "padding": tuple(padding),
            "dilation": tuple(dilation), "groups": m.groups, "bias": self.has_bias,
        }  # fmt: skip
        return x, args

    def a_full_if_cheaper(self, inputs: Tensor, alternative: float) -> Tensor | None:
        """The whole ``Σ_rows ã ãᵀ`` ``(groups, a_dim, a_dim)`` from the channels'
        correlations (:func:`~secondorder.kernels.conv_factor.conv2d_factor_update_correlation`)
        when they apply (stride 1, dilation 1, a kernel larger than 1 x 1, a CPU tensor, rows
        per position) and their multiply-adds, about ``(2k_h − 1)(2k_w − 1) · (C/groups)² ·
        groups · B·H·W``, are fewer than ``alternative`` (a blocked factor's from the patches);
        None otherwise. A blocked ``A`` then keeps the diagonal blocks of it."""
        form = None if self.reduces or inputs.is_cuda else self._conv2d_form(inputs)
        if form is None:
            return None
        x, args = form
        (kh, kw), groups = args["kernel_size"], args["groups"]
        if args["stride"] != (1, 1) or args["dilation"] != (1, 1) or (kh, kw) == (1, 1):
            return None
        cg = x.shape[1] // groups
        cost = (2 * kh - 1) * (2 * kw - 1) * cg * cg * groups * x[:, :1].numel()
        if cost >= alternative:
            return None
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        a = x.new_zeros((groups, self.a_dim, self.a_dim), dtype=dtype)
        del args["stride"], args["dilation"]
        return conv2d_factor_update_correlation(a, x, beta=0.0, **args)

    def _padded(self, inputs: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The batched input (in ``dtype``), with the layer's padding applied."""
        m = self.module
        x = self._batched(inputs if dtype is None else inputs.to(dtype))
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        return x

    def _window_sums(self, x: Tensor, *, over_examples: bool) -> tuple[Tensor, int]:
        """For each kernel offset, the sum of the padded input ``x`` over the output
        positions (and the examples too, with ``over_examples``): ``([n,] C, offsets)``,
        channel-major then offsets as the weight's columns, and the number of output
        positions per example. One strided sum per offset: no patch matrix."""
        m = self.module
        sides = zip(x.shape[2:], m.kernel_size, m.stride, m.dilation, strict=True)
        out = [(size - dil * (k - 1) - 1) // s + 1 for size, k, s, dil in sides]
        dims = (0, *range(2, x.dim())) if over_examples else tuple(range(2, x.dim()))
        sums = []
        for offset in itertools.product(*(range(k) for k in m.kernel_size)):
            cuts = [
                slice(o * dil, o * dil + s * (n - 1) + 1, s)
                for o, s, dil, n in zip(offset, m.stride, m.dilation, out, strict=True)
            ]
            sums.append(x[(slice(None), slice(None), *cuts)].sum(dim=dims))
        return torch.stack(sums, dim=-1), math.prod(out)

    def _mean_patches(self, inputs: Tensor) -> Tensor:
        """Each example's mean receptive-field patch, ``(groups, n, a_dim - has_bias)``."""
        sums, positions = self._window_sums(self._padded(inputs), over_examples=False)
        # (n, C, offsets) -> (groups, n, C/groups * offsets)
        return rearrange(sums, "n (x c) k -> x n (c k)", x=self.groups) / positions

    def a_square_sum(self, inputs: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, int]:
        """``(Σ_rows ã², rows)`` without building the patches: for each kernel offset one
        strided sum of the squared (padded) input over the examples and output positions
        (with ``conv_positions="reduce"``, the squares of the mean patches)."""
        if self.reduces:
            return super().a_square_sum(inputs, dtype)
        x = self._padded(inputs, dtype)
        sums, positions = self._window_sums(x.square(), over_examples=True)
        # (C, offsets) -> (groups, C/groups * offsets): channel-major, as the weight
        diag = sums.reshape(self.groups, -1)
        rows = x.shape[0] * positions
        if self.has_bias:
            bias = diag.new_full((self.groups, 1), 0.0 if self.zero_bias_column else float(rows))
            diag = torch.cat([diag, bias], dim=1)
        return diag, rows

    def rows_count(self, inputs: Tensor) -> int:
        if self.reduces:
            return self.batch_size(inputs)
        return super().rows_count(inputs)

    def g_rows(self, grad_output: Tensor) -> Tensor:
        g = self._batched(grad_output)
        if self.reduces:
            return rearrange(g.flatten(2).sum(-1), "b (x o) -> x b o", x=self.groups)
        return rearrange(g, "b (x o) ... -> x (b ...) o", x=self.groups)


class Conv1dHelper(_ConvNdHelper):
    """Helper for :class:`torch.nn.Conv1d` (rows as in the module docstring)."""

    module: nn.Conv1d
    spatial_dims = 1
    unbatched_dims = 2


class Conv2dHelper(_ConvNdHelper):
    """Helper for :class:`torch.nn.Conv2d` (rows as in the module docstring)."""

    module: nn.Conv2d
    spatial_dims = 2
    unbatched_dims = 3


class Conv3dHelper(_ConvNdHelper):
    """Helper for :class:`torch.nn.Conv3d` (rows as in the module docstring)."""

    module: nn.Conv3d
    spatial_dims = 3
    unbatched_dims = 4

"""``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: receptive-field patches as input
rows, one row per output position.

The helpers accept any stride, padding (ints, tuples, ``'same'``, ``'valid'``; every
padding mode), dilation and groups, and batched or unbatched inputs. Each output
position of each example is a row: its input row is the receptive-field patch
(``in_channels/groups * k1 * ... * kN`` values, channel-major as in the weight), its
output-gradient row the gradient at that position. Rows are ordered example first,
then output positions in row-major order. A grouped convolution is ``groups``
independent blocks.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerHelper


class _ConvNdHelper(LayerHelper):
    """Shared code of the convolution helpers; subclasses set :attr:`spatial_dims`
    (and ``unbatched_dims = spatial_dims + 1``)."""

    module: nn.Conv1d | nn.Conv2d | nn.Conv3d
    #: number of spatial dimensions of the convolution
    spatial_dims: ClassVar[int]

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
        m = self.module
        n = self.spatial_dims
        x = self._batched(inputs)
        # Pad explicitly so that string paddings ('same', possibly asymmetric) and
        # non-zero padding modes give exactly the patches the forward pass multiplied.
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        # A strided view (no copy) per spatial dimension: unfold appends the window
        # (dilated extent, sub-sampled by the dilation) after the output positions.
        for d, (k, s, dil) in enumerate(zip(m.kernel_size, m.stride, m.dilation, strict=True)):
            x = x.unfold(2 + d, dil * (k - 1) + 1, s)
            if dil > 1:
                x = x[..., ::dil]
        # (B, C, L1..LN, k1..kN) -> (B, L1..LN, C, k1..kN): the weight's column order
        x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
        b = x.shape[0]
        length = math.prod(x.shape[1 : 1 + n])
        patches = x.reshape(b * length, m.groups, self._patch_size)
        return self.append_ones(patches.transpose(0, 1))

    def g_rows(self, grad_output: Tensor) -> Tensor:
        g = self._batched(grad_output)
        b, c = g.shape[:2]
        g = g.reshape(b, c, -1).transpose(1, 2).reshape(-1, self.groups, self.g_dim)
        return g.transpose(0, 1)


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

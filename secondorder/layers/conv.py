"""``nn.Conv2d``: im2col patches as input rows, one row per output position."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerHelper


class Conv2dHelper(LayerHelper):
    """Helper for :class:`torch.nn.Conv2d` with any stride, padding (and padding
    mode), dilation and groups.

    Each output position of each example is a row: its input row is the receptive
    field patch (``in_channels/groups * kh * kw`` values, channel-major as in the
    weight), its output-gradient row the gradient at that position. A grouped
    convolution is ``groups`` independent blocks.
    """

    module: nn.Conv2d
    unbatched_dims = 3

    @property
    def groups(self) -> int:
        return self.module.groups

    @property
    def a_dim(self) -> int:
        m = self.module
        kh, kw = m.kernel_size
        return m.in_channels // m.groups * kh * kw + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_channels // self.module.groups

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        m = self.module
        kh, kw = m.kernel_size
        return (m.groups, self.g_dim, m.in_channels // m.groups * kh * kw)

    def a_rows(self, inputs: Tensor) -> Tensor:
        m = self.module
        x = inputs if inputs.dim() == 4 else inputs.unsqueeze(0)
        # Pad explicitly so that string paddings ('same') and non-zero padding modes
        # give exactly the patches the forward pass multiplied.
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, stride=m.stride)
        # (B, C*kh*kw, L) -> (groups, B*L, C/groups*kh*kw)
        b, cols, length = patches.shape
        patches = patches.transpose(1, 2).reshape(b * length, m.groups, cols // m.groups)
        return self.append_ones(patches.transpose(0, 1))

    def g_rows(self, grad_output: Tensor) -> Tensor:
        g = grad_output if grad_output.dim() == 4 else grad_output.unsqueeze(0)
        b, c = g.shape[:2]
        g = g.reshape(b, c, -1).transpose(1, 2).reshape(-1, self.groups, self.g_dim)
        return g.transpose(0, 1)

"""``nn.Linear``: inputs of any rank, every leading position is one row."""

from __future__ import annotations

from torch import Tensor, nn

from .base import LayerHelper


class LinearHelper(LayerHelper):
    """Helper for :class:`torch.nn.Linear` (and subclasses that call its forward).

    Inputs of shape ``(..., in_features)`` are flattened to rows: a token of a
    sequence counts as a row like an example does. The batch size (for the
    scaling of the output-gradient factor) is the leading dimension.
    """

    module: nn.Linear
    unbatched_dims = 1

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_features

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (1, self.module.out_features, self.module.in_features)

    def a_rows(self, inputs: Tensor) -> Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1])
        return self.append_ones(rows).unsqueeze(0)

    def g_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1]).unsqueeze(0)

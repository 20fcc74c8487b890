"""``nn.Linear``: inputs of any rank; sequences expanded into rows or reduced per example."""

from __future__ import annotations

from torch import Tensor, nn

from .base import KroneckerHelper

_SEQUENCE_MODES = ("expand", "reduce")


class LinearHelper(KroneckerHelper):
    """Helper for :class:`torch.nn.Linear` (and subclasses that call its forward).

    Inputs ``(batch, in_features)`` give one row per example. For inputs with
    positions between the batch and the features, ``(batch, ..., in_features)`` (the
    tokens of a sequence, say), ``linear_sequence`` picks how the positions enter the
    factors (Eschenhagen et al., 2023, "Kronecker-Factored Approximate Curvature for
    Modern Neural Network Architectures", https://arxiv.org/abs/2311.00636):

    * ``"expand"``: every position is a row, as if it were an example of its own
      (``A`` averages ``ã ãᵀ`` over all positions, ``G`` sums ``g gᵀ`` over them).
      This is the setting of a loss with one term per position (language modelling),
      and it is exact, like plain K-FAC, when every example has a single position;
      with several, it ignores the correlation between the positions of one example.
    * ``"reduce"``: one row per example: ``ã`` is the *mean* over the positions of
      ``[a, 1]`` and ``g`` the *sum* over the positions of the output gradients. This
      is the setting of positions pooled before the loss (a classifier on averaged
      tokens). With one example it is exact — ``A ⊗ G`` is the example's empirical
      Fisher block — whenever every position has the same output gradient (a mean
      over positions right after the layer), since the gradient
      ``Σ_r g_r ã_rᵀ`` is then ``(Σ_r g_r)(mean_r ã_r)ᵀ``; ``"expand"`` is not
      (unless the positions' inputs are equal too). It also costs one row per
      example instead of one per position.

    Inputs of rank 2 or less have no positions, and both choices give the same rows.
    The batch size (for the scaling of the output-gradient factor) is the leading
    dimension.

    Args:
        module (nn.Linear): the layer.
        name (str): its qualified name in the model.
        include_bias (bool, optional): see :class:`~secondorder.layers.base.LayerHelper`
            (default: None).
        linear_sequence (str, optional): ``"expand"`` or ``"reduce"`` (default:
            ``"expand"``); passed by the optimizers' ``layer_options``.
    """

    module: nn.Linear
    unbatched_dims = 1
    options = ("linear_sequence",)

    def __init__(
        self,
        module: nn.Module,
        name: str,
        *,
        include_bias: bool | None = None,
        linear_sequence: str = "expand",
    ) -> None:
        if linear_sequence not in _SEQUENCE_MODES:
            raise ValueError(
                f"linear_sequence must be one of {_SEQUENCE_MODES}, got {linear_sequence!r}"
            )
        super().__init__(module, name, include_bias=include_bias)
        self.linear_sequence = linear_sequence

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.out_features

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (1, self.module.out_features, self.module.in_features)

    def _reduces(self, t: Tensor) -> bool:
        return self.linear_sequence == "reduce" and t.dim() >= 3

    def a_rows(self, inputs: Tensor) -> Tensor:
        if self._reduces(inputs):
            # the mean of [a, 1] over positions is [mean a, 1]
            rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).mean(dim=1)
        else:
            rows = inputs.reshape(-1, inputs.shape[-1])
        return self.append_ones(rows).unsqueeze(0)

    def g_rows(self, grad_output: Tensor) -> Tensor:
        if self._reduces(grad_output):
            rows = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1]).sum(dim=1)
        else:
            rows = grad_output.reshape(-1, grad_output.shape[-1])
        return rows.unsqueeze(0)

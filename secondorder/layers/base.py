"""The one place that knows module types: a helper per layer family.

A :class:`LayerHelper` turns what a module saw in one forward/backward pass into
matrices the estimators understand, and reads and writes the module's gradient as
a matrix. Estimators never call ``isinstance(module, ...)``; they only use helpers.

Conventions shared by every helper (and relied on by every estimator):

* A layer's weight (and bias) is viewed as ``groups`` independent blocks, each a
  matrix of shape ``(g_dim, a_dim)``; ``groups`` is 1 except for grouped convolutions.
* ``a_dim`` counts the homogeneous bias column: when the layer has a trainable bias,
  the input rows get a trailing column of ones and the bias is the last column of
  the gradient matrix.
* Input rows ``a_rows`` and output-gradient rows ``g_rows`` have shape
  ``(groups, rows, dim)``; every position of every example (a token, a spatial
  location) is one row, rows of one example contiguous (example-major), so that
  ``rows.view(groups, n, rows_per_example, dim)`` splits them by example.

Two kinds of helper (:attr:`LayerHelper.kind`):

* ``"kronecker"`` (Linear, convolutions, Embedding): the Fisher block is approximated
  by ``A ⊗ G`` built from ``a_rows`` / ``g_rows``. A helper with ``a_diagonal = True``
  (Embedding: one-hot inputs) has a diagonal ``A``; it provides :meth:`a_diag_sum`
  (the row sum of ``ã²``, i.e. token counts) instead of ``a_rows``, and ``a_rows``
  raises. Estimators represent its ``A`` by that diagonal, its eigenbasis by the
  identity.
* ``"blocks"`` (BatchNorm, LayerNorm): ``C`` small independent blocks of ``k``
  parameters (a channel's scale and shift); the helper provides per-example
  gradients ``(n, C, k)`` and the estimator keeps the exact empirical Fisher of each
  block (``k x k``, or its diagonal).

Helpers may accept keyword options (:attr:`LayerHelper.options` names them), passed
by the optimizers as ``layer_options={"name": value}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn


class LayerHelper(ABC):
    """Adapter between one module and the curvature estimators.

    Args:
        module (nn.Module): the layer.
        name (str): its qualified name in the model (``model.named_modules()``).
        include_bias (bool, optional): fold the bias in as the homogeneous column;
            None means "if the module has a bias that requires grad" (default: None).
    """

    #: ``"kronecker"`` or ``"blocks"`` (see the module docstring)
    kind: ClassVar[str] = "kronecker"
    #: Kronecker helpers whose ``A`` is diagonal provide :meth:`a_diag_sum`, not ``a_rows``
    a_diagonal: ClassVar[bool] = False
    #: keyword options this helper accepts (``layer_options`` of the optimizers)
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, module: nn.Module, name: str, *, include_bias: bool | None = None) -> None:
        self.module = module
        self.name = name
        #: other modules sharing this weight (tied weights); set by ``find_layers``
        self.tied: list[LayerHelper] = []
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"layer {name!r} has no weight parameter")
        self.weight: nn.Parameter = weight
        bias = getattr(module, "bias", None)
        has_bias = isinstance(bias, nn.Parameter) and bias.requires_grad
        if include_bias and not has_bias:
            raise ValueError(f"layer {name!r} has no trainable bias to include")
        self.bias: nn.Parameter | None = bias if has_bias and include_bias is not False else None

    # ---- shape of the blocks -------------------------------------------------------
    @property
    def has_bias(self) -> bool:
        """Whether the input rows have a last (homogeneous) column: the bias folded in,
        or a zero column for a tied module whose own bias is not the tied one."""
        return self.bias is not None or self.zero_bias_column

    #: set by ``find_layers`` on a tied module whose weight's primary layer has a bias
    #: that this module does not use: its rows get a 0 (not a 1) in the bias column, so
    #: they add nothing to the bias statistics
    zero_bias_column: bool = False

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this helper covers: weight, then bias if trainable."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def groups(self) -> int:
        """Number of independent blocks (1 unless a grouped convolution)."""
        return 1

    @property
    @abstractmethod
    def a_dim(self) -> int:
        """Input dimension of one block, the homogeneous column included."""

    @property
    @abstractmethod
    def g_dim(self) -> int:
        """Output dimension of one block."""

    # ---- statistics --------------------------------------------------------------------
    @abstractmethod
    def a_rows(self, inputs: Tensor) -> Tensor:
        """Input rows ``(groups, rows, a_dim)`` (ones column last when biased)."""

    @abstractmethod
    def g_rows(self, grad_output: Tensor) -> Tensor:
        """Output-gradient rows ``(groups, rows, g_dim)``, in the order of :meth:`a_rows`."""

    def a_diag_sum(self, inputs: Tensor) -> Tensor:
        """For ``a_diagonal`` helpers: ``Σ_rows ã²`` per block, ``(groups, a_dim)``."""
        raise NotImplementedError(f"{type(self).__name__} has a full A: use a_rows")

    def rows_count(self, inputs: Tensor) -> int:
        """Number of rows ``a_rows(inputs)`` (or ``a_diag_sum``) covers."""
        return int(self.a_rows(inputs).shape[1])

    def batch_size(self, inputs: Tensor) -> int:
        """Number of examples in ``inputs`` (its leading dimension)."""
        return int(inputs.shape[0]) if inputs.dim() > self.unbatched_dims else 1

    #: number of dimensions of one unbatched example (1 for Linear, 3 for Conv2d)
    unbatched_dims: int = 1

    def append_ones(self, rows: Tensor) -> Tensor:
        """Append the homogeneous column when the layer has a bias."""
        if not self.has_bias:
            return rows
        if self.zero_bias_column:
            return torch.cat([rows, rows.new_zeros((*rows.shape[:-1], 1))], dim=-1)
        ones = rows.new_ones((*rows.shape[:-1], 1))
        return torch.cat([rows, ones], dim=-1)

    # ---- gradients as matrices -----------------------------------------------------
    @abstractmethod
    def weight_matrix_shape(self) -> tuple[int, int, int]:
        """``(groups, g_dim, a_dim - has_bias)``: how the weight is viewed."""

    def grad_matrix(self, grads: Mapping[Tensor, Tensor]) -> Tensor:
        """The gradient as blocks ``(groups, g_dim, a_dim)``, bias as the last column.

        ``grads`` maps each of :attr:`params` to its gradient (a missing bias
        gradient counts as zero).
        """
        w = grads[self.weight].reshape(self.weight_matrix_shape())
        if self.bias is None:
            return w
        b = grads.get(self.bias)
        b = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device) if b is None else b
        return torch.cat([w, b.reshape(*w.shape[:-1], 1)], dim=-1)

    def split_matrix(self, matrix: Tensor) -> dict[nn.Parameter, Tensor]:
        """Inverse of :meth:`grad_matrix`: blocks back to per-parameter tensors."""
        if self.bias is None:
            return {self.weight: matrix.reshape(self.weight.shape)}
        return {
            self.weight: matrix[..., :-1].reshape(self.weight.shape),
            self.bias: matrix[..., -1].reshape(self.bias.shape),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, groups={self.groups}, "
            f"a_dim={self.a_dim}, g_dim={self.g_dim})"
        )

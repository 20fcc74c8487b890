"""The one place that knows module types: a helper per layer family.

A helper turns what a module saw in one forward/backward pass into what the
estimators understand, and reads and writes the module's gradient in that shape.
Estimators never call ``isinstance(module, ...)``; they only use helpers. Every
helper is one of two families, each an abstract class with its own contract, and
an estimator tells them apart with ``isinstance`` on these classes:

* :class:`KroneckerHelper` (Linear, convolutions, Embedding): the Fisher block is
  approximated by ``A ⊗ G`` built from input rows ``ã`` and output-gradient rows
  ``g``. A helper with :attr:`~KroneckerHelper.a_diagonal` (Embedding: one-hot
  inputs) has a diagonal ``A``; estimators represent it by that diagonal and its
  eigenbasis by the identity.
* :class:`BlockHelper` (BatchNorm, LayerNorm, GroupNorm): ``C`` small independent
  blocks of ``k`` parameters (a channel's scale and shift); the helper provides
  per-example gradients ``(n, C, k)`` and the estimator keeps the exact empirical
  Fisher of each block (``k x k``, or its diagonal).

Conventions of the Kronecker family (relied on by every estimator):

* A layer's weight (and bias) is viewed as ``groups`` independent blocks, each a
  matrix of shape ``(g_dim, a_dim)``; ``groups`` is 1 except for grouped convolutions.
* ``a_dim`` counts the homogeneous bias column: when the layer has a trainable bias,
  the input rows get a trailing column of ones and the bias is the last column of
  the gradient matrix.
* Input rows ``a_rows`` and output-gradient rows ``g_rows`` have shape
  ``(groups, rows, dim)``; every position of every example (a token, a spatial
  location) is one row, rows of one example contiguous (example-major), so that
  ``rearrange(rows, "x (n l) d -> x n l d", n=n)`` splits them by example.

Helpers may accept keyword options (:attr:`LayerHelper.options` names them), passed
by the optimizers as ``layer_options={"name": value}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..kernels import symmetric_factor_update


class LayerHelper(ABC):
    """What every helper has: the module, its name and the parameters it covers.

    Subclass :class:`KroneckerHelper` or :class:`BlockHelper`, not this class.

    Args:
        module (nn.Module): the layer.
        name (str): its qualified name in the model (``model.named_modules()``).
        include_bias (bool, optional): cover the bias too; None means "if the module
            has a bias that requires grad" (default: None).
    """

    #: keyword options this helper accepts (``layer_options`` of the optimizers)
    options: ClassVar[tuple[str, ...]] = ()
    #: number of dimensions of one unbatched example (1 for Linear, 3 for Conv2d)
    unbatched_dims: int = 1
    #: set by ``find_layers`` on a tied module whose weight's primary layer has a bias
    #: that this module does not use: its rows get a 0 (not a 1) in the bias column, so
    #: they add nothing to the bias statistics
    zero_bias_column: bool = False
    #: the statistics of some of a pass's examples are a function of those examples'
    #: inputs and output gradients alone, so the capture may keep a random subset of them
    #: (``statistics_rows``); False where the layer couples the examples of a batch
    separable_examples: ClassVar[bool] = True

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

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why this helper cannot read ``module`` although it is registered for its type
        (a configuration it does not model), or None when it can (the default)."""
        return None

    @property
    @abstractmethod
    def kind(self) -> str:
        """``"kronecker"`` or ``"blocks"``: the family's name, for messages and reports.
        Code that depends on the family tests ``isinstance`` with
        :class:`KroneckerHelper` / :class:`BlockHelper` instead."""

    @property
    def has_bias(self) -> bool:
        """Whether the statistics have a bias entry: the bias covered, or (Kronecker
        helpers) a zero column for a tied module whose own bias is not the tied one."""
        return self.bias is not None or self.zero_bias_column

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this helper covers: weight, then bias if trainable."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def batch_size(self, inputs: Tensor) -> int:
        """Number of examples in ``inputs`` (its leading dimension)."""
        return int(inputs.shape[0]) if inputs.dim() > self.unbatched_dims else 1


class KroneckerHelper(LayerHelper):
    """A layer whose Fisher block is approximated by ``A ⊗ G`` (module docstring).

    Subclasses provide :attr:`a_dim`, :attr:`g_dim`, :meth:`a_rows` (or, with
    :attr:`a_diagonal`, :meth:`a_diag_sum`), :meth:`g_rows` and
    :meth:`weight_matrix_shape`; the other methods have defaults built on those, which
    a subclass may override with something cheaper.
    """

    #: ``A`` is diagonal (one-hot inputs): the helper provides :meth:`a_diag_sum`, and
    #: :meth:`a_rows` (one column per possible input) is never built
    a_diagonal: ClassVar[bool] = False
    #: number of spatial dimensions whose positions are rows (2 for Conv2d, 0 when the
    #: rows of an example have no grid)
    spatial_dims: ClassVar[int] = 0

    @property
    def kind(self) -> str:
        return "kronecker"

    # ---- shape of the blocks -------------------------------------------------------
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
        """For :attr:`a_diagonal` helpers: ``Σ_rows ã²`` per block, ``(groups, a_dim)``."""
        raise NotImplementedError(f"{type(self).__name__} has a full A: use a_rows")

    def a_factor_update(self, inputs: Tensor, a: Tensor, *, beta: float) -> None:
        """``a <- beta a + Σ_rows ã ãᵀ``, ``a`` of shape ``(groups, a_dim, a_dim)``
        (``(groups, a_dim)``, the diagonal, for :attr:`a_diagonal` helpers); with
        ``beta = 0`` the contents of ``a`` are ignored. The default builds
        :meth:`a_rows`; convolutions override it to skip the patch matrix, diagonal
        helpers to add :meth:`a_diag_sum`."""
        symmetric_factor_update(a, self.a_rows(inputs), beta=beta, alpha=1.0)

    def a_full_if_cheaper(self, inputs: Tensor, alternative: float) -> Tensor | None:
        """The whole ``Σ_rows ã ãᵀ`` ``(groups, a_dim, a_dim)`` when the helper has a way to
        compute it in fewer multiply-adds than ``alternative`` (what the diagonal blocks of
        a blocked ``A`` would cost from the rows), else None (the default: build the rows).
        Convolutions override it (their channels' correlations)."""
        return None

    def a_square_sum(self, inputs: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, int]:
        """``(Σ_rows ã², rows)``: the diagonal of ``A``'s sum, ``(groups, a_dim)``, in
        ``dtype`` (default: the rows' own), and the number of rows. The default squares
        :meth:`a_rows`; convolutions override it to skip the patch matrix, diagonal
        helpers to return :meth:`a_diag_sum` (one-hot rows: ``ã² = ã``)."""
        a = self.a_rows(inputs)
        return (a if dtype is None else a.to(dtype)).square().sum(1), int(a.shape[1])

    def rows_count(self, inputs: Tensor) -> int:
        """Number of rows ``a_rows(inputs)`` (or ``a_diag_sum``) covers."""
        return int(self.a_rows(inputs).shape[1])

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


class BlockHelper(LayerHelper):
    """A layer whose parameters form ``C`` small independent blocks of ``k`` entries,
    each with its exact empirical Fisher (module docstring).

    Subclasses provide :attr:`block_count`, :attr:`block_size`, :attr:`block_mode` and
    :meth:`per_example_grads`, :meth:`grad_blocks` and :meth:`split_blocks`.
    """

    #: ``"full"`` (each block's ``k x k`` Fisher) or ``"diagonal"`` (its diagonal)
    block_mode: str = "full"

    @property
    def kind(self) -> str:
        return "blocks"

    @property
    @abstractmethod
    def block_count(self) -> int:
        """``C``: the number of blocks."""

    @property
    @abstractmethod
    def block_size(self) -> int:
        """``k``: the number of parameters in one block."""

    @abstractmethod
    def per_example_grads(self, inputs: Tensor, grad_output: Tensor) -> Tensor:
        """Each example's contribution to the gradient, ``(n, C, k)``."""

    @abstractmethod
    def grad_blocks(self, grads: Mapping[Tensor, Tensor]) -> Tensor:
        """The gradient as ``(C, k)`` (``grads`` maps each of :attr:`params` to its
        gradient; a missing bias gradient counts as zero)."""

    @abstractmethod
    def split_blocks(self, blocks: Tensor) -> dict[nn.Parameter, Tensor]:
        """Inverse of :meth:`grad_blocks`: ``(C, k)`` back to per-parameter tensors."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, blocks={self.block_count}x{self.block_size}, "
            f"mode={self.block_mode!r})"
        )

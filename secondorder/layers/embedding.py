"""``nn.Embedding``: one-hot inputs, so the input factor ``A`` is diagonal (token counts)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .base import KroneckerHelper


class EmbeddingHelper(KroneckerHelper):
    """Helper for :class:`torch.nn.Embedding`.

    The lookup ``out = W[token]`` is a linear layer applied to the one-hot vector of
    the token, with ``W`` (``num_embeddings x embedding_dim``) as the transposed
    weight matrix: the block is viewed as ``(g_dim, a_dim) = (embedding_dim,
    num_embeddings)``. Every token of every example is a row. Because the input rows
    are one-hot, ``A = mean ã ãᵀ`` is diagonal, the fraction of rows holding each
    token: :meth:`a_diag_sum` returns the counts, and ``a_rows`` (which would be
    ``rows x num_embeddings``) is never built. ``G`` is the usual output-gradient
    factor over ``embedding_dim``.

    Tokens equal to ``padding_idx`` get no gradient and are not counted in ``A``;
    their (zero-weight) rows still enter ``G``'s row sum, which only matters if the
    padding position receives an output gradient. Sparse gradients (``sparse=True``)
    are densified. There is no bias.
    """

    module: nn.Embedding
    a_diagonal = True
    #: an example's tokens form an index tensor of any rank; the batch is its first dim
    unbatched_dims = 0

    def __init__(self, module: nn.Module, name: str, *, include_bias: bool | None = None) -> None:
        super().__init__(module, name, include_bias=False if include_bias is None else include_bias)

    @property
    def a_dim(self) -> int:
        return self.module.num_embeddings

    @property
    def g_dim(self) -> int:
        return self.module.embedding_dim

    def weight_matrix_shape(self) -> tuple[int, int, int]:
        return (1, self.g_dim, self.a_dim)

    def a_rows(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError(
            "Embedding inputs are one-hot rows of num_embeddings columns: use a_diag_sum"
        )

    def a_diag_sum(self, inputs: Tensor) -> Tensor:
        ids = inputs.reshape(-1)
        if self.module.padding_idx is not None:
            ids = ids[ids != self.module.padding_idx]
        counts = torch.bincount(ids, minlength=self.a_dim)
        return counts.unsqueeze(0)

    def a_factor_update(self, inputs: Tensor, a: Tensor, *, beta: float) -> None:
        counts = self.a_diag_sum(inputs).to(a.dtype)
        a.copy_(counts if beta == 0.0 else torch.add(counts, a, alpha=beta))

    def a_square_sum(self, inputs: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, int]:
        counts = self.a_diag_sum(inputs)  # one-hot rows: ã² = ã
        return (counts if dtype is None else counts.to(dtype)), self.rows_count(inputs)

    def rows_count(self, inputs: Tensor) -> int:
        return int(inputs.numel())

    def g_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, self.g_dim).unsqueeze(0)

    def grad_matrix(self, grads: Mapping[Tensor, Tensor]) -> Tensor:
        grad = grads[self.weight]
        if grad.is_sparse:
            grad = grad.to_dense()
        return grad.t().unsqueeze(0)

    def split_matrix(self, matrix: Tensor) -> dict[nn.Parameter, Tensor]:
        return {self.weight: matrix[0].t().contiguous()}

"""Normalisation layers (BatchNorm, BatchNorm + activation, LayerNorm, channels-first
LayerNorm, GroupNorm): small per-channel blocks.

The affine parameters of a normalisation layer act element-wise:
``y = x̂ ⊙ γ + β``. The gradient of channel ``c`` is ``Σ_positions g ⊙ x̂`` for the
scale and ``Σ_positions g`` for the shift, so the Fisher does not factor into
Kronecker products; instead each channel's ``(γ_c, β_c)`` pair is one block of
``k = 2`` parameters (``k = 1`` without a bias) whose exact empirical Fisher the
estimators keep, in full (``k x k``) or as its diagonal (``layer_options
{"norm_blocks": "diagonal"}``).

Per-example gradients are the contribution of each example to the batch gradient
(for BatchNorm in training mode the batch statistics couple the examples, and
these contributions are what the gradient is a sum of).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlockHelper

_BLOCK_MODES = ("full", "diagonal")


class NormHelper(BlockHelper):
    """Base of the normalisation helpers: one block per affine channel (``C`` blocks
    of ``k`` = scale, then shift). Subclasses say how the forward pass normalised
    (:meth:`normalized`) and how to sum over everything but examples and channels.

    Args:
        norm_blocks (str, optional): ``"full"`` (each channel's ``k x k`` Fisher) or
            ``"diagonal"`` (its diagonal) (default: ``"full"``).
    """

    options: ClassVar[tuple[str, ...]] = ("norm_blocks",)

    def __init__(
        self,
        module: nn.Module,
        name: str,
        *,
        include_bias: bool | None = None,
        norm_blocks: str = "full",
    ) -> None:
        super().__init__(module, name, include_bias=include_bias)
        if norm_blocks not in _BLOCK_MODES:
            raise ValueError(f"norm_blocks must be one of {_BLOCK_MODES}, got {norm_blocks!r}")
        self.block_mode = norm_blocks

    # ---- blocks --------------------------------------------------------------------
    @property
    def block_count(self) -> int:
        """The number of affine channels."""
        return self.weight.numel()

    @property
    def block_size(self) -> int:
        return 1 + int(self.has_bias)

    @abstractmethod
    def normalized(self, inputs: Tensor) -> Tensor:
        """``x̂``: the input normalised as the forward pass did, without the affine map."""

    @abstractmethod
    def _channel_sums(self, t: Tensor) -> Tensor:
        """Sum ``t`` (shaped like the input) over everything but examples and channels:
        ``(n, C)``."""

    def per_example_grads(self, inputs: Tensor, grad_output: Tensor) -> Tensor:
        x_hat = self.normalized(inputs)
        g = grad_output.to(x_hat.dtype)
        parts = [self._channel_sums(g * x_hat)]
        if self.has_bias:
            parts.append(self._channel_sums(g))
        return torch.stack(parts, dim=-1)

    def grad_blocks(self, grads: Mapping[Tensor, Tensor]) -> Tensor:
        w = grads[self.weight].reshape(-1)
        if self.bias is None:
            return w.unsqueeze(-1)
        b = grads.get(self.bias)
        b = torch.zeros_like(w) if b is None else b.reshape(-1)
        return torch.stack([w, b], dim=-1)

    def split_blocks(self, blocks: Tensor) -> dict[nn.Parameter, Tensor]:
        out = {self.weight: blocks[:, 0].reshape(self.weight.shape)}
        if self.bias is not None:
            out[self.bias] = blocks[:, 1].reshape(self.bias.shape)
        return out


class BatchNormHelper(NormHelper):
    """Helper for :class:`torch.nn.BatchNorm1d/2d/3d` with ``affine=True``.

    ``x̂`` uses the batch statistics when the module normalised with them (training
    mode, or no running statistics) and the running statistics otherwise, as the
    forward pass did. Input ``(n, C, *spatial)`` (or ``(n, C)``); channels are blocks.
    """

    module: nn.modules.batchnorm._BatchNorm
    unbatched_dims = 0  # BatchNorm always has a batch dimension
    #: in training mode x̂ uses the batch's statistics: a subset's would differ
    separable_examples = False

    def normalized(self, inputs: Tensor) -> Tensor:
        m = self.module
        batch_stats = m.training or m.running_mean is None or m.running_var is None
        x = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
        return F.batch_norm(
            x,
            None if batch_stats else m.running_mean,
            None if batch_stats else m.running_var,
            training=batch_stats,
            eps=m.eps,
        )

    def _channel_sums(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


class BatchNormActHelper(BatchNormHelper):
    """Helper for timm's ``BatchNormAct2d``: batch norm, then its ``drop`` and ``act``
    submodules inside the same ``forward``, so the output gradient the hooks see is the
    activation's, not the norm's.

    The norm's output gradient is recovered exactly by back-propagating the hooked one
    through ``act`` at the recomputed pre-activation ``x̂ ⊙ γ + β`` (an element-wise
    function: its derivative there is all that is needed). A module whose ``drop`` is not
    ``nn.Identity`` (random in training) is not covered.
    """

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        drop, act = getattr(module, "drop", None), getattr(module, "act", None)
        if not isinstance(act, nn.Module) or not isinstance(drop, nn.Identity):
            return (
                f"{type(module).__name__} with drop={type(drop).__name__}: a random layer "
                "between the norm and the activation; the norm's output gradient cannot be "
                "recovered from the module's"
            )
        return None

    def per_example_grads(self, inputs: Tensor, grad_output: Tensor) -> Tensor:
        act = self.module.act
        if not isinstance(act, nn.Identity):
            grad_output = self._pre_activation_grad(act, inputs, grad_output)
        return super().per_example_grads(inputs, grad_output)

    def _pre_activation_grad(self, act: nn.Module, inputs: Tensor, grad_output: Tensor) -> Tensor:
        m = self.module
        x_hat = self.normalized(inputs).detach()
        shape = (1, -1) + (1,) * (x_hat.dim() - 2)
        pre = x_hat * m.weight.detach().to(x_hat.dtype).reshape(shape)
        if m.bias is not None:
            pre = pre + m.bias.detach().to(x_hat.dtype).reshape(shape)
        pre.requires_grad_(True)
        with torch.enable_grad():
            out = act(pre.clone())  # the clone takes in-place activations
        (grad,) = torch.autograd.grad(out, pre, grad_output.to(out.dtype))
        return grad


class LayerNormHelper(NormHelper):
    """Helper for :class:`torch.nn.LayerNorm` with ``elementwise_affine=True``.

    Every element of ``normalized_shape`` is a block; the leading input dimension is the
    batch and the dimensions between it and ``normalized_shape`` (tokens) are summed
    over. An input with no dimension beyond ``normalized_shape`` is one example.
    """

    module: nn.LayerNorm

    @property
    def unbatched_dims(self) -> int:  # type: ignore[override]
        return len(self.module.normalized_shape)

    def normalized(self, inputs: Tensor) -> Tensor:
        m = self.module
        x = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def _channel_sums(self, t: Tensor) -> Tensor:
        k = len(self.module.normalized_shape)
        if t.dim() == k:
            t = t.unsqueeze(0)
        n = t.shape[0]
        return t.reshape(n, -1, self.block_count).sum(1)


class GroupNormHelper(NormHelper):
    """Helper for :class:`torch.nn.GroupNorm` with ``affine=True``: input
    ``(n, C, *spatial)``, one block per channel."""

    module: nn.GroupNorm
    unbatched_dims = 0

    def normalized(self, inputs: Tensor) -> Tensor:
        m = self.module
        x = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
        return F.group_norm(x, m.num_groups, None, None, m.eps)

    def _channel_sums(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


class ChannelsFirstLayerNormHelper(NormHelper):
    """Helper for a layer norm over the channels of a channels-first input
    ``(n, C, *spatial)``: an :class:`torch.nn.LayerNorm` of ``normalized_shape = (C,)``
    applied at every position to the vector along dimension 1 (timm's ``LayerNorm2d``,
    ConvNeXt's norm: it permutes to channels-last, normalises and permutes back).

    One block per channel; the positions are summed over, as for
    :class:`LayerNormHelper`'s tokens. The input always has a batch dimension.
    """

    module: nn.LayerNorm
    unbatched_dims = 0

    def __init__(
        self,
        module: nn.Module,
        name: str,
        *,
        include_bias: bool | None = None,
        norm_blocks: str = "full",
    ) -> None:
        super().__init__(module, name, include_bias=include_bias, norm_blocks=norm_blocks)
        shape = tuple(getattr(module, "normalized_shape", ()))
        if len(shape) != 1:
            raise TypeError(
                f"layer {name!r}: a channels-first layer norm normalises one dimension, the "
                f"channels; got normalized_shape={shape}"
            )

    def normalized(self, inputs: Tensor) -> Tensor:
        m = self.module
        x = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
        return F.layer_norm(x.movedim(1, -1), m.normalized_shape, None, None, m.eps).movedim(-1, 1)

    def _channel_sums(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)

"""Subclasses of supported modules: the channels-first layer norm (timm's ``LayerNorm2d``)
against a float64 dense reference, and the rule that a subclass with a ``forward`` of its
own is covered only by a helper of its own, otherwise left to the base update with the
reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, LayerNorm2d
from torch import nn

from secondorder import KFAC, AdaFisher
from secondorder.layers import (
    BatchNormActHelper,
    ChannelsFirstLayerNormHelper,
    LayerNormHelper,
    LinearHelper,
    helper_class_for,
    register_layer_helper,
    resolve_helper,
)

from ..helpers import assert_close, exact_kfac


class _Probe(nn.Module):
    """A channels-first layer norm, a frozen 1x1 conv and a spatial mean: every example
    and position gets a different output gradient."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(channels)
        self.mix = nn.Conv2d(channels, 3, 1).requires_grad_(False)

    def forward(self, x):
        return self.mix(self.norm(x).tanh()).mean((2, 3))


@pytest.mark.parametrize(
    ("batch", "channels", "size", "damping", "mode", "seed"),
    [
        (1, 4, 3, 1e-3, "full", 0),
        (3, 5, 2, 1e-1, "full", 1),
        (4, 3, 3, 1e-3, "diagonal", 2),
        (2, 1, 4, 1e-1, "full", 3),
    ],
)
def test_channels_first_layernorm_blocks_are_the_exact_per_channel_fisher(
    batch, channels, size, damping, mode, seed
):
    """timm's LayerNorm2d normalises dim 1 of NCHW at every position. Its helper's
    per-example gradients are autograd's, and the K-FAC direction is the dense per-channel
    solve (F_c + λI)⁻¹ ∇_c with F_c = n Σ_n d_nc d_ncᵀ (d_n: example n's gradient of the
    batch-mean loss)."""
    torch.manual_seed(seed)
    model = _Probe(channels).double()
    norm = model.norm
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    assert helper_class_for(norm) is ChannelsFirstLayerNormHelper
    x = torch.randn(batch, channels, size, size, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))

    d = []
    for i in range(batch):
        model.zero_grad()
        (F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) / batch).backward()
        d.append(torch.stack([norm.weight.grad, norm.bias.grad], -1))
    d = torch.stack(d)  # (n, C, 2)
    fisher = batch * torch.einsum("nci,ncj->cij", d, d)
    if mode == "diagonal":
        fisher = torch.diag_embed(torch.diagonal(fisher, dim1=1, dim2=2))

    helper = ChannelsFirstLayerNormHelper(norm, "norm")
    per_example = helper.per_example_grads(x, _output_grad(model, x, y))
    rows = batch * size * size
    # per-example gradients: sums over each example's positions
    assert_close(per_example, d, n=rows, scale=float(d.abs().max()))

    opt = exact_kfac(model, damping=damping, layer_options={"norm_blocks": mode})
    before = [p.detach().clone() for p in (norm.weight, norm.bias)]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = torch.stack([norm.weight.grad, norm.bias.grad], -1)
    opt.step()
    got = torch.stack(
        [b - p.detach() for b, p in zip(before, (norm.weight, norm.bias), strict=True)], -1
    )
    eye = torch.eye(2, dtype=torch.float64)
    expected = torch.linalg.solve(fisher + damping * eye, grad.unsqueeze(-1)).squeeze(-1)
    # 2 x 2 solves amplify by their condition numbers; x̂ = (x − μ)/√(σ² + ε) cancels, so the
    # library's x̂ and autograd's differ by eps·|x|/√(σ² + ε); the step is read back as
    # w − w' (resolved to the size of the weights)
    cond = float(torch.linalg.cond(fisher + damping * eye).max())
    spread = (x.var(1, unbiased=False) + norm.eps).sqrt()
    cond *= max(1.0, float((x.abs().amax(1) / spread).max()))
    scale = float(expected.abs().max()) + max(float(b.abs().max()) for b in before)
    assert_close(got, expected, n=rows + 2, cond=cond, scale=scale)


@pytest.mark.parametrize("act", ["relu", "silu", "hard_swish", "identity"])
def test_batchnorm_act_per_example_grads_are_the_norms_not_the_activations(act):
    """timm's BatchNormAct2d hooks the activation's output gradient; its helper takes it back
    through the activation, so the per-example contributions ``Σ_pos g_pre ⊙ x̂`` (and
    ``Σ_pos g_pre``) are those of the norm's own output gradient ``g_pre`` (autograd, float64)
    and sum to the parameters' gradient."""
    torch.manual_seed(0)
    # not in place, so that autograd can give the gradient at the pre-activation too
    norm = BatchNormAct2d(3, act_layer=act, apply_act=act != "identity", inplace=False).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    assert helper_class_for(norm) is BatchNormActHelper
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    weights = torch.randn(3, 3, 3, dtype=torch.float64)
    seen = {}
    handle = norm.act.register_forward_pre_hook(lambda m, a: seen.update(pre=a[0]))
    out = norm(x)
    handle.remove()
    pre = seen["pre"]
    loss = (out.tanh() * weights).sum()
    g_out, g_pre = torch.autograd.grad(loss, (out, pre), retain_graph=True)
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / (
        x.var((0, 2, 3), unbiased=False, keepdim=True) + norm.eps
    ).sqrt()
    expected = torch.stack([(g_pre * x_hat).sum((2, 3)), g_pre.sum((2, 3))], -1)
    got = BatchNormActHelper(norm, "norm").per_example_grads(x, g_out)
    scale = float((g_pre.abs() * x_hat.abs()).sum((2, 3)).max())
    assert_close(got, expected, n=9, scale=scale)
    grads = torch.autograd.grad(loss, (norm.weight, norm.bias))
    assert_close(got.sum(0), torch.stack(grads, -1), n=36, scale=scale)


def test_batchnorm_act_with_a_random_drop_layer_is_left_out():
    norm = BatchNormAct2d(3, drop_layer=nn.Dropout)
    helper, reason = resolve_helper(norm)
    assert helper is None and "drop=Dropout" in reason


def _output_grad(model, x, y):
    """The gradient of the batch-mean loss with respect to the norm's output."""
    out = {}
    handle = model.norm.register_forward_hook(lambda m, a, o: out.setdefault("o", o))
    loss = F.cross_entropy(model(x), y)
    handle.remove()
    return torch.autograd.grad(loss, out["o"])[0]


# ---- the rule for subclasses -------------------------------------------------------------
class _PlainSubclass(nn.Linear):
    """Keeps nn.Linear's forward: covered by LinearHelper."""


class _TransposedLinear(nn.Linear):
    """Stores its weight transposed (HF ``Conv1D``-style use of a Linear's weight)."""

    def forward(self, x):
        return x @ self.weight.reshape(self.in_features, self.out_features) + self.bias


class _ChannelsFirstNorm(nn.LayerNorm):
    """A channels-first layer norm of its own (no helper registered for it)."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class _PaddingConv(nn.Conv2d):
    """Pads its input before the convolution (TF 'SAME' style)."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class _BatchNormThenAct(nn.BatchNorm2d):
    """Applies an activation after the norm inside its own forward."""

    def forward(self, x):
        return F.relu(super().forward(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _PaddingConv(3, 4, 2)
        self.norm = _ChannelsFirstNorm(4)
        self.bnact = _BatchNormThenAct(4)
        self.proj = _TransposedLinear(4, 4)
        self.head = _PlainSubclass(4, 2)

    def forward(self, x):
        x = self.norm(self.bnact(self.conv(x))).mean((2, 3))
        return self.head(self.proj(x))


def test_subclass_with_its_own_forward_is_left_to_the_base_update_with_the_reason():
    model = _Net()
    assert resolve_helper(model.head) == (LinearHelper, None)
    for layer in (model.conv, model.norm, model.bnact, model.proj):
        helper, reason = resolve_helper(layer)
        assert helper is None and "overrides the forward" in reason
    for method in (KFAC, AdaFisher):
        torch.manual_seed(0)
        model = _Net()
        with pytest.warns(UserWarning, match="overrides the forward") as record:
            opt = method(model, lr=1e-2)
        assert len([w for w in record if "no curvature estimate" in str(w.message)]) == 1
        assert [layer.name for layer in opt.capture.layers] == ["head"]
        left = {line.split(":")[0] for line in opt.left_out_layers}
        assert left == {"conv", "norm", "bnact", "proj"}
        assert set(opt.uncovered_parameters) == {
            f"{m}.{p}" for m in ("conv", "norm", "bnact", "proj") for p in ("weight", "bias")
        }
        x, y = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 0, 1])
        before = [p.detach().clone() for p in model.parameters()]
        moving = [False] * len(before)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            # a bias in front of a normalisation has a zero gradient in exact arithmetic:
            # its round-off (exactly 0 or ~1e-10, by the CPU's kernels) moves nothing
            moving = [
                m or float(p.grad.abs().max()) > 1e-6
                for m, p in zip(moving, model.parameters(), strict=True)
            ]
            opt.step()
        assert any(moving)
        for b, p, m in zip(before, model.parameters(), moving, strict=True):
            assert torch.isfinite(p).all()
            if m:  # the left-out layers train too, by the base update
                assert not torch.equal(b, p)


def test_a_helper_registered_for_the_exact_subclass_covers_it():
    from secondorder.layers import _REGISTRY

    register_layer_helper(_ChannelsFirstNorm, ChannelsFirstLayerNormHelper)
    try:
        assert helper_class_for(_ChannelsFirstNorm(4)) is ChannelsFirstLayerNormHelper

        class _Deeper(_ChannelsFirstNorm):
            """Inherits the registered class's forward: same helper."""

        assert helper_class_for(_Deeper(4)) is ChannelsFirstLayerNormHelper
    finally:
        del _REGISTRY[_ChannelsFirstNorm]
    # timm's classes are registered by qualified name (secondorder never imports timm)
    import timm.layers

    assert helper_class_for(timm.layers.LayerNorm(4)) is LayerNormHelper
    assert helper_class_for(timm.layers.LayerNorm2d(4)) is ChannelsFirstLayerNormHelper
    with pytest.raises(TypeError, match="normalises one dimension"):
        ChannelsFirstLayerNormHelper(nn.LayerNorm((2, 3)), "norm")


def test_multihead_attention_in_proj_is_uncovered_with_the_reason():
    """nn.MultiheadAttention computes q, k, v = x W_inᵀ inside
    F.multi_head_attention_forward: no hook sees the projections' output gradients, so
    in_proj gets the base update, named in uncovered_parameters with its reason."""

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attn()
    with pytest.warns(UserWarning, match="in_proj_weight"):
        opt = KFAC(model, lr=1e-2, graft=None)
    assert {"attn.in_proj_weight", "attn.in_proj_bias"} <= set(opt.uncovered_parameters)
    assert any(
        line.startswith("attn: nn.MultiheadAttention projects q, k, v")
        for line in opt.left_out_layers
    )

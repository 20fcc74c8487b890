"""AdaHessian on layers whose backward PyTorch cannot always differentiate again: attention
through F.scaled_dot_product_attention (the math backend, chosen by the optimizer, against a
dense Hessian of hand-written attention) and the operations without a double backward (one
clear error naming the operation and the way out)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import AdaHessian
from secondorder.estimators.adahessian import hutchinson_diagonal

from ..helpers import assert_close


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and spin on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- models ------------------------------------------------------------------------------
class _Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention, then a readout of
    the mean over the sequence. Records whether the fused kernels were allowed at each
    forward pass (``fused``)."""

    def __init__(self, dim: int = 4, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, classes)
        self.fused: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fused.append(torch.backends.cuda.flash_sdp_enabled())
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d).mean(1))


def _dense_loss(model: _Attention, x: torch.Tensor, y: torch.Tensor):
    """The same loss as a function of the flattened parameters, attention written out as
    softmax(q kᵀ / √d_head) v (an oracle that never calls scaled_dot_product_attention)."""
    shapes = [p.shape for p in model.parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        w, b, w_out, b_out = (
            t.view(s)
            for t, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes, strict=True)
        )
        n, t, d = x.shape
        h = model.heads
        q, k, v = (x @ w.T + b).view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(n, t, d).mean(1)
        return F.cross_entropy(out @ w_out.T + b_out, y)

    return loss


class _TinyLM(nn.Module):
    """A one-layer causal nn.TransformerEncoder language model (attention through
    F.scaled_dot_product_attention in training mode)."""

    def __init__(self, vocab: int = 11, dim: int = 16, heads: int = 2, seq: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.head(self.encoder(self.embed(idx) + self.pos[:t], mask=mask, is_causal=True))


def _counting_data(vocab: int = 11, batch: int = 16, seq: int = 6):
    """Sequences that count modulo ``vocab`` from random starts: next token = token + 1."""
    gen = torch.Generator().manual_seed(1)
    tokens = (torch.randint(0, vocab, (batch, 1), generator=gen) + torch.arange(seq + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def _attention_batch():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (3,), generator=gen)


# ---- attention -------------------------------------------------------------------------
def test_fused_attention_without_the_math_backend_gives_the_clear_error():
    """The premise: on this machine the forward pass picks a fused kernel that has no double
    backward (CPU flash attention); the error names it and the way out."""
    torch.manual_seed(0)
    model = _Attention().double()
    x, y = _attention_batch()
    opt = AdaHessian(model, math_attention=False)
    F.cross_entropy(model(x), y).backward(create_graph=True)
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention") as info:
        opt.step()
    assert "opt.hessian_graph()" in str(info.value)
    assert "sdpa_kernel(SDPBackend.MATH)" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # PyTorch's own error, chained


def test_attention_estimate_equals_the_dense_hessian_estimate():
    """With the model given, the forward pass before a Hessian step runs the math backend:
    the step's |v ⊙ Hv| equals the one from the dense float64 Hessian of hand-written
    attention, with the same Rademacher probes (drawn as AdaHessian documents)."""
    torch.manual_seed(0)
    model = _Attention().double()
    x, y = _attention_batch()
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hess = torch.autograd.functional.hessian(_dense_loss(model, x, y), flat)
    gen = torch.Generator().manual_seed(7)
    probe = torch.cat(
        [
            (torch.randint(0, 2, p.shape, generator=gen, dtype=torch.float64) * 2 - 1).reshape(-1)
            for p in params
        ]
    )
    want = (probe * (hess @ probe)).abs()

    opt = AdaHessian(model, seed=7, n_probes=1)  # one probe, as ``want``
    assert opt.needs_hessian
    F.cross_entropy(model(x), y).backward(create_graph=True)
    opt.step()
    assert model.fused == [False]  # the math backend, during the forward pass only
    assert torch.backends.cuda.flash_sdp_enabled()
    got = torch.cat([opt.state[p]["hessian_diag"].reshape(-1) for p in params])
    assert_close(got, want, n=flat.numel())


def test_transformer_language_model_trains_with_adahessian():
    """nn.TransformerEncoder (F.scaled_dot_product_attention inside) learns to count: the
    causal LM's loss on its batch falls below a quarter of its start in 20 steps."""
    torch.manual_seed(0)
    model = _TinyLM()
    x, y = _counting_data()
    opt = AdaHessian(model, lr=0.03)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))
        loss.backward(create_graph=opt.needs_hessian)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.25 * losses[0], losses


def test_math_backend_only_for_the_passes_a_hessian_step_differentiates():
    """hessian_every=2: the forward pass before step 0 runs the math backend, the one before
    step 1 (which reuses the estimate) and a no-grad pass keep the fused kernels."""
    torch.manual_seed(0)
    model = _Attention().double()
    x, y = _attention_batch()
    opt = AdaHessian(model, hessian_every=2)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward(create_graph=opt.needs_hessian)
        opt.step()
    with torch.no_grad():
        model(x)
    assert model.fused == [False, True, True]


def test_hessian_graph_context_for_optimizers_given_parameters():
    """Given parameters there is no model to hook: ``with opt.hessian_graph():`` around the
    forward pass does the same, and its estimate equals the hooked optimizer's."""
    x, y = _attention_batch()
    estimates = []
    for given_model in (False, True):
        torch.manual_seed(0)
        model = _Attention().double()
        opt = AdaHessian(model if given_model else model.parameters(), seed=3)
        with opt.hessian_graph():
            loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=True)
        opt.step()
        assert model.fused == [False]
        estimates.append([opt.state[p]["hessian_diag"] for p in model.parameters()])
    for a, b in zip(*estimates, strict=True):
        assert torch.equal(a, b)  # the same code path twice


def test_remove_hooks_and_bad_math_attention_arguments():
    torch.manual_seed(0)
    model = _Attention().double()
    x, y = _attention_batch()
    opt = AdaHessian(model)
    opt.remove_hooks()
    F.cross_entropy(model(x), y).backward(create_graph=True)
    with pytest.raises(RuntimeError, match="hessian_graph"):
        opt.step()
    with pytest.raises(ValueError, match="math_attention=True needs the model"):
        AdaHessian(model.parameters(), math_attention=True)
    with pytest.raises(TypeError, match="math_attention must be a bool"):
        AdaHessian(model, math_attention="yes")


def test_hooks_do_not_keep_a_dropped_optimizer_alive():
    """The model holds the optimizer weakly: once it is gone, forward passes keep the fused
    kernels."""
    torch.manual_seed(0)
    model = _Attention().double()
    x, _ = _attention_batch()
    opt = AdaHessian(model)
    model(x)
    del opt
    model(x)
    assert model.fused == [False, True]


# ---- operations without a double backward --------------------------------------------------
class _HardSigmoid(nn.Module):
    """nn.Hardsigmoid written with relu6: the same function, differentiable twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3) / 6


def _gated(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 3))


def _step(model: nn.Module) -> AdaHessian:
    opt = AdaHessian(model)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(4)) * 3
    F.cross_entropy(model(x), torch.arange(6) % 3).backward(create_graph=True)
    opt.step()
    return opt


def test_hardsigmoid_gives_one_clear_error_with_the_replacement():
    with pytest.raises(RuntimeError, match=r"nn\.Hardsigmoid") as info:
        _step(_gated(nn.Hardsigmoid()))
    message = str(info.value)
    assert "hardsigmoid_backward" in message
    assert "F.relu6(x + 3) / 6" in message
    assert "README" in message


def test_the_suggested_replacement_is_the_same_function_and_trains():
    x = torch.linspace(-5, 5, 101)
    # two code paths (an add and a division against aten's kernel): two roundings apart
    assert_close(_HardSigmoid()(x), nn.Hardsigmoid()(x), n=2)
    opt = _step(_gated(_HardSigmoid()))
    assert opt.steps == 1


def test_hardswish_has_a_double_backward():
    """nn.Hardswish (timm's MobileNetV3 activation) needs no replacement."""
    assert _step(_gated(nn.Hardswish())).steps == 1


def test_embedding_bag_error_names_the_layer_for_hutchinson_alone():
    weight = nn.Parameter(torch.randn(5, 3))
    loss = F.embedding_bag(torch.tensor([[0, 1], [2, 3]]), weight).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, [weight], create_graph=True)
    with pytest.raises(RuntimeError, match=r"nn\.EmbeddingBag") as info:
        hutchinson_diagonal([weight], [grad])
    assert "nn.Embedding followed by" in str(info.value)


class _FailingBackward(torch.autograd.Function):
    """The identity, whose backward raises an unrelated RuntimeError."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an unrelated failure")


def test_other_errors_pass_through_unchanged():
    """Only PyTorch's "derivative ... is not implemented" is rewritten."""
    weight = nn.Parameter(torch.randn(3))
    (grad,) = torch.autograd.grad(weight.pow(3).sum(), [weight], create_graph=True)
    with pytest.raises(RuntimeError, match=r"^an unrelated failure$"):
        hutchinson_diagonal([weight], [_FailingBackward.apply(grad)])

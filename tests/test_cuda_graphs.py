"""A plain K-FAC step (no statistics, no refresh due) captured in a CUDA graph.

While a stream captures (``torch.cuda.graph``) the step reads nothing back to the host: the
finiteness check is left out (nothing could be skipped inside a graph anyway) and the KL-clip
factor stays a device tensor that always scales the directions. Pinned here: on a GPU,
replaying the captured step on new gradients equals eager steps to round-off; on any machine,
the capture path of the step (``capturing()`` forced on) reads the host zero times and equals
the eager step, and the device KL factor equals the host one.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder._host as host
from secondorder import KFAC
from secondorder.optimizer import _kl_clip_tensor, kl_clip_factor

from .helpers import assert_close


def _net() -> nn.Sequential:
    # with max_factor_dim=8 the input factors (19, 65, 13 wide) are blocked with padded
    # blocks (65 = 2 blocks of 8 and 7 of 7) and the 12-wide G in 2 blocks of 6
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, 12),
        nn.Tanh(),
        nn.Linear(12, 3),
    )


def _batches(n: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 2, 4, 4, generator=gen).to(device),
            torch.randint(0, 3, (8,), generator=gen).to(device),
        )
        for _ in range(n)
    ]


def _grads(model: nn.Module, batch) -> list[torch.Tensor]:
    x, y = batch
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


CASES = [
    {},  # the defaults: KL clipping 1e-2, eigen damping, blocks of 256 (none here)
    {"kl_clip": None},
    {"max_factor_dim": 8, "lr": 0.3},  # blocked factors, one padded; clipping active
    {"graft": "rmsprop"},
    {"damping_mode": "factored"},
]


def _pair(device: str, kwargs: dict) -> tuple[nn.Module, KFAC, nn.Module, KFAC]:
    torch.manual_seed(0)
    model = _net().to(device)
    twin = copy.deepcopy(model)
    hp = {"lr": 0.05, "curvature_every": 1000, "inverse_every": 1000, **kwargs}
    return model, KFAC(model, **hp), twin, KFAC(twin, **hp)


def _eager_step(model: nn.Module, opt: KFAC, batch) -> None:
    opt.zero_grad()
    x, y = batch
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)  # in place: a captured step reads these very tensors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(k) or "defaults")
def test_a_captured_plain_step_replays_as_eager_steps(kwargs):
    model, opt, twin, ref = _pair("cuda", kwargs)
    batches = _batches(7, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for batch in batches[:2]:  # step 0 records and refreshes, step 1 is plain
            _eager_step(model, opt, batch)  # each net records its own statistics
            _eager_step(twin, ref, batch)
    torch.cuda.current_stream().wait_stream(side)
    assert opt.steps == 2 and not opt.capture.recording

    at_capture = [p.detach().clone() for p in model.parameters()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()  # recorded, not run: the parameters are unchanged until a replay
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), at_capture, strict=True):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close(p, q, dtype=torch.float32, n=64)  # the twins' eager steps so far

    for batch in batches[2:]:
        grads = _grads(model, batch)
        _set_grads(model, grads)
        graph.replay()
        _set_grads(twin, grads)
        ref.step()
        torch.cuda.synchronize()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            # the same kernels; the captured KL factor is computed on the device in float64
            # and always applied (eager: on the host, applied when below 1)
            assert_close(p, q, dtype=torch.float32, n=64)
    # the replays did run (and the comparisons held after each of the five updates)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), at_capture, strict=True))


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(k) or "defaults")
def test_the_capture_path_reads_no_host_value_and_equals_the_eager_step(kwargs, monkeypatch):
    """On the CPU, with ``capturing()`` forced on: the plain step takes the path it takes
    inside a CUDA graph, calls no host read, and moves the parameters as the eager step."""
    model, opt, twin, ref = _pair("cpu", kwargs)
    batches = _batches(5, "cpu")
    for batch in batches[:2]:
        _eager_step(model, opt, batch)
        _eager_step(twin, ref, batch)
    before = [p.detach().clone() for p in model.parameters()]
    reads = [0]
    real = host.to_host

    def counting(values):
        reads[0] += 1
        return real(values)

    optimizer_module = sys.modules["secondorder.optimizer"]
    for batch in batches[2:]:
        grads = _grads(model, batch)
        _set_grads(model, grads)
        _set_grads(twin, grads)
        monkeypatch.setattr(optimizer_module, "capturing", lambda: True)
        monkeypatch.setattr(optimizer_module, "to_host", counting)
        opt.step()
        monkeypatch.setattr(optimizer_module, "capturing", lambda: False)
        monkeypatch.setattr(optimizer_module, "to_host", real)
        ref.step()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert_close(p, q, dtype=torch.float32, n=64)
    assert reads[0] == 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_adam_graft_refuses_capture(monkeypatch):
    """Adam's step counts are on the host: a captured step would freeze its bias correction."""
    model, opt, _, _ = _pair("cpu", {"graft": "adam"})
    batch = _batches(1, "cpu")[0]
    _eager_step(model, opt, batch)
    monkeypatch.setattr(sys.modules["secondorder.grafting"], "capturing", lambda: True)
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    with pytest.raises(RuntimeError, match="graft='adam' keeps Adam's step counts on the host"):
        opt.step()


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3, 0.0])
def test_the_kl_factor_is_the_float64_formula_on_the_device_and_on_the_host(scale):
    """Clipped (large directions), not clipped (small ones: factor 1), and a zero sum (1):
    the device tensor and the host value :func:`kl_clip_factor` reads from it both equal
    ``min(1, sqrt(κ / Σ lr² <u, g>))`` computed in float64."""
    gen = torch.Generator().manual_seed(0)
    us = [torch.randn(5, 3, generator=gen) * scale, torch.randn(4, generator=gen) * scale]
    # gradients close to the directions' signs: a positive inner product
    pairs = [
        (u, u.sign() + 0.1 * torch.randn(u.shape, generator=gen), lr)
        for u, lr in zip(us, (0.1, 0.2), strict=True)
    ]
    total = sum(lr**2 * float((u.double() * g.double()).sum()) for u, g, lr in pairs)
    want = 1.0 if not total > 0 else min(1.0, math.sqrt(1e-2 / total))
    got = _kl_clip_tensor(iter(pairs), 1e-2)
    assert got.dtype == torch.float64 and got.dim() == 0
    # float32 products of 19 terms, summed in float64
    assert_close(got, torch.tensor(want, dtype=torch.float64), dtype=torch.float32, n=19)
    assert kl_clip_factor(iter(pairs), 1e-2) == float(got)
    assert kl_clip_factor(iter([]), 1e-2) == 1.0

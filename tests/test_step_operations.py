"""What one plain step dispatches: layers of one shape are preconditioned in one batch, and
the host is read only for the finiteness check (and KL clipping).

Operation counts are not timings: they are exact and machine-independent for a given torch
version, so they can be asserted. ``benchmarks/op_count.py`` reports them for ResNet-20.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder._host as host
from secondorder import KFAC

from .helpers import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from op_count import OpCounter


def _stack(depth: int) -> nn.Sequential:
    """``depth`` equal Linear(8, 8) layers with LayerNorm between: one shape each."""
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    for _ in range(depth):
        layers += [nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8)]
    return nn.Sequential(*layers, nn.Linear(8, 3))


def _plain_step_ops(depth: int, **kwargs) -> tuple[KFAC, OpCounter, int]:
    torch.manual_seed(0)
    model = _stack(depth)
    opt = KFAC(model, lr=0.1, curvature_every=100, inverse_every=100, **kwargs, graft=None)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    for _ in range(2):  # step 0 records and refreshes; step 1 is plain
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if opt.steps == 0:
            opt.step()
    reads = [0]
    real = host.to_host

    def counting(values):
        reads[0] += 1
        return real(values)

    counter = OpCounter()
    optimizer_module = sys.modules["secondorder.optimizer"]
    optimizer_module.to_host = counting
    try:
        with counter:
            opt.step()
    finally:
        optimizer_module.to_host = real
    return opt, counter, reads[0]


def test_layers_of_one_shape_cost_no_extra_kernels_to_precondition():
    """Each extra (Linear 8x8, LayerNorm 8) pair adds its gradient's views and splits and
    its base update, not a set of products: the non-view operations grow by less than the
    per-layer precondition (two bmm per Kronecker layer, two per norm layer) would cost."""
    _, small, _ = _plain_step_ops(2)
    _, large, _ = _plain_step_ops(6)
    assert small.ops["aten::bmm"] == large.ops["aten::bmm"]
    per_pair = (large.kernels - small.kernels) / 4
    # the base update (3 per parameter with momentum, 4 parameters per pair on the CPU
    # loop) and the grad matrix / split of each layer; per-layer products would add >= 4
    assert per_pair <= 4 * 3 + 6


@pytest.mark.parametrize(("kl_clip", "reads"), [(1e-2, 2), (None, 1)])
def test_a_plain_step_reads_the_host_once_per_check(kl_clip, reads):
    """Finiteness (one read per device) and the KL-clip factor; nothing per layer or
    parameter."""
    _, _, counted = _plain_step_ops(3, kl_clip=kl_clip)
    assert counted == reads


def test_the_batched_precondition_equals_the_per_layer_one():
    opt, _, _ = _plain_step_ops(3)
    est = opt.estimator
    grads = {p: p.grad for p in opt.param_groups[0]["params"]}
    batched = est.precondition(grads, 1e-2)
    for layer in est.layers:
        inv = est._state[layer.name].inverse
        if "d_g" not in inv:  # norm layers: their own batch, checked by the step tests
            continue
        grad = layer.grad_matrix(grads)
        alone = layer.split_matrix(est._apply(inv, grad, 1e-2, layer.name).to(grad.dtype))
        for p, want in alone.items():
            # the same products, batched: a handful of roundings of an 8-wide inner sum
            assert_close(batched[p], want, dtype=torch.float32, n=4 * 9)

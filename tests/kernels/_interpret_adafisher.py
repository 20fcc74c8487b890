"""Run by test_adafisher.py in a subprocess with TRITON_INTERPRET=1, as
``python -m tests.kernels._interpret_adafisher`` from the repository root.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the kernel module is
first imported; in the pytest process other modules have imported it long before, so the
interpreter checks live in a fresh process. Compares the Triton launcher with the torch
reference on odd shapes; exits non-zero with a message on the first mismatch, prints
``checked N cases`` otherwise.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

from secondorder.kernels.adafisher import adafisher_update_reference, adafisher_update_triton

from ..helpers import tolerance

#: rounded operations on the way to one updated weight: g + wd·w (2), β m + (1 − β) g'
#: (3), s·h + λ (2), m / bias_correction / F̃ (2), + wd·w (2), w − lr · step (2)
OPS = 13


class Mismatch(Exception):
    pass


def check(got, want, dtype, scale, what):
    """Both paths compute the same float32 expression per element; only the compiler's
    contraction of multiply-adds may differ: OPS roundings on entries of size ``scale``.
    Half-precision parameters are then rounded once on store by both, so they may differ
    by one unit in the last place of the stored value: eps of ``dtype`` per rounding, one
    on each side (n = 1, safety 2), relative to the value."""
    if not want.numel():
        return
    rtol = tolerance(dtype, n=1, safety=2) if dtype != torch.float32 else 0.0
    atol = tolerance(torch.float32, n=OPS) * scale
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    if not bool((err <= bound).all()):
        worst = float((err - bound).max())
        raise Mismatch(f"mismatch {what}: error beyond the bound by {worst:.3g}")


def scales(w0, w_ref, m0, g, weight_decay):
    """What an updated entry's rounding error is proportional to: ``|w| + |lr·step|`` for
    the weight, ``|m| + |g| + wd|w|`` for the moment; largest over the entries."""
    if not w0.numel():
        return 0.0, 0.0
    w0, w_ref = w0.double(), w_ref.double()
    scale_w = (w0.abs().max() + (w0 - w_ref).abs().max()).item()
    scale_m = (m0.double().abs().max() + g.double().abs().max()).item()
    return scale_w, scale_m + weight_decay * w0.abs().max().item()


def run(shape, dtype, decoupled, step, gen, *, lead=(), blocks=(None, None), views=None):
    rows, cols = shape
    full = (*lead, rows, cols)
    w0 = torch.randn(full, generator=gen).to(dtype)
    g = torch.randn(full, generator=gen).to(dtype)
    m0 = (0.1 * torch.randn(full, generator=gen)).to(dtype)
    s = torch.rand((*lead, rows), generator=gen)
    h = torch.rand((*lead, cols), generator=gen)
    kwargs = {
        "lr": 0.05,
        "beta": 0.9,
        "bias_correction": 1.0 - 0.9**step,
        "damping": 1e-3,
        "weight_decay": 0.01,
        "decoupled": decoupled,
    }
    w_ref, m_ref = w0.clone(), m0.clone()
    adafisher_update_reference(w_ref, g, m_ref, s, h, **kwargs)
    scale_w, scale_m = scales(w0, w_ref, m0, g, kwargs["weight_decay"])
    w, m = w0.clone(), m0.clone()
    if views is not None:
        w, m = views(w), views(m)
    out = adafisher_update_triton(w, g, m, s, h, block_r=blocks[0], block_c=blocks[1], **kwargs)
    if out is not w:
        raise Mismatch("the launcher must return param")
    what = f"{full} {dtype} decoupled={decoupled} step={step} blocks={blocks}"
    check(w, w_ref, dtype, scale_w, "param " + what)
    check(m, m_ref, dtype, scale_m, "exp_avg " + what)


def check_optimizer() -> int:
    """AdaFisher on a model with every kind of block (a transposed embedding block, bias
    columns, grouped convolution weights, norm-layer columns, an uncovered parameter with
    broadcast diagonals): the optimizer driving the Triton kernel equals it driving the
    reference."""
    import copy
    import warnings

    import torch.nn.functional as F
    from torch import nn

    import secondorder.kernels.adafisher as kernel_module
    from secondorder import AdaFisherW

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(13, 4)
            self.gain = nn.Parameter(torch.ones(4))  # no helper: F̃ = 1 + λ
            self.conv = nn.Conv1d(4, 6, 3, groups=2)
            self.norm = nn.LayerNorm(6)
            self.head = nn.Linear(6, 3)

        def forward(self, tokens):
            h = (self.emb(tokens) * self.gain).transpose(1, 2)
            h = self.conv(h).transpose(1, 2)
            return self.head(self.norm(h)).mean(1)

    warnings.filterwarnings("ignore", message=".*no curvature estimate")
    torch.manual_seed(0)
    model = Net()
    batches = [(torch.randint(0, 13, (5, 7)), torch.randint(0, 3, (5,))) for _ in range(3)]
    results = []
    real = kernel_module.use_triton
    for triton_path in (False, True):
        kernel_module.use_triton = (lambda t: True) if triton_path else real
        try:
            net = copy.deepcopy(model)
            opt = AdaFisherW(net, lr=0.05, curvature_every=1, weight_decay=0.01)
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
        finally:
            kernel_module.use_triton = real
        results.append(dict(net.named_parameters()))
    # three steps of training: the kernels' rounding differences move the weights, the
    # next forward and backward passes sum over 5 x 7 positions: n = 3 x (OPS + 35),
    # relative to the largest weight
    scale = max(p.abs().max().item() for p in results[0].values())
    for name, p in results[0].items():
        got = results[1][name].detach()
        err = (got.double() - p.detach().double()).abs().max().item()
        tol = tolerance(torch.float32, n=3 * (OPS + 35)) * scale
        if not err <= tol:
            raise Mismatch(f"mismatch optimizer parameter {name}: {err:.3g} > {tol:.3g}")
    return 1


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    gen = torch.Generator().manual_seed(0)
    cases = 0
    shapes = ((1, 1), (3, 5), (17, 33), (64, 129))
    for shape, dtype, decoupled, step in itertools.product(
        shapes, (torch.float32, torch.bfloat16), (False, True), (1, 10)
    ):
        run(shape, dtype, decoupled, step, gen)
        cases += 1

    # small tiles: several programs on both axes, ragged edges; a batch of groups
    for shape, blocks, lead in (
        ((17, 33), (4, 8), ()),
        ((64, 129), (16, 32), ()),
        ((5, 7), (2, 4), (3,)),
        ((300, 1), (None, None), ()),
        ((1, 300), (None, None), ()),
    ):
        run(shape, torch.float32, False, 3, gen, lead=lead, blocks=blocks)
        cases += 1
    run((9, 4), torch.float16, True, 2, gen)
    cases += 1

    # strided parameters: an embedding-style transposed block, a column slice
    run((6, 11), torch.float32, True, 4, gen, views=lambda t: t.T.contiguous().T)
    run((7, 13), torch.float32, False, 4, gen, views=lambda t: torch.zeros(7, 26)[:, ::2].copy_(t))
    cases += 2

    # broadcast diagonals (stride 0), as the optimizer passes for uncovered parameters
    w, g, m = torch.randn(50, 1, generator=gen), torch.randn(50, 1), torch.zeros(50, 1)
    one = torch.ones(1)
    w_ref, m_ref = w.clone(), m.clone()
    kwargs = {"lr": 0.1, "beta": 0.9, "bias_correction": 0.1, "damping": 1e-3}
    adafisher_update_reference(w_ref, g, m_ref, one.expand(50), one, **kwargs)
    scale_w, _ = scales(w, w_ref, m, g, 0.0)
    adafisher_update_triton(w, g, m, one.expand(50), one, **kwargs)
    check(w, w_ref, torch.float32, scale_w, "broadcast diagonals")
    cases += 1

    cases += check_optimizer()
    print(f"checked {cases} cases")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Mismatch as err:
        print(err)
        sys.exit(1)

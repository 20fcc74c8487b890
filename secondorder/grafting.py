"""Grafting: the preconditioned direction with the step size of a first-order method.

Layer-wise grafting (Agarwal et al., 2020, https://arxiv.org/abs/2002.11803; Distributed
Shampoo's ``grafting_config``) takes the *direction* of one method and the *norm* of
another's step. With ``graft=...`` every parameter's step is, before the base update,

.. math::
    d = \\frac{\\lVert a \\rVert}{\\lVert u \\rVert}\\, u

with ``u`` the preconditioned direction and ``a`` the grafted method's step, computed from the
raw gradient with the grafted method's own state (so the learning rate tuned for that method
carries over). Where the curvature gives no direction (a parameter no estimator covers, a step
where ``use_curvature`` is off, before the first statistics) the step is ``a`` itself. The
grafted methods (``g`` the gradient, plus ``wd·w`` with coupled weight decay):

* ``"sgd"``: ``a = g`` (the preconditioned direction gets the gradient's norm);
* ``"adagrad"``: ``s ← s + g²``, ``a = g / (√s + ε)``;
* ``"rmsprop"``: ``v ← β₂ v + (1 − β₂) g²``, ``a = g / (√v + ε)`` (``torch.optim.RMSprop``);
* ``"adam"``: Adam's step ``a = m̂ / (√v̂ + ε)`` with its own first moment, so Adam's
  momentum is in ``a`` and ``momentum`` defaults to 0. A parameter without a preconditioned
  direction takes exactly ``torch.optim.Adam``'s (``AdamW``'s, with decoupled weight decay)
  update: with the curvature off the optimizer *is* Adam, bit for bit.

The norms are per parameter. The base update (``base="sgd"``: momentum, learning rate,
decoupled weight decay) then applies to ``d``; coupled weight decay enters ``u`` and ``g``
before grafting. KL clipping, if set, acts before grafting (so grafting undoes its scale).
The grafted method's state lives in the optimizer's per-parameter state (``graft_*`` keys):
it is in ``state_dict`` and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .base_updates import adam_update

if TYPE_CHECKING:
    from .optimizer import CurvatureOptimizer

__all__ = ["GRAFTS", "graft_directions"]

#: the methods a preconditioned direction can take its step norm from
GRAFTS = ("sgd", "adagrad", "rmsprop", "adam")


def _state(state: dict[str, Any], key: str, like: Tensor) -> Tensor:
    if key not in state:
        state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    return state[key]


def _grafted_step(
    graft: str, state: dict[str, Any], g: Tensor, betas: tuple[float, float], eps: float
) -> Tensor:
    """The grafted method's step from gradient ``g``, updating its state (``"adam"``:
    :func:`_adam_steps`, which takes many parameters at once)."""
    if graft == "sgd":
        return g
    beta2 = betas[1]
    if graft == "adagrad":
        total = _state(state, "graft_sum", g).addcmul_(g, g)
        return g / total.sqrt().add_(eps)
    if graft == "rmsprop":
        square = _state(state, "graft_exp_avg_sq", g)
        square.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        return g / square.sqrt().add_(eps)
    return _adam_steps([state], [g], betas, eps)[0]


def graft_directions(
    opt: CurvatureOptimizer,
    group: dict[str, Any],
    grads: Mapping[Tensor, Tensor],
    directions: Mapping[Tensor, Tensor],
    preconditioned: Collection[Tensor],
    *,
    weight_decay: float,
) -> tuple[dict[Tensor, Tensor], float]:
    """The grafted directions of ``group``'s parameters, and the weight decay left to the
    base update.

    ``grads`` are the raw gradients, ``directions`` the (partly) preconditioned ones,
    ``preconditioned`` the parameters whose direction came from the curvature. With
    ``graft="adam"`` the parameters without such a direction are updated here, by Adam
    itself, and left out of the result.
    """
    cfg = opt.config
    graft, betas, eps = cfg.graft, cfg.graft_betas, cfg.graft_eps
    coupled = weight_decay != 0 and not opt.decoupled_weight_decay
    out: dict[Tensor, Tensor] = {}
    plain: list[Tensor] = []  # Adam graft, no preconditioned direction: Adam itself
    adam: list[tuple[Tensor, Tensor]] = []  # Adam graft, preconditioned: (p, g)
    for p in group["params"]:
        if p not in directions:
            continue
        state = opt.state[p]
        if graft == "adam" and p not in preconditioned:
            for key in ("graft_exp_avg", "graft_exp_avg_sq"):
                _state(state, key, p)
            state.setdefault("graft_step", torch.tensor(0.0))
            plain.append(p)
            continue
        g = grads[p].add(p, alpha=weight_decay) if coupled else grads[p]
        if graft == "adam":
            adam.append((p, g))
            continue
        step = _grafted_step(graft, state, g, betas, eps)
        out[p] = (
            step
            if p not in preconditioned
            else _scaled(directions[p], step, p, weight_decay, coupled)
        )
    if plain:  # one call: torch's Adam loops over the tensors (or runs foreach kernels)
        states = [opt.state[p] for p in plain]
        adam_update(
            plain,
            [grads[p] for p in plain],
            [s["graft_exp_avg"] for s in states],
            [s["graft_exp_avg_sq"] for s in states],
            [s["graft_step"] for s in states],
            lr=group["lr"],
            beta1=betas[0],
            beta2=betas[1],
            eps=eps,
            weight_decay=weight_decay,
            decoupled=opt.decoupled_weight_decay,
        )
    if adam:
        steps = _adam_steps([opt.state[p] for p, _ in adam], [g for _, g in adam], betas, eps)
        for (p, _), step in zip(adam, steps, strict=True):
            out[p] = _scaled(directions[p], step, p, weight_decay, coupled)
    return out, 0.0 if coupled else weight_decay


def _scaled(u: Tensor, step: Tensor, p: Tensor, weight_decay: float, coupled: bool) -> Tensor:
    """``u`` (plus coupled weight decay) scaled to the norm of ``step``."""
    u = u.add(p, alpha=weight_decay) if coupled else u
    # no host synchronisation: the ratio stays a tensor; a zero direction stays zero
    ratio = torch.linalg.vector_norm(step) / torch.linalg.vector_norm(u).clamp_min(
        torch.finfo(u.dtype).tiny
    )
    return u * ratio


def _adam_steps(
    states: list[dict[str, Any]], gs: list[Tensor], betas: tuple[float, float], eps: float
) -> list[Tensor]:
    """:func:`_grafted_step` ``"adam"`` of many parameters at once, with multi-tensor
    (``torch._foreach_*``) operations: the same arithmetic, a few calls instead of a few
    per parameter."""
    beta1, beta2 = betas
    exp_avgs = [_state(s, "graft_exp_avg", g) for s, g in zip(states, gs, strict=True)]
    squares = [_state(s, "graft_exp_avg_sq", g) for s, g in zip(states, gs, strict=True)]
    counts = [s.setdefault("graft_step", torch.tensor(0.0)) for s in states]
    torch._foreach_add_(counts, 1)
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    torch._foreach_mul_(squares, beta2)
    torch._foreach_addcmul_(squares, gs, gs, value=1 - beta2)
    by_step: dict[float, list[int]] = {}
    for i, count in enumerate(counts):  # the bias corrections: one group per step count
        by_step.setdefault(float(count), []).append(i)
    out: list[Tensor | None] = [None] * len(states)
    for step, indices in by_step.items():
        denom = torch._foreach_sqrt([squares[i] for i in indices])
        torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
        torch._foreach_add_(denom, eps)
        quotient = torch._foreach_div([exp_avgs[i] for i in indices], denom)
        torch._foreach_div_(quotient, 1 - beta1**step)
        for i, q in zip(indices, quotient, strict=True):
            out[i] = q
    return out  # type: ignore[return-value]

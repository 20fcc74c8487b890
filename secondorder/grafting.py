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
    """The grafted method's step from gradient ``g``, updating its state."""
    if graft == "sgd":
        return g
    beta1, beta2 = betas
    if graft == "adagrad":
        total = _state(state, "graft_sum", g).addcmul_(g, g)
        return g / total.sqrt().add_(eps)
    if graft == "rmsprop":
        square = _state(state, "graft_exp_avg_sq", g)
        square.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        return g / square.sqrt().add_(eps)
    exp_avg, exp_avg_sq = _state(state, "graft_exp_avg", g), _state(state, "graft_exp_avg_sq", g)
    step_t = state.setdefault("graft_step", torch.tensor(0.0))
    step_t += 1
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step = float(step_t)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    return exp_avg / denom / (1 - beta1**step)


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
    for p in group["params"]:
        if p not in directions:
            continue
        state = opt.state[p]
        if graft == "adam" and p not in preconditioned:
            for key in ("graft_exp_avg", "graft_exp_avg_sq"):
                _state(state, key, p)
            state.setdefault("graft_step", torch.tensor(0.0))
            adam_update(
                [p],
                [grads[p]],
                [state["graft_exp_avg"]],
                [state["graft_exp_avg_sq"]],
                [state["graft_step"]],
                lr=group["lr"],
                beta1=betas[0],
                beta2=betas[1],
                eps=eps,
                weight_decay=weight_decay,
                decoupled=opt.decoupled_weight_decay,
            )
            continue
        g = grads[p].add(p, alpha=weight_decay) if coupled else grads[p]
        step = _grafted_step(graft, state, g, betas, eps)
        if p not in preconditioned:
            out[p] = step
            continue
        u = directions[p].add(p, alpha=weight_decay) if coupled else directions[p]
        # no host synchronisation: the ratio stays a tensor; a zero direction stays zero
        ratio = torch.linalg.vector_norm(step) / torch.linalg.vector_norm(u).clamp_min(
            torch.finfo(u.dtype).tiny
        )
        out[p] = u * ratio
    return out, 0.0 if coupled else weight_decay

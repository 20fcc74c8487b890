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

  With ``graft_moment=True`` (the default) the curvature preconditions Adam's
  bias-corrected first moment ``m̂`` (after this step's gradient) instead of the raw
  gradient, as Distributed Shampoo preconditions its filtered gradient: ``u = P m̂``, so the
  direction carries the same momentum as the norm it takes. The moment is computed before
  the preconditioning and stored only when the step goes through (a skipped step leaves
  it as it was); the statistics still come from the raw gradients. With coupled weight
  decay the L2 term is part of ``m̂`` and so is preconditioned with it. On the
  learning-rate grid of ``benchmarks/lr_sensitivity.py`` this moved K-FAC's good learning
  rates down to Adam's and lowered its final losses (``benchmarks/RESULTS.md``).

The norms are per parameter (``graft_norm="row"``: per row of a weight, an output unit or
channel, and per 1-D parameter). The base update (``base="sgd"``: momentum, learning rate,
decoupled weight decay) then applies to ``d``; coupled weight decay enters ``u`` and ``g``
before grafting. KL clipping, if set, acts before grafting (so grafting undoes its scale).
The grafted method's state lives in the optimizer's per-parameter state (``graft_*`` keys):
it is in ``state_dict`` and resumes exactly.

The bases that read the curvature themselves (AdaFisher's ``"momentum"``, AdaHessian's
``"adahessian"``) have no direction to graft before they run: they update their own moments,
form their step ``u`` (``m̂ / (D + λ)``, ``m̂ / ((√v̂)^k + ε)``, the coupled decay inside) and
hand it to :func:`apply_grafted_base`, which grafts it as above and applies ``w ← w − lr·d``.
Any base but ``"adam"`` takes a graft.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._host import capturing, to_host
from .base_updates import adam_update

if TYPE_CHECKING:
    from .optimizer import CurvatureOptimizer

__all__ = ["GRAFTS", "GRAFT_NORMS", "apply_grafted_base", "graft_directions", "graft_moments"]

#: the methods a preconditioned direction can take its step norm from
GRAFTS = ("sgd", "adagrad", "rmsprop", "adam")
#: the units that take the grafted step's norm (``graft_norm``)
GRAFT_NORMS = ("parameter", "row")


def _row_norms(t: Tensor) -> Tensor:
    """The norm of each row of ``t`` (its leading index), shaped to broadcast against ``t``;
    a 1-D (or 0-D) tensor's norm as a whole."""
    if t.dim() < 2:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t.flatten(1), dim=1).view(-1, *([1] * (t.dim() - 1)))


def _state(state: dict[str, Any], key: str, like: Tensor) -> Tensor:
    if key not in state:
        state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    return state[key]


def _fusable(tensors: list[Tensor]) -> bool:
    """Whether torch's fused Adam kernel can compute the Adam graft's steps: CPU tensors
    (on a GPU the multi-tensor operations are already few kernels, and the fused kernel
    wants the step counters on the device), float32 or float64, contiguous."""
    return hasattr(torch, "_fused_adam_") and all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous()
        for t in tensors
    )


def _grafted_step(
    graft: str,
    states: list[dict[str, Any]],
    grads: list[Tensor],
    betas: tuple[float, float],
    eps: float,
    exp_avgs: list[Tensor] | None = None,
) -> list[Tensor]:
    """The grafted method's steps from gradients ``grads`` (one per state), updating the
    states: multi-tensor operations over all of them, no device synchronisation (Adam's
    step counters live on the host, as ``torch.optim.Adam``'s do). ``exp_avgs``: Adam's
    first moments after this step, already computed (:func:`graft_moments`), stored
    instead of updating the old ones (on the CPU, where torch's fused Adam kernel computes
    the steps, it updates the old ones in place with the same lerp instead)."""
    if graft == "sgd":
        return list(grads)
    beta1, beta2 = betas
    if graft in ("adagrad", "rmsprop"):
        key = "graft_sum" if graft == "adagrad" else "graft_exp_avg_sq"
        squares = [_state(st, key, g) for st, g in zip(states, grads, strict=True)]
        if graft == "adagrad":
            torch._foreach_addcmul_(squares, grads, grads)
        else:
            torch._foreach_mul_(squares, beta2)
            torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(squares)
        torch._foreach_add_(denom, eps)
        return list(torch._foreach_div(grads, denom))
    exp_avg_sqs = [_state(st, "graft_exp_avg_sq", g) for st, g in zip(states, grads, strict=True)]
    counters = [st.setdefault("graft_step", torch.tensor(0.0)) for st in states]
    torch._foreach_add_(counters, 1.0)
    if _fusable(grads):
        # one fused kernel per tensor instead of a dozen operations: Adam's update of a zero
        # "parameter" at lr −1 is the step m̂ / (√v̂ + ε) (the moment, if given, is
        # recomputed in place from the old one, the same lerp)
        olds = [_state(st, "graft_exp_avg", g) for st, g in zip(states, grads, strict=True)]
        out = [torch.zeros_like(g) for g in grads]
        for dtype in {g.dtype for g in grads}:
            idx = [i for i, g in enumerate(grads) if g.dtype == dtype]
            torch._fused_adam_(
                [out[i] for i in idx],
                [grads[i] for i in idx],
                [olds[i] for i in idx],
                [exp_avg_sqs[i] for i in idx],
                [],
                [counters[i] for i in idx],
                lr=-1.0,
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )
        return out
    steps = to_host(counters)  # host tensors (as torch.optim.Adam keeps them): no device sync
    if exp_avgs is None:
        exp_avgs = [_state(st, "graft_exp_avg", g) for st, g in zip(states, grads, strict=True)]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    else:
        for st, m in zip(states, exp_avgs, strict=True):
            st["graft_exp_avg"] = m
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in steps])
    torch._foreach_add_(denom, eps)
    out = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(out, [1 - beta1**t for t in steps])
    return list(out)


def _with_coupled_decay(
    opt: CurvatureOptimizer, params: list[Tensor], g: list[Tensor], weight_decay: float
) -> list[Tensor]:
    """``g`` plus ``weight_decay · p`` when the weight decay is coupled (L2), else ``g``."""
    if weight_decay != 0 and not opt.decoupled_weight_decay and params:
        return list(torch._foreach_add(g, params, alpha=weight_decay))
    return g


def graft_moments(
    opt: CurvatureOptimizer, grads: Mapping[Tensor, Tensor], *, l2_applied: bool
) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor]]:
    """With ``graft="adam"`` and ``graft_moment``: what the curvature preconditions.

    Returns ``(m̂, m)``: per parameter with a gradient, Adam's bias-corrected first moment
    after this step's gradient, and the moment itself, computed out of place (the state
    is untouched: :func:`graft_directions` stores ``m`` for the parameters it grafts, so
    a step skipped in between leaves the moments as they were). ``l2_applied``: the
    coupled weight decay is already in ``grads``.
    """
    beta1 = opt.config.graft_betas[0]
    hats: dict[Tensor, Tensor] = {}
    moments: dict[Tensor, Tensor] = {}
    for group in opt.param_groups:
        params = [p for p in group["params"] if p in grads]
        if not params:
            continue
        decay = 0.0 if l2_applied else group["weight_decay"]
        g = _with_coupled_decay(opt, params, [grads[p] for p in params], decay)
        states = [opt.state[p] for p in params]
        old = [
            st["graft_exp_avg"] if "graft_exp_avg" in st else torch.zeros_like(p)
            for st, p in zip(states, params, strict=True)
        ]
        new = torch._foreach_lerp(old, g, 1 - beta1)
        steps = [float(st["graft_step"]) + 1 if "graft_step" in st else 1.0 for st in states]
        hat = torch._foreach_div(new, [1 - beta1**t for t in steps])
        for p, m, h in zip(params, new, hat, strict=True):
            moments[p], hats[p] = m, h
    return hats, moments


def graft_directions(
    opt: CurvatureOptimizer,
    group: dict[str, Any],
    grads: Mapping[Tensor, Tensor],
    directions: Mapping[Tensor, Tensor],
    preconditioned: Collection[Tensor],
    *,
    weight_decay: float,
    moments: Mapping[Tensor, Tensor] | None = None,
    l2_in_directions: bool = False,
) -> tuple[dict[Tensor, Tensor], float]:
    """The grafted directions of ``group``'s parameters, and the weight decay left to the
    base update.

    ``grads`` are the raw gradients, ``directions`` the (partly) preconditioned ones,
    ``preconditioned`` the parameters whose direction came from the curvature. With
    ``graft="adam"`` the parameters without such a direction are updated here, by Adam
    itself (one ``torch.optim.Adam`` update over all of them), and left out of the result.
    ``moments``: Adam's new first moments from :func:`graft_moments`, when the directions
    are the preconditioned ``m̂``: they are stored for the preconditioned parameters (and
    the coupled weight decay, already in ``m̂``, is not added to the directions again).
    ``l2_in_directions``: the directions hold the coupled weight decay already (a base
    update's own step, :func:`apply_grafted_base`).
    Every stage is one multi-tensor operation over the group's parameters; the norm ratios
    stay on the device.
    """
    cfg = opt.config
    graft, betas, eps = cfg.graft, cfg.graft_betas, cfg.graft_eps
    coupled = weight_decay != 0 and not opt.decoupled_weight_decay
    left = 0.0 if coupled else weight_decay
    params = [p for p in group["params"] if p in directions]
    if graft == "adam" and capturing():
        raise RuntimeError(
            "graft='adam' keeps Adam's step counts on the host (as torch.optim.Adam does "
            "without capturable=True): a step captured in a CUDA graph would replay the bias "
            "correction of the captured step. Capture steps with graft=None, 'sgd', "
            "'rmsprop' or 'adagrad'"
        )
    if graft == "adam":
        alone = [p for p in params if p not in preconditioned]
        if alone:
            states = [opt.state[p] for p in alone]
            for st, p in zip(states, alone, strict=True):
                for key in ("graft_exp_avg", "graft_exp_avg_sq"):
                    _state(st, key, p)
                st.setdefault("graft_step", torch.tensor(0.0))
            adam_update(
                alone,
                [grads[p] for p in alone],
                [st["graft_exp_avg"] for st in states],
                [st["graft_exp_avg_sq"] for st in states],
                [st["graft_step"] for st in states],
                lr=group["lr"],
                beta1=betas[0],
                beta2=betas[1],
                eps=eps,
                weight_decay=weight_decay,
                decoupled=opt.decoupled_weight_decay,
            )
            params = [p for p in params if p in preconditioned]
    out: dict[Tensor, Tensor] = {}
    if not params:
        return out, left
    g = _with_coupled_decay(opt, params, [grads[p] for p in params], weight_decay)
    new_moments = None if moments is None else [moments[p] for p in params]
    steps = _grafted_step(graft, [opt.state[p] for p in params], g, betas, eps, new_moments)
    scaled = [i for i, p in enumerate(params) if p in preconditioned]
    for i, p in enumerate(params):
        out[p] = steps[i]
    if scaled:
        u = [directions[params[i]] for i in scaled]
        if new_moments is None and not l2_in_directions:  # else the L2 term is in u already
            u = _with_coupled_decay(opt, [params[i] for i in scaled], u, weight_decay)
        # no host synchronisation: the ratios stay tensors. A zero direction stays zero: its
        # ratio ‖a‖/tiny may overflow to inf (Adam's momentum moves a parameter whose
        # gradient, and so whose raw preconditioned direction, is zero), and inf·0 is NaN,
        # so the ratios are capped at the largest finite value
        grafted = [steps[i] for i in scaled]
        if cfg.graft_norm == "row":
            norms = [_row_norms(t) for t in u]
            grafted_norms = [_row_norms(t) for t in grafted]
        else:
            norms = torch._foreach_norm(u)
            grafted_norms = torch._foreach_norm(grafted)
        torch._foreach_clamp_min_(norms, [torch.finfo(t.dtype).tiny for t in u])
        ratios = torch._foreach_div(grafted_norms, norms)
        torch._foreach_clamp_max_(ratios, [torch.finfo(t.dtype).max for t in u])
        for i, d in zip(scaled, torch._foreach_mul(u, ratios), strict=True):
            out[params[i]] = d
    return out, left


def apply_grafted_base(
    opt: CurvatureOptimizer,
    group: dict[str, Any],
    grads: Mapping[Tensor, Tensor],
    steps: Mapping[Tensor, Tensor],
    *,
    weight_decay: float,
) -> None:
    """Graft the steps of a base update that reads the curvature itself (AdaFisher's
    ``"momentum"``, AdaHessian's ``"adahessian"``) and apply them.

    ``steps`` are the base's own steps ``u`` (before the learning rate, coupled weight
    decay inside) of the parameters it has a curvature for; the others of ``group`` with a
    gradient in ``grads`` take the grafted method's step (``graft="adam"``: Adam's own
    update). Each ``u`` takes the norm of the grafted method's step (per parameter or per
    row, ``graft_norm``), then ``w ← w (1 − lr·wd) − lr·d`` (the decay: decoupled only).
    """
    out, left = graft_directions(
        opt,
        group,
        grads,
        {**grads, **steps},
        steps,
        weight_decay=weight_decay,
        l2_in_directions=True,
    )
    if not out:
        return
    params = list(out)
    lr = group["lr"]
    if left != 0:
        torch._foreach_mul_(params, 1 - lr * left)
    torch._foreach_add_(params, [out[p] for p in params], alpha=-lr)

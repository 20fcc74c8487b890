"""AdaHessian: Adam-style moments of a Hutchinson estimate of the Hessian diagonal
(Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, 2021, https://arxiv.org/abs/2006.00719).

The curvature is the diagonal of the Hessian itself, estimated from Hessian-vector products
with Rademacher probes ``v`` (``E[v ⊙ Hv] = diag H``). A Hessian-vector product needs the
gradient's own graph, so the backward pass of a step that estimates the Hessian must be
``loss.backward(create_graph=True)``; :attr:`AdaHessian.needs_hessian` says which steps do.

Not every PyTorch operation can be differentiated twice. The fused kernels of
``F.scaled_dot_product_attention`` cannot: :meth:`AdaHessian.hessian_graph` (applied to the
model's own forward passes automatically) switches attention to the math backend, which can.
For the others (``nn.Hardsigmoid``, ``nn.EmbeddingBag``, ...) the Hessian-vector product
raises a ``RuntimeError`` naming the operation and the way out (:func:`hutchinson_diagonal`).

AdaHessian is a :class:`~secondorder.CurvatureOptimizer`: :class:`AdaHessianEstimator`
(``needs_graph``: it differentiates the gradients' graph in ``update``) keeps ``D``, and the
``"adahessian"`` base update (:class:`~secondorder.base_updates.HessianAdamBase`, its core
:func:`adahessian_update`) is Adam whose second moment averages ``D²``
(:meth:`~secondorder.estimators.base.CurvatureEstimator.second_moment`). Its
hyperparameters (betas, eps, Hessian power) are per param group, as in ``torch.optim.Adam``.
"""

from __future__ import annotations

import contextlib
import numbers
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._checks import Interval, Schedule, check_interval, is_due
from .._host import to_host
from ..base_updates import adahessian_update
from ..config import OptimizerConfig, fixed, hyperparameter
from ..distributed import Communicator
from ..layers import LayerHelper
from ..optimizer import CurvatureOptimizer
from .base import CurvatureEstimator, NonFiniteStatistics

__all__ = [
    "AdaHessian",
    "AdaHessianConfig",
    "AdaHessianEstimator",
    "adahessian_update",
    "hutchinson_diagonal",
]

#: stands for ``lr`` not given (the config's, or the default)

# ---- operations without a second derivative ---------------------------------------------
# PyTorch's two wordings: "derivative for aten::OP is not implemented" and "the derivative
# for 'OP' is not implemented."
_NO_DOUBLE_BACKWARD = re.compile(
    r"derivative for (?:aten::)?'?(?P<op>[\w.]+?)'? is not implemented"
)
_ONCE_DIFFERENTIABLE = "marked with @once_differentiable"
_MATH_ATTENTION = (
    "run the forward pass with the math backend, which autograd can differentiate twice: "
    "AdaHessian(model, ...) does it for the model's own forward passes before a Hessian step "
    "(math_attention=True, the default when given the model); wrap any other forward pass in "
    "`with opt.hessian_graph():` (or torch.nn.attention.sdpa_kernel(SDPBackend.MATH))"
)
#: (part of PyTorch's operator name, what the user wrote, the way out), checked on torch 2.14
_KNOWN_OPS = (
    (
        "scaled_dot_product",
        "a fused kernel of F.scaled_dot_product_attention (nn.TransformerEncoderLayer, "
        "nn.MultiheadAttention with need_weights=False, timm's ViT)",
        _MATH_ATTENTION,
    ),
    (
        "hardsigmoid",
        "nn.Hardsigmoid / F.hardsigmoid (e.g. the squeeze-excite gates of timm's MobileNetV3)",
        "replace it by the same function written with twice-differentiable operations, "
        "F.relu6(x + 3) / 6 (a module doing this in place of each nn.Hardsigmoid)",
    ),
    (
        "embedding_bag",
        "nn.EmbeddingBag / F.embedding_bag",
        "use nn.Embedding followed by the bag's reduction (.sum / .mean / .amax over the bag)",
    ),
    (
        "ctc_loss",
        "nn.CTCLoss / F.ctc_loss",
        "PyTorch has no twice-differentiable CTC loss: give those steps the diagonal with "
        "opt.set_hessian_diagonal(...) or use another optimizer for this loss",
    ),
    (
        "margin_loss",
        "nn.MultiMarginLoss / nn.MultiLabelMarginLoss",
        "write the margin with F.relu / clamp (e.g. F.relu(margin - x[y] + x).pow(p)), "
        "which autograd differentiates twice",
    ),
    (
        "cudnn_rnn",
        "cuDNN's RNN / LSTM / GRU kernels (CUDA)",
        "run the forward pass under torch.backends.cudnn.flags(enabled=False)",
    ),
)


def _explain_missing_second_derivative(err: RuntimeError) -> RuntimeError | None:
    """A ``RuntimeError`` naming the operation without a double backward and the way out,
    or None when ``err`` is not PyTorch's "derivative ... is not implemented"."""
    text = str(err)
    match = _NO_DOUBLE_BACKWARD.search(text)
    if match is None and _ONCE_DIFFERENTIABLE not in text:
        return None
    if match is None:
        op = "a torch.autograd.Function marked @once_differentiable"
        what = op
    else:
        op = match.group("op")
        what = f"PyTorch's {op}"
    fix = (
        "write that part of the model with operations autograd can differentiate twice "
        "(an autograd.Function's backward from differentiable torch operations, without "
        "@once_differentiable)"
    )
    for key, known, way_out in _KNOWN_OPS:
        if key in op:
            what, fix = f"{known} (PyTorch's {op})", way_out
            break
    return RuntimeError(
        f"AdaHessian: the Hessian-vector product differentiates the backward pass of {what} "
        f"again, and PyTorch has no derivative for it. Way out: {fix}. The README's "
        f"AdaHessian conventions list the known cases. (PyTorch said: {text.splitlines()[0]})"
    )


# ---- the Hutchinson estimate -------------------------------------------------------------
def rademacher_like(
    param: Tensor, generator: torch.Generator | None = None, *, device: torch.device | None = None
) -> Tensor:
    """A tensor of ``param``'s shape and dtype with independent ±1 entries.

    Drawn with ``torch.randint(0, 2, ...)`` on ``generator``'s device (``param``'s when no
    generator is given) and moved to ``param``'s device.
    """
    if device is None:
        device = param.device if generator is None else generator.device
    bits = torch.randint(0, 2, param.shape, generator=generator, device=device, dtype=param.dtype)
    return bits.mul_(2).sub_(1).to(param.device)


def hutchinson_diagonal(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    *,
    retain_graph: bool = False,
) -> list[Tensor]:
    r"""Hutchinson's estimate of the Hessian diagonal, ``mean over probes of v ⊙ Hv``.

    .. math::
        \hat D = \frac1n \sum_{i=1}^{n} v_i \odot H v_i, \qquad
        H v = \frac{\partial (g^\top v)}{\partial w}, \quad v_i \sim \text{Rademacher}

    It is unbiased (``E[v ⊙ Hv] = diag H``); with one probe the variance of coordinate
    ``j`` is ``Σ_{k≠j} H_jk²``, and ``n`` probes divide it by ``n``. The estimate is
    *signed*, as the definition has it (AdaHessian takes ``|·|`` afterwards).

    Probes are drawn probe by probe, parameter by parameter in the order given, each with
    ``torch.randint(0, 2, p.shape, generator=generator, dtype=p.dtype) * 2 - 1`` on the
    generator's device: a seeded generator makes the estimate reproducible.

    Args:
        params (sequence of Tensor): the parameters ``w``.
        grads (sequence of Tensor): their gradients, computed with ``create_graph=True``
            (e.g. ``p.grad`` after ``loss.backward(create_graph=True)``). A gradient
            without a graph does not depend on any parameter: its Hessian rows are zero.
        n_probes (int, optional): number of probes averaged (default: 1).
        generator (torch.Generator, optional): random source of the probes
            (default: None, PyTorch's global generator).
        retain_graph (bool, optional): keep the gradients' graph after the last probe,
            to call this again on the same gradients (default: False: it is freed).

    Returns:
        list[Tensor]: the estimate, one tensor per parameter, detached.

    Raises:
        RuntimeError: no gradient carries a graph (``create_graph=True`` was not used); or
            the graph holds an operation PyTorch cannot differentiate twice (the message
            names it and the way out; for ``F.scaled_dot_product_attention`` run the
            forward pass under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``).
    """
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} parameters but {len(grads)} gradients")
    if not isinstance(n_probes, numbers.Integral) or isinstance(n_probes, bool) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int, got {n_probes!r}")
    linked = [i for i, g in enumerate(grads) if g.requires_grad]
    if not linked:
        raise RuntimeError(
            "hutchinson_diagonal: the gradients carry no graph; compute them with "
            "loss.backward(create_graph=True) or torch.autograd.grad(..., create_graph=True)"
        )
    totals = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
    outputs = [grads[i] for i in linked]
    with torch.enable_grad():
        for probe in range(n_probes):
            vs = [rademacher_like(p, generator) for p in params]
            try:
                hvs = torch.autograd.grad(
                    outputs,
                    params,
                    grad_outputs=[vs[i] for i in linked],
                    retain_graph=retain_graph or probe < n_probes - 1,
                    allow_unused=True,
                )
            except RuntimeError as err:
                explained = _explain_missing_second_derivative(err)
                if explained is None:
                    raise
                raise explained from err
            for total, v, hv in zip(totals, vs, hvs, strict=True):
                if hv is not None:
                    total.addcmul_(v, hv.detach())
    if n_probes > 1:
        for total in totals:
            total.div_(n_probes)
    return totals


def average_spatial_dims(diag: Tensor) -> Tensor:
    """Average over every dim after the first two, keeping them (size 1): the
    ``(out, in)`` entries of a conv kernel share the mean over its ``kh x kw`` window."""
    if diag.dim() < 3:
        return diag
    return diag.mean(dim=tuple(range(2, diag.dim())), keepdim=True)


def _hook_math_attention(module: nn.Module, optimizer: weakref.ref) -> list[Any]:
    """Hooks that run each ``module(...)`` call inside ``optimizer().hessian_graph()``.

    The optimizer is held weakly (the model must not keep a dropped optimizer alive, nor
    go on using the slow attention for it); the contexts are a stack, so that a module
    called inside its own forward pass unwinds in order, and the exit hook runs even when
    the forward pass raises."""
    entered: list[contextlib.AbstractContextManager] = []

    def enter(_module: nn.Module, _args: Any) -> None:
        opt = optimizer()
        context = opt.hessian_graph() if opt is not None else contextlib.nullcontext()
        context.__enter__()
        entered.append(context)

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
        if entered:
            entered.pop().__exit__(None, None, None)

    return [
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
    ]


# ---- the config ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class AdaHessianConfig(OptimizerConfig):
    """AdaHessian's hyperparameters (see :class:`AdaHessian`). The defaults are the paper's
    but for the step size and β₁: Adam grafting (``graft="adam"``) at lr 3e-2 with β₁ 0.8,
    chosen by measurement (``secondorder/docs/adahessian.md``); ``graft=None, lr=0.15,
    betas=(0.9, 0.999)`` is the paper's update (``configs/optimizers/adahessian.yaml``)."""

    lr: float = hyperparameter(
        3e-2,
        "learning rate: Adam's, with the default graft (the paper's 0.15 is for graft=None). "
        "3e-2: on the six offline tasks of benchmarks/lr_sensitivity.py (3 seeds) every seed "
        "reached the target at it on all six (at 1e-2: five, none on toy-classification)",
    )
    graft: str | None = hyperparameter(
        "adam",
        "each parameter's step takes the norm of Adam's step and keeps AdaHessian's direction "
        "m̂ / ((√v̂)^k + eps) (secondorder.grafting; ``graft_norm``, ``graft_betas``, "
        "``graft_eps`` as for every optimizer); None: the paper's update",
    )
    betas: tuple[float, float] = hyperparameter(
        (0.8, 0.999),
        "decay of the gradient moment ``m`` and of the squared-Hessian moment ``v``. β₁ 0.8 "
        "(the paper's 0.9, kept in configs/optimizers/adahessian.yaml), by measurement with "
        "the default graft: Adam's number of good lrs or more on all six tasks of "
        "benchmarks/lr_sensitivity.py (the autoencoder's 1 → 3), and at Adam's best lr a final "
        "loss at or below Adam's on four (with 0.9: three)",
    )
    eps: float = hyperparameter(1e-4, "added to the denominator, > 0")
    weight_decay: float = hyperparameter(0.0, "decoupled weight decay, AdamW-style, >= 0")
    hessian_power: float = hyperparameter(
        1.0,
        "``k`` in ``[0, 1]``: the denominator is ``(√v̂)^k + eps``; 0 leaves bias-corrected "
        "momentum SGD, ``lr·m̂/(1 + eps)``",
    )
    n_probes: int = hyperparameter(1, "Rademacher probes per Hessian estimate, averaged")
    hessian_every: Interval = hyperparameter(
        1,
        "estimate the Hessian at steps that are multiples of this (or a callable of the "
        "step), reuse the last estimate in between",
    )
    spatial_average: bool = hyperparameter(
        True, "average ``D`` over the spatial dims of weights with ``dim >= 3``"
    )
    seed: int | None = hyperparameter(
        0,
        "seed of the optimizer's own ``torch.Generator`` for the probes (saved in "
        "``state_dict``); None draws one from PyTorch's global generator",
    )
    math_attention: bool | None = hyperparameter(
        None,
        "run the model's forward passes with ``F.scaled_dot_product_attention``'s math "
        "backend while ``needs_hessian`` (None: on when given the model)",
    )
    base: str = fixed("adahessian")
    decoupled_weight_decay: bool = fixed(True)
    momentum: float | None = fixed(None)
    dampening: float = fixed(0.0)
    nesterov: bool = fixed(False)
    # AdaHessian regularises with eps; the base's damping schedule is not read
    damping: Schedule = fixed(1e-3)
    # the estimator keeps its own schedule (hessian_every) and is asked at every step
    curvature_every: Interval = fixed(1)
    inverse_every: Interval = fixed(1)
    inverse_warmup: bool = fixed(False)
    kl_clip: float | None = fixed(None)
    skip_layers: Iterable[Any] | None = fixed(None)
    layer_options: Mapping[str, Any] | None = fixed(None)
    record_in_eval: bool = fixed(False)
    fisher_type: str = fixed("empirical")
    likelihood: str | None = fixed(None)
    likelihood_sigma: float | None = fixed(None)

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        super().__post_init__()
        if (
            not isinstance(self.n_probes, numbers.Integral)
            or isinstance(self.n_probes, bool)
            or self.n_probes < 1
        ):
            raise ValueError(f"n_probes must be a positive int, got {self.n_probes!r}")
        self.n_probes = int(self.n_probes)
        self.hessian_every = check_interval("hessian_every", self.hessian_every)
        if not isinstance(self.spatial_average, bool):
            raise TypeError(
                f"spatial_average must be a bool, got {type(self.spatial_average).__name__}"
            )
        if self.seed is not None and (
            not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool)
        ):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.math_attention is not None and not isinstance(self.math_attention, bool):
            raise TypeError(
                f"math_attention must be a bool or None, got {type(self.math_attention).__name__}"
            )


# ---- the estimator ------------------------------------------------------------------------
class AdaHessianEstimator(CurvatureEstimator):
    """The Hessian diagonal ``D = mean_spatial |mean v ⊙ Hv|`` of every parameter, from
    Hutchinson's estimate (:func:`hutchinson_diagonal`) on the gradients' graph
    (``needs_graph``), at the steps ``hessian_every`` says, and in between for parameters
    without a ``D`` yet; diagonals given with :meth:`set_hessian_diagonal` take the
    estimate's place. The ``"adahessian"`` base update averages ``D²``
    (:meth:`second_moment`).

    Args:
        params (list[Tensor]): the parameters, in the optimizer's order.
        names (list[str]): their names, for messages.
        config (AdaHessianConfig): ``n_probes``, ``hessian_every``, ``spatial_average``,
            ``seed`` (None: drawn from PyTorch's global generator).
    """

    requires_capture = False
    needs_graph = True
    acts_on = "second_moment"

    def __init__(
        self, params: Sequence[Tensor], names: Sequence[str], config: AdaHessianConfig
    ) -> None:
        super().__init__([])
        self._params = list(params)
        self.names = dict(zip(self._params, names, strict=True))
        self.n_probes = config.n_probes
        self.hessian_every = config.hessian_every
        self.spatial_average = config.spatial_average
        seed = config.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.seed = int(seed)
        self.generator = torch.Generator(device=self._params[0].device).manual_seed(self.seed)
        #: the ``D`` of each parameter (``|·|`` and spatially averaged), the last estimate
        self.diagonals: dict[Tensor, Tensor] = {}
        #: signed diagonals given with :meth:`set_hessian_diagonal`, for the next step
        self.given: dict[Tensor, Tensor] = {}
        self._comm: Communicator | None = None
        self._hessian_due = False

    @property
    def params(self) -> list[Tensor]:
        return list(self._params)

    @property
    def comm(self) -> Communicator | None:  # type: ignore[override]
        """The ranks of a distributed run: the probes are drawn with rank 0's seed."""
        return self._comm

    @comm.setter
    def comm(self, comm: Communicator | None) -> None:
        self._comm = comm
        if comm is not None:  # the same probes on every rank
            self.seed = comm.broadcast_int(self.seed)
            self.generator.manual_seed(self.seed)

    # ---- the schedule ---------------------------------------------------------------------
    def hessian_due(self, step: int) -> bool:
        """Whether ``hessian_every`` estimates the Hessian at ``step``."""
        return is_due("hessian_every", self.hessian_every, step)

    def needs_hessian(self, step: int) -> bool:
        """Whether ``step`` differentiates the gradients' graph: it is due and not every
        parameter that requires grad has a given diagonal."""
        return self.hessian_due(step) and any(
            p.requires_grad and p not in self.given for p in self._params
        )

    def wants_statistics(self, step: int, *, curvature_due: bool, refresh_due: bool) -> bool:
        # Asked about the step that update() absorbs next: remember whether it estimates.
        self._hessian_due = self.hessian_due(step)
        return (
            self._hessian_due
            or bool(self.given)
            or self.comm is not None  # every rank averages at every step
            or any(p.requires_grad and p not in self.diagonals for p in self._params)
        )

    def set_hessian_diagonal(self, diagonals: Mapping[Tensor, Tensor]) -> None:
        """See :meth:`AdaHessian.set_hessian_diagonal`."""
        checked: dict[Tensor, Tensor] = {}
        for p, diag in diagonals.items():
            if p not in self.names:
                shape = tuple(p.shape) if isinstance(p, Tensor) else p
                raise ValueError(
                    f"set_hessian_diagonal: a diagonal is given for a parameter of shape "
                    f"{shape} that this optimizer does not hold"
                )
            if not isinstance(diag, Tensor):
                raise TypeError(
                    f"set_hessian_diagonal: the diagonal of {self.names[p]} (shape "
                    f"{tuple(p.shape)}) must be a tensor, got {type(diag).__name__}"
                )
            if diag.shape != p.shape:
                raise ValueError(
                    f"set_hessian_diagonal: {self.names[p]} has shape {tuple(p.shape)}; its "
                    f"diagonal must have that shape, got {tuple(diag.shape)}"
                )
            checked[p] = diag.detach().to(device=p.device, dtype=p.dtype, copy=True)
        self.given.update(checked)

    # ---- the protocol -----------------------------------------------------------------------
    def update(self, stats: Mapping[Tensor, Tensor]) -> None:
        """Estimate ``D`` from the gradients ``stats`` (with their graph) where due, take
        the given diagonals, average across the ranks, and keep the result. A non-finite
        estimate raises :class:`NonFiniteStatistics` with nothing changed (the probe
        generator rewound); a due estimate without a graph raises ``RuntimeError``."""
        grads = stats
        due = self._hessian_due
        signed = {p: self.given[p] for p in grads if p in self.given}
        wanted = [p for p in grads if p not in signed and (due or p not in self.diagonals)]
        # A skipped step must not consume probes either: the generator is rewound on a skip,
        # so that the run goes on exactly as if the step had never been attempted.
        generator_state = self.generator.get_state()
        if wanted:
            if not any(grads[p].requires_grad for p in wanted):
                first = "" if due else f" ({', '.join(self.names[p] for p in wanted)} had none yet)"
                raise RuntimeError(
                    f"AdaHessian: this step estimates the Hessian diagonal{first}, but the "
                    "gradients carry no graph. Call loss.backward(create_graph=True) before "
                    "optimizer.step() on steps where optimizer.needs_hessian is True (a plain "
                    "loss.backward() is enough on the others), or give the diagonal with "
                    "optimizer.set_hessian_diagonal({param: tensor}) before this step."
                )
            diags = hutchinson_diagonal(
                wanted, [grads[p] for p in wanted], self.n_probes, self.generator
            )
            scale = self.loss_scale
            for p, diag in zip(wanted, diags, strict=True):
                signed[p] = diag if scale == 1.0 else diag / scale
        if self.comm is not None:
            self._average_across_ranks(grads, signed)
        fresh = {}
        for p, diag in signed.items():
            diag = diag.abs()
            fresh[p] = average_spatial_dims(diag) if self.spatial_average else diag
        finite = to_host([torch.isfinite(d).all() for d in fresh.values()]) if fresh else []
        bad = [p for p, ok in zip(fresh, finite, strict=True) if not ok]
        if bad:
            self.generator.set_state(generator_state)
            raise NonFiniteStatistics("Hessian estimate", bad)
        self.diagonals.update(fresh)
        self.given.clear()

    def _average_across_ranks(
        self, grads: Mapping[Tensor, Tensor], signed: dict[Tensor, Tensor]
    ) -> None:
        """Average the signed estimates over the ranks, in place."""
        index = {p: i for i, p in enumerate(self._params)}
        layout = torch.zeros(len(index), dtype=torch.float64)
        for p in signed:
            layout[index[p]] = 1.0
        if not self.comm.same_everywhere(layout):
            raise RuntimeError(
                "AdaHessian (distributed): the ranks disagree on which parameters have a "
                "Hessian estimate at this step; every rank must run the same model on its "
                "own batch"
            )
        ordered = [p for p in self._params if p in signed]
        means = self.comm.average([signed[p] for p in ordered])
        signed.update(zip(ordered, means, strict=True))

    def refresh(self, damping: float) -> None:
        """Nothing to recompute: ``D`` is used as estimated."""

    def second_moment(self, param: Tensor) -> Tensor | None:
        return self.diagonals.get(param)

    # ---- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The probe generator's state and the given diagonals not used yet (by parameter
        index). ``D`` itself is saved by the optimizer, as each parameter's
        ``hessian_diag`` (see :meth:`AdaHessian.load_state_dict`)."""
        index = {p: i for i, p in enumerate(self._params)}
        return {
            "generator": self.generator.get_state(),
            "given": {index[p]: d for p, d in self.given.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        given = {}
        for i, diag in state.get("given", {}).items():
            i = int(i)
            if not 0 <= i < len(self._params):
                raise ValueError(
                    f"AdaHessian state has a given Hessian diagonal for parameter index {i}; "
                    f"this optimizer has {len(self._params)} parameters"
                )
            p = self._params[i]
            if tuple(diag.shape) != tuple(p.shape):
                raise ValueError(
                    f"AdaHessian state has a given Hessian diagonal of shape "
                    f"{tuple(diag.shape)} for parameter {self.names[p]} of shape "
                    f"{tuple(p.shape)}; was it saved from a different model?"
                )
            given[p] = diag.to(device=p.device, dtype=p.dtype)
        self.generator.set_state(state["generator"].cpu())
        self.given = given


# ---- the optimizer -----------------------------------------------------------------------
class AdaHessian(CurvatureOptimizer):
    r"""AdaHessian (Yao et al., 2021): Adam with the squared Hessian diagonal in place of
    the squared gradient.

    At step ``t`` (1-based per parameter), with ``g`` the gradient and ``D`` the curvature:

    .. math::
        \begin{aligned}
        \hat D &= \tfrac1n \textstyle\sum_i v_i \odot H v_i,\ v_i \sim \text{Rademacher}
            &&\text{(Hutchinson, every } \texttt{hessian\_every} \text{ steps)}\\
        D &= \operatorname{mean}_{\text{spatial}} |\hat D|
            &&\text{(dims} \geq 2 \text{ of a weight with dim} \geq 3)\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) D^2 \\
        w_t &= w_{t-1} - \text{lr}\Bigl(\frac{m_t/(1-\beta_1^t)}
            {\bigl(\sqrt{v_t/(1-\beta_2^t)}\bigr)^k + \epsilon} + \text{wd}\; w_{t-1}\Bigr)
        \end{aligned}

    **Which backward passes need a graph.** A step whose index (0-based, skipped steps
    not counted) is a multiple of ``hessian_every`` computes ``Hv`` from the gradients'
    graph: call ``loss.backward(create_graph=True)`` before it. :attr:`needs_hessian` is
    True exactly then (False when :meth:`set_hessian_diagonal` supplied every diagonal
    instead). Other steps reuse the last ``D`` (``v`` still absorbs ``D²`` every step) and
    accept a plain ``loss.backward()``; a graph, if present, is simply released. One
    exception: a parameter that receives its first gradient at such a step has no ``D``
    yet, so that step needs the graph too (else a ``RuntimeError`` names the parameter).

    **Memory.** ``backward(create_graph=True)`` makes a reference cycle
    (parameter → ``.grad`` → graph → parameter; PyTorch warns about it). :meth:`step`
    breaks it: after the Hessian-vector products it replaces every ``p.grad`` by a
    detached copy, which frees the graph. If you skip :meth:`step` after such a backward
    pass, clear the gradients with ``zero_grad(set_to_none=True)`` (the default) yourself.

    **Absolute value and spatial averaging.** The paper squares the (spatially averaged)
    estimate, so for a parameter without spatial averaging ``|·|`` changes nothing; for conv
    kernels we average ``|v ⊙ Hv|`` as the authors' code does (the paper's formula averages
    the signed values, which can cancel). With ``n_probes > 1`` the signed estimates are
    averaged first (that mean is the unbiased estimate) and ``|·|`` applies to it.
    ``spatial_average`` applies to every parameter with ``dim >= 3`` (``Conv1d/2d/3d``
    weights ``(out, in, *kernel)``): ``D`` is averaged over all dims after the first two,
    so the ``(out, in)`` structure is kept; parameters with ``dim <= 2`` are untouched.

    **Distributed.** DDP cannot run the double backward: do not wrap the model in
    ``DistributedDataParallel``. With ``distributed`` every rank back-propagates its own
    batch with ``create_graph=True`` and :meth:`step` averages the gradients and the signed
    Hessian estimates across the ranks of ``process_group``, with the same probes on every
    rank (the seed is rank 0's), so every rank takes the update of the concatenated batch.

    **Non-finite values.** ``nonfinite="skip"`` skips a step whose gradient or Hessian
    estimate has a NaN/Inf, leaving parameters, moments, the last ``D``, the step count and
    the probe generator untouched (counted in :attr:`skipped_steps`, with a warning);
    ``"raise"`` raises ``FloatingPointError`` naming the parameters.

    **AMP.** ``scaler.step(opt)`` hands AdaHessian the scale: it unscales the gradients
    and the Hessian-vector products and skips overflow steps. ``grad_scaler`` is needed
    only when you call ``scaler.unscale_(opt)`` before ``scaler.step(opt)``: the gradients'
    graph still carries the scale then.

    **math_attention.** Given the model, AdaHessian runs its forward passes (calls of
    ``model(...)``) with ``F.scaled_dot_product_attention``'s math backend while
    :attr:`needs_hessian` and gradients are enabled, i.e. exactly the passes whose graph
    the next step differentiates twice (the fused kernels cannot be); other passes keep the
    fast kernels. A forward pre-hook and a forward hook on the model do it
    (:meth:`remove_hooks` detaches them); :meth:`hessian_graph` does the same for forward
    passes that are not ``model(...)``.

    **Curvature off.** With ``precondition=False`` (or at a step ``use_curvature`` switches
    off) the update is ``torch.optim.AdamW``'s (``torch.optim.Adam``'s without weight
    decay) on the raw gradient, with its own second moment ``exp_avg_sq`` (under the Adam
    graft, the graft's ``graft_exp_avg_sq``).

    Args:
        model (nn.Module or iterable): the model (its parameters that require grad) or
            parameters / param-group dicts, as for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate (default: 3e-2, Adam's under the default
            ``graft="adam"``; the paper's 0.15 goes with ``graft=None``).
        params (iterable, optional): parameters or param-group dicts of ``model``.
        config (AdaHessianConfig, optional): the hyperparameters as a config.

    ``lr``, ``betas``, ``eps``, ``weight_decay`` and ``hessian_power`` may differ per param
    group.

    Attributes:
        skipped_steps (int): steps skipped because of non-finite values.
        estimator (AdaHessianEstimator or None): the Hessian-diagonal estimate.

    Example::

        opt = AdaHessian(model)  # Adam's step norms, lr 3e-2; the paper's: configs/optimizers
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward(create_graph=opt.needs_hessian)
            opt.step()
    """

    config_class = AdaHessianConfig
    requires_model = False

    def attach(self, model: nn.Module | None) -> None:
        """Hook the model's attention modules for the math backend (``math_attention``)."""
        math_attention = self.config.math_attention
        if math_attention and model is None:
            raise ValueError(
                "math_attention=True needs the model (AdaHessian(model, ...)) to hook its "
                "forward passes; with parameters, wrap the forward pass in "
                "`with opt.hessian_graph():`"
            )
        self._hooks: list[Any] = []
        if model is not None and math_attention is not False:
            self._hooks = _hook_math_attention(model, weakref.ref(self))

    def build_estimator(
        self, layers: list[LayerHelper], params: list[nn.Parameter]
    ) -> AdaHessianEstimator:
        names = [self._names[p] for p in params]
        return AdaHessianEstimator(params, names, self.config)

    # ---- the forward pass ------------------------------------------------------------------
    def hessian_graph(self) -> contextlib.AbstractContextManager:
        """A context for a forward pass whose graph the next :meth:`step` may differentiate
        twice: while :attr:`needs_hessian` and gradients are enabled, it runs
        ``F.scaled_dot_product_attention`` with the math backend
        (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``), whose backward autograd can
        differentiate; otherwise it does nothing and the fused kernels run. Given the
        model, AdaHessian applies it to every ``model(...)`` call itself
        (``math_attention``); use it around other forward passes::

            with opt.hessian_graph():
                loss = F.cross_entropy(model.encoder(x) @ head, y)
            loss.backward(create_graph=opt.needs_hessian)
        """
        if torch.is_grad_enabled() and self.needs_hessian:
            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def remove_hooks(self) -> None:
        """Detach the hooks of ``math_attention`` from the model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        super().remove_hooks()

    # ---- the schedule ----------------------------------------------------------------------
    @property
    def needs_hessian(self) -> bool:
        """Whether the next :meth:`step` estimates the Hessian, so that the backward pass
        before it must be ``loss.backward(create_graph=True)``: its index is a multiple of
        ``hessian_every`` and :meth:`set_hessian_diagonal` has not supplied the diagonal
        of every parameter that requires grad (False without curvature)."""
        est = self.estimator
        return est is not None and self.curvature_on() and est.needs_hessian(self.steps)

    def set_hessian_diagonal(self, diagonals: Mapping[Tensor, Tensor]) -> None:
        """Use these Hessian diagonals at the next step instead of Hutchinson's estimate.

        Each tensor takes the place of the estimate ``mean v ⊙ Hv``, so AdaHessian then
        takes ``|·|`` and the spatial average of it as it does of its own. Parameters not
        given are estimated (or reuse their last ``D``) as usual; a step at which every
        parameter has a given diagonal needs no ``create_graph``. The diagonals are used
        by the next step that is taken and then dropped (a skipped step keeps them).

        Args:
            diagonals (Mapping[Tensor, Tensor]): parameter -> tensor of its shape.

        Raises:
            ValueError: a parameter this optimizer does not hold, or a wrong shape; or
                the optimizer has no curvature (``precondition=False``).
            TypeError: a value is not a tensor.
        """
        if self.estimator is None:
            raise ValueError("set_hessian_diagonal needs curvature (precondition=True)")
        self.estimator.set_hessian_diagonal(diagonals)

    # ---- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The per-parameter state (``step``, ``exp_avg``, ``exp_hessian_diag_sq``, and the
        last estimate ``hessian_diag``, kept for the steps that reuse it) plus
        ``"curvature"``: the step counters, the probe generator's state and any diagonals
        given with :meth:`set_hessian_diagonal` and not yet used."""
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also one saved before AdaHessian was a
        :class:`~secondorder.CurvatureOptimizer`, with an ``"adahessian"`` entry); the next
        step continues the same trajectory, probes included."""
        state_dict = dict(state_dict)
        legacy = state_dict.pop("adahessian", None)
        if legacy is not None and "curvature" not in state_dict:
            state_dict["curvature"] = {
                "step": legacy["step"],
                "updates": legacy["step"],
                "refreshes": legacy["step"],
                "skipped_steps": legacy["skipped_steps"],
                "estimator": {"generator": legacy["generator"], "given": legacy["given"]},
            }
        if "curvature" not in state_dict:
            raise ValueError(
                "this state_dict has no 'curvature' entry: it was not saved by an AdaHessian"
            )
        self._check_saved_shapes(state_dict)
        super().load_state_dict(state_dict)
        if self.estimator is not None:  # D lives in the per-parameter state
            self.estimator.diagonals = {
                p: self.state[p]["hessian_diag"]
                for p in self.estimator.params
                if "hessian_diag" in self.state.get(p, {})
            }

    def _check_saved_shapes(self, state_dict: Mapping[str, Any]) -> None:
        """``ValueError`` naming the parameter when a saved moment, Hessian estimate or given
        diagonal does not fit this optimizer's parameter (a state saved from another model:
        ``torch.optim.Optimizer.load_state_dict`` checks only the number of parameters).
        Mismatched group sizes are left to it (its message names them)."""
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"])
            for saved, group in zip(groups, self.param_groups, strict=True)
        ):
            return
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in groups for i in g["params"]]
        saved_state = state_dict.get("state", {})

        def fits(value: Tensor, p: Tensor, broadcast: bool) -> bool:
            if not broadcast:
                return tuple(value.shape) == tuple(p.shape)
            # a spatially averaged estimate keeps size-1 dims
            return value.dim() == p.dim() and all(
                v in (1, s) for v, s in zip(value.shape, p.shape, strict=True)
            )

        def fail(p: Tensor, what: str, value: Tensor) -> None:
            raise ValueError(
                f"AdaHessian state has {what} of shape {tuple(value.shape)} for parameter "
                f"{self._names[p]} of shape {tuple(p.shape)}; was it saved from a different "
                "model?"
            )

        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in saved_state.get(saved_id, {}).items():
                if key not in ("step", "graft_step") and isinstance(value, Tensor):
                    if not fits(value, p, broadcast=key == "hessian_diag"):
                        fail(p, f"{key!r}", value)

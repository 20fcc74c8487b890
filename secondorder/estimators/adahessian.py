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

AdaHessian builds on ``torch.optim.Optimizer`` directly rather than on
:class:`~secondorder.CurvatureOptimizer`: its two moments are of *different* quantities (the
gradient, and the squared Hessian diagonal), which the base's Adam update over one
preconditioned direction cannot express, and its hyperparameters (betas, eps, Hessian power)
are per param group, as in ``torch.optim.Adam``. It shares the base's conventions: argument
checks, ``nonfinite="skip"``/``"raise"``, :attr:`~AdaHessian.steps`,
:attr:`~AdaHessian.skipped_steps`, and a ``state_dict`` that resumes the same trajectory.
"""

from __future__ import annotations

import contextlib
import numbers
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._checks import (
    Interval,
    caller_stacklevel,
    check_interval,
    check_number,
    checked_keywords,
    is_due,
)
from .._host import to_host
from ..distributed import Communicator, default_communicator
from ..optimizer import CurvatureOptimizer

__all__ = ["AdaHessian", "adahessian_update", "hutchinson_diagonal"]

_NONFINITE = ("skip", "raise")

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


# ---- the functional core -----------------------------------------------------------------
def adahessian_update(
    params: list[Tensor],
    grads: list[Tensor],
    hessians: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    hessian_power: float,
    weight_decay: float,
) -> None:
    r"""One AdaHessian update of ``params`` in place (state tensors too).

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) D^2, \quad
        w \leftarrow w - \text{lr}\Bigl(\frac{\hat m}{\hat v^{k/2} + \epsilon} + \text{wd}\, w\Bigr)

    with ``m̂ = m/(1 − β1^t)``, ``v̂ = v/(1 − β2^t)``, ``t`` the parameter's step count
    after the increment. ``hessians`` may have size-1 dims (a spatially averaged diagonal):
    they broadcast against the parameter.
    """
    for i, param in enumerate(params):
        exp_avg, exp_hessian_sq, step_t = exp_avgs[i], exp_hessian_sqs[i], steps[i]
        hessian = hessians[i]
        step_t += 1
        exp_avg.lerp_(grads[i], 1 - beta1)
        exp_hessian_sq.mul_(beta2).addcmul_(hessian, hessian, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = exp_hessian_sq / bias_correction2
        denom = denom.sqrt_() if hessian_power == 1 else denom.pow_(hessian_power / 2)
        denom.add_(eps)
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


# ---- the optimizer -----------------------------------------------------------------------
class AdaHessian(torch.optim.Optimizer):
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

    Args:
        model_or_params (nn.Module or iterable): the model (its parameters that require
            grad) or parameters / param-group dicts, as for any ``torch.optim`` optimizer.
        lr (float, optional): learning rate (default: 0.15, the paper's).
        betas (tuple[float, float], optional): decay of the gradient moment ``m`` and of the
            squared-Hessian moment ``v`` (default: (0.9, 0.999)).
        eps (float, optional): added to the denominator, > 0 (default: 1e-4).
        weight_decay (float, optional): decoupled weight decay, AdamW-style (default: 0).
        hessian_power (float, optional): ``k`` in ``[0, 1]``: the denominator is
            ``(√v̂)^k + eps``; 0 leaves bias-corrected momentum SGD, ``lr·m̂/(1 + eps)``
            (default: 1, the paper's range is [0, 1]).
        n_probes (int, optional): Rademacher probes per Hessian estimate, averaged
            (default: 1).
        hessian_every (int or callable, optional): estimate the Hessian at steps that are
            multiples of this, reuse the last estimate in between (default: 1).
        spatial_average (bool, optional): average ``D`` over the spatial dims of weights
            with ``dim >= 3`` (default: True).
        seed (int or None, optional): seed of the optimizer's own ``torch.Generator`` for
            the probes (on the first parameter's device); its state is saved in
            :meth:`state_dict`. None draws a seed from PyTorch's global generator
            (default: 0).
        nonfinite (str, optional): a step whose gradient or Hessian estimate has a NaN/Inf:
            ``"skip"`` leaves parameters, moments, the last ``D``, the step count and
            the probe generator untouched (counted in :attr:`skipped_steps`, with a
            warning), so the run goes on as if the step had not been tried; ``"raise"``
            raises ``FloatingPointError`` naming the parameters (default: ``"skip"``).
        distributed (bool, optional): data-parallel without DDP (which cannot run the
            double backward): every rank back-propagates its own batch with
            ``create_graph=True`` and :meth:`step` averages the gradients and the signed
            Hessian estimates across the ranks of ``process_group``, with the same probes
            on every rank (the seed is rank 0's), so every rank takes the update of the
            concatenated batch. Do not wrap the model in ``DistributedDataParallel``.
            None: when ``torch.distributed`` is initialised with more than one rank
            (default: None).
        process_group (ProcessGroup, optional): the ranks to average over (default: all).
        math_attention (bool or None, optional): run the model's forward passes (calls of
            ``model(...)``) with ``F.scaled_dot_product_attention``'s math backend while
            :attr:`needs_hessian` and gradients are enabled, i.e. exactly the passes whose
            graph the next step differentiates twice (the fused kernels, flash attention
            on the CPU, cannot be); other passes keep the fast kernels. A forward pre-hook
            and a forward hook on the model do it (:meth:`remove_hooks` detaches them);
            :meth:`hessian_graph` does the same for forward passes that are not
            ``model(...)``. None: on when given the model (default: None).
        grad_scaler (torch.amp.GradScaler, optional): only needed when you call
            ``scaler.unscale_(opt)`` before ``scaler.step(opt)``: AdaHessian supports AMP
            scaling itself (``scaler.step`` hands it the scale; it unscales the gradients
            and the Hessian-vector products and skips overflow steps, counted in
            :attr:`skipped_steps` without a warning), but after ``unscale_`` the
            gradients' graph still carries the scale (default: None).

    ``lr``, ``betas``, ``eps``, ``weight_decay`` and ``hessian_power`` may differ per param
    group.

    Attributes:
        skipped_steps (int): steps skipped because of non-finite values.

    Example::

        opt = AdaHessian(model, lr=0.15)
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward(create_graph=opt.needs_hessian)
            opt.step()
    """

    @checked_keywords
    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Any],
        lr: float = 0.15,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        n_probes: int = 1,
        hessian_every: Interval = 1,
        spatial_average: bool = True,
        seed: int | None = 0,
        nonfinite: str = "skip",
        distributed: bool | None = None,
        process_group: Any = None,
        math_attention: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if isinstance(model_or_params, nn.Module):
            module: nn.Module | None = model_or_params
            params: list[Any] = [p for p in module.parameters() if p.requires_grad]
        else:
            module, params = None, list(model_or_params)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "hessian_power": hessian_power,
        }
        super().__init__(params, defaults)  # add_param_group checks every group
        if not isinstance(n_probes, numbers.Integral) or isinstance(n_probes, bool) or n_probes < 1:
            raise ValueError(f"n_probes must be a positive int, got {n_probes!r}")
        self.n_probes = int(n_probes)
        self.hessian_every = check_interval("hessian_every", hessian_every)
        if not isinstance(spatial_average, bool):
            raise TypeError(f"spatial_average must be a bool, got {type(spatial_average).__name__}")
        self.spatial_average = spatial_average
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        elif not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")

        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        self.grad_scaler = grad_scaler
        self.comm: Communicator | None = default_communicator(distributed, process_group)
        if self.comm is not None:
            seed = self.comm.broadcast_int(int(seed))  # the same probes on every rank

        all_params = [p for g in self.param_groups for p in g["params"]]
        self._names = CurvatureOptimizer._param_names(module, all_params)
        self.generator = torch.Generator(device=all_params[0].device).manual_seed(int(seed))
        self.skipped_steps = 0
        self._step = 0
        self._given: dict[Tensor, Tensor] = {}  # set_hessian_diagonal, for the next step
        if math_attention is not None and not isinstance(math_attention, bool):
            raise TypeError(
                f"math_attention must be a bool or None, got {type(math_attention).__name__}"
            )
        if math_attention and module is None:
            raise ValueError(
                "math_attention=True needs the model (AdaHessian(model, ...)) to hook its "
                "forward passes; with parameters, wrap the forward pass in "
                "`with opt.hessian_graph():`"
            )
        self._hooks: list[Any] = []
        if module is not None and math_attention is not False:
            self._hooks = _hook_math_attention(module, weakref.ref(self))

    #: ``torch.amp.GradScaler.step`` hands the scale and overflow flag to ``step``
    _step_supports_amp_scaling = True

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        check_number("lr", group["lr"])
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta)
            if beta >= 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        # > 0: with eps = 0 a coordinate without gradient and curvature (an input that is
        # always 0, an unused output) would take the step 0/0 = NaN
        check_number("eps", group["eps"], low_open=True)
        check_number("weight_decay", group["weight_decay"])
        check_number("hessian_power", group["hessian_power"], high=1.0)
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if hasattr(self, "_names"):
            for p in self.param_groups[-1]["params"]:
                self._names.setdefault(p, f"param[{len(self._names)}]")

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

    # ---- the schedule ----------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of steps taken (skipped steps excluded)."""
        return self._step

    @property
    def needs_hessian(self) -> bool:
        """Whether the next :meth:`step` estimates the Hessian, so that the backward pass
        before it must be ``loss.backward(create_graph=True)``: its index is a multiple of
        ``hessian_every`` and :meth:`set_hessian_diagonal` has not supplied the diagonal
        of every parameter that requires grad."""
        if not is_due("hessian_every", self.hessian_every, self._step):
            return False
        return any(
            p.requires_grad and p not in self._given
            for group in self.param_groups
            for p in group["params"]
        )

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
            ValueError: a parameter this optimizer does not hold, or a wrong shape.
            TypeError: a value is not a tensor.
        """
        known = {p for group in self.param_groups for p in group["params"]}
        checked: dict[Tensor, Tensor] = {}
        for p, diag in diagonals.items():
            if p not in known:
                shape = tuple(p.shape) if isinstance(p, Tensor) else p
                raise ValueError(
                    f"set_hessian_diagonal: a diagonal is given for a parameter of shape "
                    f"{shape} that this optimizer does not hold"
                )
            if not isinstance(diag, Tensor):
                raise TypeError(
                    f"set_hessian_diagonal: the diagonal of {self._names[p]} (shape "
                    f"{tuple(p.shape)}) must be a tensor, got {type(diag).__name__}"
                )
            if diag.shape != p.shape:
                raise ValueError(
                    f"set_hessian_diagonal: {self._names[p]} has shape {tuple(p.shape)}; its "
                    f"diagonal must have that shape, got {tuple(diag.shape)}"
                )
            checked[p] = diag.detach().to(device=p.device, dtype=p.dtype, copy=True)
        self._given.update(checked)

    # ---- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step (see the class docstring).

        Raises:
            RuntimeError: the step estimates the Hessian but the gradients carry no graph.
            FloatingPointError: ``nonfinite="raise"`` and a gradient or estimate has a NaN/Inf.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        params: list[Tensor] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("AdaHessian does not support sparse gradients")
                    params.append(p)
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler.step
        if found_inf is not None and float(found_inf) > 0:
            for p in params:  # an overflow step: release the graph, take no step
                if p.grad.requires_grad:
                    p.grad = p.grad.detach()
            self.skipped_steps += 1
            return loss
        scale = self._loss_scale(found_inf is not None)
        # A skipped step must not consume probes either: the generator is rewound on a skip,
        # so that the run goes on exactly as if the step had never been attempted.
        generator_state = self.generator.get_state()
        try:
            estimate = self._estimate(params)
        finally:
            # Release the graph of create_graph=True (and the parameter <-> .grad cycle).
            for p in params:
                if p.grad.requires_grad:
                    p.grad = p.grad.detach()
        if found_inf is not None:
            grad_scale = getattr(self, "grad_scale", None)
            for p in params:
                if grad_scale is not None:
                    p.grad.mul_(1.0 / grad_scale.to(device=p.grad.device, dtype=p.grad.dtype))
                if p in estimate and p not in self._given:
                    estimate[p] = estimate[p] / scale
        if self.comm is not None:
            self._average_across_ranks(params, estimate)

        hessians: dict[Tensor, Tensor] = {}
        for p in params:
            diag = estimate.get(p)
            if diag is not None:
                diag = diag.abs()
                hessians[p] = average_spatial_dims(diag) if self.spatial_average else diag
        if not self._all_finite([p.grad for p in params] + list(hessians.values())):
            self.generator.set_state(generator_state)
            self._skip_step(params, hessians)
            return loss

        for group in self.param_groups:
            group_params = [p for p in group["params"] if p.grad is not None]
            if not group_params:
                continue
            for p in group_params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_hessian_diag_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                if p in hessians:
                    state["hessian_diag"] = hessians[p]
            beta1, beta2 = group["betas"]
            adahessian_update(
                group_params,
                [p.grad for p in group_params],
                [self.state[p]["hessian_diag"] for p in group_params],
                [self.state[p]["exp_avg"] for p in group_params],
                [self.state[p]["exp_hessian_diag_sq"] for p in group_params],
                [self.state[p]["step"] for p in group_params],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                hessian_power=group["hessian_power"],
                weight_decay=group["weight_decay"],
            )
        self._given.clear()
        self._step += 1
        return loss

    def _loss_scale(self, scaled: bool) -> float:
        """The loss scale the gradients' graph carries (1 outside a GradScaler step)."""
        if not scaled:
            return 1.0
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            return float(grad_scale)
        if self.grad_scaler is None:
            raise RuntimeError(
                "AdaHessian: the gradients were unscaled by scaler.unscale_(opt), but their "
                "graph (the Hessian-vector products) still carries the loss scale: pass the "
                "scaler to the optimizer, AdaHessian(model, ..., grad_scaler=scaler)"
            )
        return float(self.grad_scaler.get_scale())

    def _average_across_ranks(self, params: list[Tensor], estimate: dict[Tensor, Tensor]) -> None:
        """Average the gradients and the signed estimates over the ranks, in place."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        layout = torch.zeros(2, len(index), dtype=torch.float64)
        for p in params:
            layout[0, index[p]] = 1.0
            layout[1, index[p]] = float(p in estimate)
        if not self.comm.same_everywhere(layout):
            raise RuntimeError(
                "AdaHessian (distributed): the ranks disagree on which parameters have a "
                "gradient or a Hessian estimate at this step; every rank must run the same "
                "model on its own batch"
            )
        values = [p.grad for p in params] + [estimate[p] for p in params if p in estimate]
        for tensor, mean in zip(values, self.comm.average(values), strict=True):
            tensor.copy_(mean)

    def _estimate(self, params: list[Tensor]) -> dict[Tensor, Tensor]:
        """The signed diagonal estimates this step uses: the given ones, and Hutchinson's
        for the others when the Hessian is due (or for parameters without a ``D`` yet)."""
        due = is_due("hessian_every", self.hessian_every, self._step)
        estimate = {p: self._given[p] for p in params if p in self._given}
        wanted = [
            p
            for p in params
            if p not in estimate and (due or "hessian_diag" not in self.state.get(p, {}))
        ]
        if not wanted:
            return estimate
        if not any(p.grad.requires_grad for p in wanted):
            first = "" if due else f" ({', '.join(self._names[p] for p in wanted)} had none yet)"
            raise RuntimeError(
                f"AdaHessian: step {self._step} estimates the Hessian diagonal{first}, but the "
                "gradients carry no graph. Call loss.backward(create_graph=True) before "
                "optimizer.step() on steps where optimizer.needs_hessian is True (a plain "
                "loss.backward() is enough on the others), or give the diagonal with "
                "optimizer.set_hessian_diagonal({param: tensor}) before this step."
            )
        diags = hutchinson_diagonal(wanted, [p.grad for p in wanted], self.n_probes, self.generator)
        estimate.update(zip(wanted, diags, strict=True))
        return estimate

    @staticmethod
    def _all_finite(tensors: list[Tensor]) -> bool:
        if not tensors:
            return True
        return all(to_host([torch.isfinite(t).all() for t in tensors]))

    def _skip_step(self, params: list[Tensor], hessians: Mapping[Tensor, Tensor]) -> None:
        if self.nonfinite == "raise":
            bad = [
                self._names.get(p, "?")
                for p in params
                if not torch.isfinite(p.grad).all()
                or (p in hessians and not torch.isfinite(hessians[p]).all())
            ]
            raise FloatingPointError(
                f"AdaHessian: non-finite gradient or Hessian estimate at step {self._step} in "
                f"{bad}; set nonfinite='skip' to skip such steps"
            )
        self.skipped_steps += 1
        warnings.warn(
            "AdaHessian: non-finite gradient or Hessian estimate, step skipped (parameters, "
            "moments and the last Hessian estimate unchanged; see skipped_steps)",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )

    # ---- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The per-parameter state (``step``, ``exp_avg``, ``exp_hessian_diag_sq``, and the
        last estimate ``hessian_diag``, kept for the steps that reuse it) plus
        ``"adahessian"``: the step counters, the probe generator's state and any diagonals
        given with :meth:`set_hessian_diagonal` and not yet used."""
        state = super().state_dict()
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state["adahessian"] = {
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            "generator": self.generator.get_state(),
            "given": {index[p]: d for p, d in self._given.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next step continues the same trajectory,
        probes included."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("adahessian", None)
        if extra is None:
            raise ValueError(
                "this state_dict has no 'adahessian' entry: it was not saved by an AdaHessian"
            )
        self._check_saved_shapes(state_dict, extra)
        super().load_state_dict(state_dict)
        self._step = int(extra["step"])
        self.skipped_steps = int(extra["skipped_steps"])
        self.generator.set_state(extra["generator"].cpu())
        params = [p for g in self.param_groups for p in g["params"]]
        self._given = {
            params[int(i)]: d.to(device=params[int(i)].device, dtype=params[int(i)].dtype)
            for i, d in extra["given"].items()
        }

    def _check_saved_shapes(self, state_dict: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
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
                if key != "step" and isinstance(value, Tensor):
                    if not fits(value, p, broadcast=key == "hessian_diag"):
                        fail(p, f"{key!r}", value)
        for i, diag in extra.get("given", {}).items():
            i = int(i)
            if not 0 <= i < len(params):
                raise ValueError(
                    f"AdaHessian state has a given Hessian diagonal for parameter index {i}; "
                    f"this optimizer has {len(params)} parameters"
                )
            if not fits(diag, params[i], broadcast=False):
                fail(params[i], "a given Hessian diagonal", diag)

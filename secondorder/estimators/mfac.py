"""M-FAC, dynamic: the inverse empirical Fisher of a sliding window of gradients
(Frantar, Kurtic & Alistarh, 2021, https://arxiv.org/abs/2107.03356).

The window holds the last ``k <= m`` gradients ``g_i`` (flattened over all covered
parameters, or over blocks of ``block_size`` coordinates) and

    F = λ I + (1/k) Σ_i g_i g_iᵀ,      F⁻¹ x = x/λ − Wᵀ (k I + W Wᵀ/λ)⁻¹ W x / λ²

(Woodbury). The dot-product matrix ``W Wᵀ`` gains one row and column per step; the
``k x k`` system is factored by Cholesky every refresh (every step by default), and the
product needs two passes over the window and nothing of size ``m x d``.

The window costs ``m·d`` entries of ``window_dtype`` plus the ``m x m`` dot-product matrix
(per block): 22 GiB for ResNet-18 (d = 11.7M) at the paper's m = 512 in float32. Unless
``ngrads`` is given, m is the largest value up to 512 whose window fits ``window_memory``
(1 GiB by default); an explicit ``ngrads`` over the budget is a ``ValueError``.

Sparse mode keeps the Fisher on the coordinates of a mask (by default, the non-zero
weights at construction): pruned coordinates get a zero direction, so with any of the
base updates they stay exactly zero.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import Interval, Schedule, caller_stacklevel
from ..config import OptimizerConfig, fixed, hyperparameter
from ..kernels.mfac import mfac_coefficients, mfac_gram_row, mfac_ihvp
from ..layers import LayerHelper
from ..optimizer import CurvatureOptimizer
from .base import CurvatureEstimator

_WINDOW_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

#: the window size when ``ngrads`` is not given and the budget allows it (the paper's m)
DEFAULT_NGRADS = 512
#: the default ``window_memory``: 1 GiB, whatever the device (see :class:`MFACConfig`)
DEFAULT_WINDOW_MEMORY = 2**30

_log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class MFACConfig(OptimizerConfig):
    """Hyperparameters of M-FAC (:class:`MFAC` and :class:`MFACEstimator`), checked on
    construction; the shared ones are :class:`~secondorder.config.OptimizerConfig`'s, with
    M-FAC's defaults: SGD-MFAC grafted on Adam (``graft="auto"``: each weight row's step
    takes the norm of Adam's, with β₁ 0.8, Adam's first moment preconditioned), lr 1e-2,
    damping 1e-2, chosen for robustness over the learning rate (issue 18; Adam-MFAC,
    ``base="adam"``, the previous default, had fewer good learning rates on digits-cnn and
    higher final losses); the paper's SGD-MFAC is ``graft=None, lr=1e-3, damping=1e-5``
    (``configs/optimizers/mfac.yaml``). There is no
    ``inverse_every``: the ``k x k`` coefficients are refactored whenever the window or the
    damping changed.

    ``window_memory`` is the budget of the window and its dot-product matrix,
    ``blocks·m·(block·s_w + m·s_g)`` bytes for a window of ``block``-wide blocks (``m·d·s_w``
    plus ``m²·s_g`` for one block), with ``s_w`` and ``s_g`` the item sizes of
    ``window_dtype`` and ``gram_dtype``. A fixed size is the default so that the same model
    gets the same m, hence the same trajectory and checkpoint shape, on every machine
    whatever else holds memory; 1 GiB fits next to training on any GPU and keeps m = 512 up
    to about 0.5M parameters in float32 (the CIFAR ResNets of the paper). ``gram_dtype``
    float64 is the default because ``W Wᵀ/λ`` with λ ~ 1e-5 is badly conditioned in
    float32: float32 is accurate only while ``eps32·|g|²/λ`` stays well below ``m`` (when the
    factorisation fails outright it is redone from the window in float64, see
    :meth:`MFACEstimator.refresh`).
    """

    lr: float = hyperparameter(
        1e-2,
        'learning rate (Adam\'s scale with the default graft or ``base="adam"``; the '
        "paper's SGD-MFAC: 1e-3)",
    )
    base: str = hyperparameter(
        "sgd",
        '``"sgd"`` (SGD-MFAC, the paper\'s optimizer; with the default graft its step has '
        'the norm of Adam\'s) or ``"adam"`` (Adam-MFAC: Adam-style moments of the '
        "preconditioned direction, no graft). Either way Adam's learning rates carry over: "
        "the paper's ungrafted SGD-MFAC (damping 1e-5) reached the target train loss of the "
        "bench tasks at 0 to 1 of the lrs 0.3 ... 0.001 where Adam reached it at 1 to 4 "
        "(benchmarks/RESULTS.md, issue 18)",
    )
    graft: str | None = hyperparameter(
        "auto",
        'the step norm\'s source (see OptimizerConfig): ``"auto"`` is ``"adam"`` with '
        'base="sgd" and None with base="adam"; None: the paper\'s update',
    )
    graft_betas: tuple[float, float] = hyperparameter(
        (0.8, 0.999),
        "the grafted Adam's β₁ and β₂ (β₁ 0.8 as in the K-FAC family: with 0.9 the grafted "
        "M-FAC ended above Adam's final loss at Adam's best lr on four of six bench tasks, "
        "with 0.8 on one)",
    )
    graft_norm: str = hyperparameter(
        "row",
        'what takes the grafted step\'s norm: ``"row"`` (each row of a weight, each 1-D '
        'parameter; the K-FAC family\'s default) or ``"parameter"``',
    )
    damping: Schedule = hyperparameter(
        1e-2,
        "λ > 0 of ``F = λI + GᵀG/m``, or a function of the step. 1e-2 (the paper's: 1e-5): "
        "the mean gradient is the empirical Fisher's top direction, so a tiny λ (F⁻¹ close to "
        "the window's pseudo-inverse) all but removes it from the step; 1e-2 keeps it while "
        "still damping the noisiest directions. With the default graft: Adam's number of good "
        "lrs or more and a final loss at or below Adam's at Adam's best lr on all six bench "
        "tasks (0.1: the loss on five; with base='adam' 1e-2 and 0.1 had the most good lrs "
        "of 1e-5 to 10, and at 1 and 10 Adam-MFAC is all but Adam)",
    )
    curvature_every: Interval = hyperparameter(
        1, "push the gradient into the window at steps that are multiples of this"
    )
    inverse_every: Interval = fixed(1)
    inverse_warmup: bool = fixed(False)
    ngrads: int | None = hyperparameter(
        None,
        "window size m, any positive int; None: the largest m up to 512 (the paper's) whose "
        "window fits ``window_memory`` (the choice is in ``opt.estimator.config.ngrads``). "
        "An explicit m whose window exceeds ``window_memory`` raises ``ValueError``",
    )
    window_memory: float | None = hyperparameter(
        DEFAULT_WINDOW_MEMORY,
        "bytes the window and its dot-product matrix may take (a number >= 1), or a fraction "
        "in (0, 1) of the memory available on the parameters' device when the estimator is "
        "built (CUDA: free memory; CPU: ``MemAvailable``), or None for no limit (1 GiB)",
    )
    window_dtype: torch.dtype = hyperparameter(
        torch.float32, "float32, bfloat16 (half the memory) or float64"
    )
    block_size: int | None = hyperparameter(
        None,
        "precondition independent blocks of this many coordinates (each with its own window "
        "of m gradients) to bound the ``m x m`` work per block; None is one global block",
    )
    min_grads: int = hyperparameter(1, "use the raw gradient until the window holds this many")
    gram_dtype: torch.dtype = hyperparameter(
        torch.float64, "dtype of the dot-product matrix and its Cholesky factor: float32 or float64"
    )
    sparse: bool = hyperparameter(
        False,
        "keep the Fisher and the update on the weights that are non-zero at construction; "
        "pruned weights stay exactly zero",
    )
    masks: Mapping[Tensor, Tensor] | None = hyperparameter(
        None, "explicit boolean masks per parameter, True = kept (implies sparse)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sparse, bool):
            raise TypeError(f"sparse must be a bool, got {type(self.sparse).__name__}")
        if self.ngrads is not None and not _positive_int(self.ngrads):
            raise ValueError(f"ngrads must be a positive int or None, got {self.ngrads!r}")
        if self.window_memory is not None and not (
            isinstance(self.window_memory, numbers.Real)
            and not isinstance(self.window_memory, bool)
            and math.isfinite(self.window_memory)
            and self.window_memory > 0
        ):
            raise ValueError(
                "window_memory must be None, a number of bytes >= 1 or a fraction in (0, 1) "
                f"of the available memory, got {self.window_memory!r}"
            )
        if self.window_dtype not in _WINDOW_DTYPES:
            raise ValueError(
                f"window_dtype must be one of {_WINDOW_DTYPES}, got {self.window_dtype!r}"
            )
        if self.block_size is not None and not _positive_int(self.block_size):
            raise ValueError(f"block_size must be a positive int or None, got {self.block_size!r}")
        if not _positive_int(self.min_grads):
            raise ValueError(f"min_grads must be a positive int, got {self.min_grads!r}")
        if self.gram_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"gram_dtype must be float32 or float64, got {self.gram_dtype!r}")


def window_bytes(
    ngrads: int, blocks: int, block: int, window_dtype: torch.dtype, gram_dtype: torch.dtype
) -> int:
    """Bytes of an M-FAC window of ``ngrads`` gradients in ``blocks`` blocks of ``block``
    coordinates, with its ``ngrads x ngrads`` dot-product matrix per block."""
    w = torch.finfo(window_dtype).bits // 8
    g = torch.finfo(gram_dtype).bits // 8
    return blocks * ngrads * (block * w + ngrads * g)


def largest_window(
    budget: int,
    blocks: int,
    block: int,
    window_dtype: torch.dtype,
    gram_dtype: torch.dtype,
    cap: int = DEFAULT_NGRADS,
) -> int:
    """The largest ``m <= cap`` with ``window_bytes(m, ...) <= budget``; 0 if none."""
    low, high = 0, cap  # window_bytes(low) <= budget is kept true
    while low < high:
        mid = (low + high + 1) // 2
        if window_bytes(mid, blocks, block, window_dtype, gram_dtype) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: ``torch.cuda.mem_get_info`` for CUDA, ``MemAvailable``
    of ``/proc/meminfo`` for the CPU; None where it is not known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _round_up(value: float) -> float:
    """``value`` rounded *up* to one significant digit (a damping named in an error must be
    at least the bound, and ``f"{value:.1g}"`` can round down)."""
    exponent = math.floor(math.log10(value))
    return math.ceil(value / 10.0**exponent) * 10.0**exponent


class MFACEstimator(CurvatureEstimator):
    """The dynamic M-FAC window, dot-product matrix and inverse-Fisher products.

    Args:
        params (list[nn.Parameter]): the parameters to precondition jointly (one device).
        config (MFACConfig, optional): hyperparameters.
        masks (Mapping[Parameter, Tensor], optional): sparse mode: a boolean mask per
            parameter (True = kept); parameters without one are fully kept.
    """

    requires_capture = False

    def __init__(
        self,
        params: list[nn.Parameter],
        config: MFACConfig | None = None,
        masks: Mapping[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__([])
        self.config = config if config is not None else MFACConfig()
        self._params = [p for p in params if p.requires_grad]
        if not self._params:
            raise ValueError("MFAC needs at least one parameter that requires grad")
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(
                f"MFAC keeps one window: all parameters must share a device, got {devices}"
            )
        self.device = devices.pop()
        self._masks = self._check_masks(masks or {})
        self.dim = sum(self._size(p) for p in self._params)
        block = self.config.block_size or self.dim
        self.block = min(block, self.dim)
        self.blocks = math.ceil(self.dim / self.block)
        #: the budget in bytes (``window_memory`` resolved; None: no limit)
        self.window_budget = self._budget_bytes()
        self.config = dataclasses.replace(self.config, ngrads=self._window_size())
        m = self.config.ngrads
        #: bytes of the window and its dot-product matrix
        self.window_bytes = self._bytes(m)
        self.window = torch.zeros(
            self.blocks, m, self.block, dtype=self.config.window_dtype, device=self.device
        )
        self.gram = torch.zeros(self.blocks, m, m, dtype=self.config.gram_dtype, device=self.device)
        self.head = 0  # ring position of the next gradient
        self.count = 0  # gradients held (<= m)
        self._chol: Tensor | None = None
        self._chol_damping: float | None = None

    # ---- the window's size --------------------------------------------------------------
    def _bytes(self, m: int) -> int:
        return window_bytes(
            m, self.blocks, self.block, self.config.window_dtype, self.config.gram_dtype
        )

    def _budget_bytes(self) -> int | None:
        budget = self.config.window_memory
        if budget is None or budget >= 1:
            return None if budget is None else int(budget)
        free = available_memory(self.device)
        if free is None:
            raise ValueError(
                f"window_memory={budget!r} is a fraction of the available memory, which is "
                f"not known for device {self.device}; give window_memory in bytes"
            )
        return int(budget * free)

    def _describe(self, m: int) -> str:
        dtype = str(self.config.window_dtype).removeprefix("torch.")
        return (
            f"{m} x {self.dim:,} {dtype} coordinates"
            + (f" in {self.blocks} blocks" if self.blocks > 1 else "")
            + f" and the {m} x {m} dot-product matrix"
            + (" of each" if self.blocks > 1 else "")
        )

    def _budget_text(self) -> str:
        given = self.config.window_memory
        if given is not None and given < 1:
            return (
                f"window_memory={given!r} of the available memory "
                f"({_format_bytes(self.window_budget)})"
            )
        return f"window_memory={_format_bytes(self.window_budget)}"

    def _window_size(self) -> int:
        """``ngrads`` if given (``ValueError`` over the budget), else the largest m up to
        :data:`DEFAULT_NGRADS` that fits it, said in a log line (a warning when the budget
        cut it below the default)."""
        m, budget = self.config.ngrads, self.window_budget
        bf16 = (
            ""
            if self.config.window_dtype == torch.bfloat16
            else ", window_dtype=torch.bfloat16 (2 bytes a coordinate)"
        )
        if m is not None:
            if budget is not None and self._bytes(m) > budget:
                fits = largest_window(
                    budget,
                    self.blocks,
                    self.block,
                    self.config.window_dtype,
                    self.config.gram_dtype,
                    cap=m,
                )
                fewer = f", ngrads={fits} or fewer" if fits else ""
                raise ValueError(
                    f"M-FAC: ngrads={m} needs {_format_bytes(self._bytes(m))} "
                    f"({self._describe(m)}), over the budget {self._budget_text()}; "
                    f"pass window_memory={self._bytes(m)} (or None: no limit) to allow it"
                    f"{fewer}{bf16}, or leave ngrads unset for the largest window that fits"
                )
            return m
        if budget is None:
            return DEFAULT_NGRADS
        m = largest_window(
            budget, self.blocks, self.block, self.config.window_dtype, self.config.gram_dtype
        )
        if m == 0:
            raise ValueError(
                f"M-FAC: the budget {self._budget_text()} holds no gradient: "
                f"{self._describe(1)} take {_format_bytes(self._bytes(1))}; raise "
                f"window_memory (None: no limit){bf16}, or "
                "precondition fewer parameters"
            )
        message = (
            f"M-FAC: window of m={m} gradients ({self._describe(m)}: "
            f"{_format_bytes(self._bytes(m))}) within {self._budget_text()}"
        )
        if m < DEFAULT_NGRADS:
            message += (
                f"; m={DEFAULT_NGRADS} would need {_format_bytes(self._bytes(DEFAULT_NGRADS))}:"
                " pass ngrads= and window_memory= to choose"
            )
            warnings.warn(message, stacklevel=caller_stacklevel())
        else:
            _log.info(message)
        return m

    # ---- layout -------------------------------------------------------------------------
    @property
    def params(self) -> list[nn.Parameter]:
        return list(self._params)

    def _check_masks(self, masks: Mapping[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        out = {}
        known = set(self._params)
        for p, mask in masks.items():
            if p not in known:
                raise ValueError("masks: a mask is given for a parameter MFAC does not optimise")
            if not isinstance(mask, Tensor) or mask.shape != p.shape:
                raise ValueError(
                    f"masks: a parameter of shape {tuple(p.shape)} needs a mask of that shape"
                )
            out[p] = mask.to(device=p.device, dtype=torch.bool)
        return out

    def _size(self, p: Tensor) -> int:
        mask = self._masks.get(p)
        return p.numel() if mask is None else int(mask.sum())

    def _flatten(self, grads: Mapping[Tensor, Tensor], dtype: torch.dtype) -> Tensor:
        """Covered gradients as ``(blocks, block)``; missing ones count as zero."""
        flat = torch.zeros(self.blocks * self.block, dtype=dtype, device=self.device)
        offset = 0
        for p in self._params:
            size = self._size(p)
            g = grads.get(p)
            if g is not None:
                mask = self._masks.get(p)
                flat[offset : offset + size] = (g if mask is None else g[mask]).reshape(-1)
            offset += size
        return flat.view(self.blocks, self.block)

    def _unflatten(self, flat: Tensor) -> dict[Tensor, Tensor]:
        flat = flat.reshape(-1)
        out: dict[Tensor, Tensor] = {}
        offset = 0
        for p in self._params:
            size = self._size(p)
            piece = flat[offset : offset + size].to(p.dtype)
            mask = self._masks.get(p)
            if mask is None:
                out[p] = piece.view(p.shape)
            else:
                full = torch.zeros_like(p)
                full[mask] = piece
                out[p] = full
            offset += size
        return out

    # ---- the protocol -------------------------------------------------------------------
    def update(self, stats: Mapping[Tensor, Tensor]) -> None:
        """Push the current gradient (``stats`` maps parameters to gradients) into the
        window and update one row and column of the dot-product matrix."""
        g = self._flatten(
            stats, torch.float32 if self.config.window_dtype != torch.float64 else torch.float64
        )
        row = self.head
        self.window[:, row] = g.to(self.config.window_dtype)
        self.count = min(self.count + 1, self.config.ngrads)
        self.head = (self.head + 1) % self.config.ngrads
        dots = mfac_gram_row(self.window, row, self.count).to(self.config.gram_dtype)
        self.gram[:, row, : self.count] = dots
        self.gram[:, : self.count, row] = dots
        self._chol = None

    def refresh(self, damping: float) -> None:
        if self.count < self.config.min_grads:
            self._chol = None
            return
        if self._chol is not None and self._chol_damping == float(damping):
            return  # neither the window nor the damping changed since the last factorisation
        self._check_representable(damping)
        chol = mfac_coefficients(self.gram, self.count, damping)
        if not bool(torch.isfinite(chol[..., -1, -1]).all()):
            chol = self._factor_in_float64(damping)  # kept in float64: the solve follows
        self._chol = chol
        self._chol_damping = float(damping)

    def _product_dtype(self) -> torch.dtype:
        """The dtype of Woodbury's product: float64 only for a float64 window and float64
        parameters (the direction is cast to the parameters' dtype)."""
        wide = self.config.window_dtype == torch.float64 and all(
            p.dtype == torch.float64 for p in self._params
        )
        return torch.float64 if wide else torch.float32

    def _workable_damping(self, largest: float) -> float:
        """The smallest damping that an error message may recommend, given the largest
        squared gradient norm ``largest`` in the window.

        Two floors, the larger wins:

        - ``10 / sqrt(finfo.max)`` of the product's dtype: below it ``1/λ²`` overflows;
        - ``1e4 · eps · largest / k``: Woodbury's ``x/λ − Wᵀc/λ²`` cancels to a relative
          error of about ``eps·|g|²/(kλ)`` (the part of ``x`` that round-off puts off the
          window's span comes back multiplied by ``1/λ``). At the floor that error is 1e-4,
          far inside the differences in summation order between CPUs and kernels, so the
          damping works on any machine, not only on the one that raised.
        """
        dtype = self._product_dtype()
        floor = 10.0 * torch.finfo(dtype).max ** -0.5
        if math.isfinite(largest):
            floor = max(floor, 1e4 * torch.finfo(dtype).eps * largest / max(self.count, 1))
        return _round_up(floor)

    def _largest_squared_norm(self) -> float:
        """The largest ``|g|²`` of the window (the diagonal of the dot matrix)."""
        k = self.count
        return float(self.gram[:, :k, :k].diagonal(dim1=1, dim2=2).double().max())

    def _check_representable(self, damping: float) -> None:
        """``FloatingPointError`` when ``1/λ`` or ``1/λ²`` (Woodbury's ``x/λ − Wᵀc/λ²``) may
        overflow the arithmetic: the product's dtype (float32 unless the window is float64)
        or the parameters' (the direction is cast to it; float32 unless all are float64).
        No factorisation could help then: the product would fail with an overflow error,
        divide by zero, or write Inf/NaN into the parameters. The bound is
        ``10 / sqrt(finfo.max)`` (6e-19 in float32, 8e-154 in float64), with no host sync
        unless it raises; the damping it names is ``_workable_damping``'s."""
        dtype = self._product_dtype()
        floor = 10.0 * torch.finfo(dtype).max ** -0.5
        if float(damping) < floor:
            hint = (
                ""
                if dtype == torch.float64
                else " (float64 needs a float64 window and float64 parameters)"
            )
            workable = self._workable_damping(self._largest_squared_norm())
            raise FloatingPointError(
                f"M-FAC: damping={damping:g} is too small for {str(dtype)[6:]} arithmetic: "
                f"1/damping² overflows it; use damping >= {workable:.1g}{hint}"
            )

    def _factor_in_float64(self, damping: float) -> Tensor:
        """Fallback when ``mI + GGᵀ/λ`` was not numerically positive definite (a float32
        dot matrix with a tiny damping: its round-off, divided by λ, outweighs ``m``).

        The dot products are recomputed from the window in float64, a slice of columns at
        a time (nothing of size m x d is allocated). If even that fails, the damping is
        too small for Woodbury's ``x/λ − Wᵀc/λ²`` to mean anything (its cancellation error
        is about ``eps·|g|²/(mλ)``) and no jitter would rescue it: a ``FloatingPointError``
        names ``_workable_damping``.
        """
        k = self.count
        gram = torch.zeros(self.blocks, k, k, dtype=torch.float64, device=self.device)
        step = max(1, 2**18 // k)
        for c0 in range(0, self.window.shape[-1], step):
            w = self.window[:, :k, c0 : c0 + step].double()
            gram.baddbmm_(w, w.transpose(1, 2))
        chol = mfac_coefficients(gram, k, damping)
        if not bool(torch.isfinite(chol[..., -1, -1]).all()):
            largest = float(gram.diagonal(dim1=1, dim2=2).max())
            raise FloatingPointError(
                f"M-FAC: mI + GGᵀ/λ is not positive definite even in float64 with "
                f"damping={damping:g} (largest |g|² = {largest:.3g}); "
                f"use damping >= {self._workable_damping(largest):.1g}"
            )
        return chol

    def precondition(self, grads: Mapping[Tensor, Tensor], damping: float) -> dict[Tensor, Tensor]:
        if self.count < self.config.min_grads:
            return {}
        # Woodbury needs coefficients that match the current window and damping exactly:
        # refactor whenever either changed since the last refresh.
        if self._chol is None or self._chol_damping != float(damping):
            self.refresh(damping)
        dtype = torch.float64 if self.config.window_dtype == torch.float64 else torch.float32
        x = self._flatten(grads, dtype)
        if self.config.window_dtype == torch.bfloat16:
            # F has eigenvalue λ off the window's span, so the part of x outside it is
            # scaled by 1/λ. The pushed gradient lies in the span only as stored, i.e.
            # rounded to bf16: round x the same way, or its rounding error (~0.4%)
            # would come back multiplied by 1/λ.
            x = x.to(torch.bfloat16).to(dtype)
        out = mfac_ihvp(self.window, self._chol, x, self._chol_damping, self.count)
        result = self._unflatten(out)
        return {p: u for p, u in result.items() if p in grads}

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "gram": self.gram,
            "head": self.head,
            "count": self.count,
            "chol_damping": self._chol_damping,
            "masks": [self._masks.get(p) for p in self._params],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        window, gram = state["window"], state["gram"]
        if tuple(window.shape) != tuple(self.window.shape) or tuple(gram.shape) != tuple(
            self.gram.shape
        ):
            raise ValueError(
                f"M-FAC state has a window of shape {tuple(window.shape)} (blocks, m, block) "
                f"where this optimizer has {tuple(self.window.shape)}; was it saved from a "
                f"different model or ngrads? (pass ngrads={window.shape[1]} to resume it; "
                "without ngrads the window's size follows window_memory)"
            )
        masks = state.get("masks", [])
        if len(masks) != len(self._params) or any(
            (m is None) != (self._masks.get(p) is None)
            or (m is not None and not torch.equal(m.to(p.device), self._masks[p]))
            for m, p in zip(masks, self._params, strict=False)
        ):
            raise ValueError("M-FAC state was saved with different sparsity masks")
        self.window.copy_(window)
        self.gram.copy_(gram)
        self.head = int(state["head"])
        self.count = int(state["count"])
        self._chol = None
        damping = state.get("chol_damping")
        if damping is not None and self.count >= self.config.min_grads:
            self.refresh(damping)


class MFAC(CurvatureOptimizer):
    r"""Dynamic M-FAC (Frantar et al., 2021): SGD-MFAC or Adam-MFAC.

    Every step the gradient joins a ring buffer of the last ``ngrads`` gradients, and the
    base update receives

    .. math::
        u = F^{-1} g, \qquad F = \lambda I + \frac1k \sum_{i=1}^{k} g_i g_i^\top

    computed exactly by Woodbury with a Cholesky factorisation of the ``k x k`` system.
    Coupled weight decay is added to the gradient *before* preconditioning, as in the
    reference (``g <- ∇ + wd w``); the reference's momentum over the preconditioned
    direction, ``v <- μ v + (1 - μ) u``, is ``momentum=μ, dampening=μ``.

    Args:
        model (nn.Module or iterable of Parameters): what to optimise (M-FAC needs no
            hooks: all parameters are preconditioned jointly, any layer type).
        lr (float, optional): learning rate (default: 1e-2).
        params, config: see :class:`~secondorder.CurvatureOptimizer`.

    With ``ngrads=None`` a warning says when the budget made the window smaller than 512.
    ``base="sgd"`` (the default) is SGD-MFAC, ``base="adam"`` Adam-MFAC. The defaults
    (SGD-MFAC grafted on Adam per weight row, lr 1e-2, damping 1e-2) are chosen for
    robustness over the learning rate; the paper's SGD-MFAC is ``graft=None, lr=1e-3,
    damping=1e-5`` (see :class:`MFACConfig`).

    Example::

        opt = MFAC(model)  # SGD-MFAC grafted on Adam, lr 1e-2, damping 1e-2
        opt = MFAC(model, base="adam")  # Adam-MFAC
        opt = MFAC(model, graft=None, lr=1e-3, damping=1e-5, ngrads=512)  # the paper's
    """

    requires_model = False
    l2_before_precondition = True

    config_class = MFACConfig

    def build_estimator(
        self, layers: list[LayerHelper], params: list[nn.Parameter]
    ) -> MFACEstimator:
        cfg = self.config
        masks = dict(cfg.masks) if cfg.masks is not None else None
        if masks is None and cfg.sparse:
            masks = {p: p.detach() != 0 for p in params}
        return MFACEstimator(params, cfg, masks)

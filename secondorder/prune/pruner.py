r"""Pruners, masks and schedules: Optimal Brain Surgeon with the M-FAC inverse, and magnitude.

**Optimal Brain Surgeon** (Hassibi & Stork 1993) with the inverse empirical Fisher ``F⁻¹`` of
:class:`~secondorder.prune.StaticFisherInverse` (Frantar et al. 2021): removing weight ``j``
costs ``ρ_j = w_j² / (2 [F⁻¹]_jj)`` to second order, and the best correction of the other
weights is ``δw = −(w_j / [F⁻¹]_jj) F⁻¹ e_j``. :class:`MFACPruner` drops the weights of lowest
``ρ`` and applies the sum of their corrections, ``δw = −F⁻¹ z`` with ``z_j = w_j / [F⁻¹]_jj``
on the dropped set (one inverse-Hessian-vector product; the "independent" OBS update of the
M-FAC and WoodFisher pruning code). The dropped weights are then set exactly to zero. Pruning in
several recomputation steps (``nrecomps``) refreshes the gradients, the inverse and the
saliencies between steps, which accounts for the correlations the independent update ignores.
Already pruned weights take no part: their gradient columns are zeroed, so ``F⁻¹`` never
couples them to the others and the correction leaves them at zero.

:class:`MagnitudePruner` drops the weights of smallest ``|w|`` (the baseline).

Both prune chosen parameters (by default the weights of every Linear and Conv1d/2d/3d layer;
biases and normalisation layers are left dense) to a target sparsity over those parameters,
either over all of them at once (``scope="global"``) or layer by layer (``scope="layer"``).
Masks are exact: :class:`Masks` zeroes the pruned weights and, attached to an optimizer, zeroes
them again after every ``step()`` (whatever the optimizer's momentum or weight decay).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..layers import KroneckerHelper, helper_class_for
from .inverse import StaticFisherInverse

__all__ = [
    "GradualSchedule",
    "MFACPruner",
    "MagnitudePruner",
    "Masks",
    "collect_gradients",
    "default_prunable",
    "geometric_densities",
    "load_checkpoint",
    "save_checkpoint",
]


def _prunable(module: nn.Module) -> bool:
    """Whether ``module``'s weight multiplies its input: its registered helper is a
    Kronecker helper with a full ``A`` (Linear, Conv1d/2d/3d), not a lookup table (an
    Embedding's diagonal ``A``) nor a normalisation layer's per-channel blocks."""
    helper = helper_class_for(module)
    return helper is not None and issubclass(helper, KroneckerHelper) and not helper.a_diagonal


def default_prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: weight}`` of every Linear and Conv1d/2d/3d layer of ``model`` (any module
    type registered with a Kronecker helper with a full ``A``) that is trained (biases,
    normalisation layers and embeddings are left out)."""
    out = {}
    for name, module in model.named_modules():
        if _prunable(module) and module.weight.requires_grad:
            out[f"{name}.weight" if name else "weight"] = module.weight
    return out


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")
    return float(value)


class Masks:
    """Boolean keep-masks (True = kept) for named parameters, exact through training.

    Args:
        params (Mapping[str, Parameter]): the prunable parameters by name.
        masks (Mapping[str, Tensor], optional): initial masks (default: all kept).
    """

    def __init__(
        self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor] | None = None
    ) -> None:
        if not params:
            raise ValueError("params: no parameters to prune")
        self.params = dict(params)
        self.masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()}
        if masks is not None:
            self.load_state_dict(masks)

    def apply(self) -> None:
        """Zero the pruned weights (in place, without autograd)."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.mul_(self.masks[name])

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Re-apply the masks after every ``optimizer.step()``; returns the hook handle
        (``handle.remove()`` detaches). Masks changed later are the ones applied."""
        return optimizer.register_step_post_hook(lambda *_: self.apply())

    def by_parameter(self) -> dict[nn.Parameter, Tensor]:
        """``{parameter: mask}``, the form ``MFAC(..., masks=)`` takes (its sparse mode)."""
        return {p: self.masks[name] for name, p in self.params.items()}

    @property
    def numel(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def sparsity(self) -> float:
        """Fraction of the prunable weights that are pruned."""
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / self.numel

    def layer_sparsity(self) -> dict[str, float]:
        """``{name: fraction pruned}`` per parameter."""
        return {name: 1.0 - m.float().mean().item() for name, m in self.masks.items()}

    def flat(self) -> Tensor:
        """All masks concatenated, in the order of ``params``."""
        return torch.cat([m.reshape(-1).cpu() for m in self.masks.values()])

    def set_flat(self, flat: Tensor) -> None:
        offset = 0
        for _name, m in self.masks.items():
            n = m.numel()
            m.copy_(flat[offset : offset + n].view_as(m))
            offset += n

    def state_dict(self) -> dict[str, Tensor]:
        """``{name: mask}`` (CPU copies)."""
        return {name: m.detach().cpu().clone() for name, m in self.masks.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load masks saved by :meth:`state_dict`; names and shapes must match."""
        if set(state) != set(self.params):
            missing = sorted(set(self.params) - set(state))
            extra = sorted(set(state) - set(self.params))
            raise ValueError(f"masks do not match the parameters: missing {missing}, extra {extra}")
        for name, m in state.items():
            if tuple(m.shape) != tuple(self.params[name].shape):
                raise ValueError(
                    f"mask {name!r} has shape {tuple(m.shape)}, the parameter "
                    f"{tuple(self.params[name].shape)}"
                )
            self.masks[name] = m.to(self.params[name].device, torch.bool).clone()


def collect_gradients(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor],
    ngrads: int,
    *,
    masks: Tensor | None = None,
    storage: torch.device | str = "cpu",
    progress: bool = True,
) -> Tensor:
    """``ngrads`` gradients of ``loss_fn(model(x), y)`` w.r.t. ``params``, one per batch.

    ``batches`` yields ``(x, y)``; it is cycled if it runs out. The model is put in eval mode
    for the collection (BatchNorm statistics untouched) and restored; ``.grad`` is restored too.
    Rows are the concatenated flattened gradients, multiplied by ``masks`` (flat, True = kept)
    when given, on ``storage``, in float32 (float64 if a parameter is float64).

    Returns:
        ``(ngrads, d)`` tensor.
    """
    if isinstance(ngrads, bool) or not isinstance(ngrads, int) or ngrads < 1:
        raise ValueError(f"ngrads must be an int >= 1, got {ngrads!r}")
    d = sum(p.numel() for p in params)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    out = torch.empty(ngrads, d, dtype=dtype, device=storage)
    was_training = model.training
    model.eval()

    def cycle() -> Iterator[Any]:
        while True:
            empty = True
            for item in batches:
                empty = False
                yield item
            if empty:
                raise ValueError("batches: the iterable yielded nothing")

    try:
        it = cycle()
        for i in tqdm(range(ngrads), desc="gradients", leave=False, disable=not progress or None):
            x, y = next(it)
            grads = torch.autograd.grad(loss_fn(model(x), y), list(params), allow_unused=True)
            row = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
            out[i] = row.to(storage, dtype)
    finally:
        model.train(was_training)
    if masks is not None:
        out.mul_(masks.to(storage, dtype))
    return out


def geometric_densities(start: float, end: float, steps: int) -> list[float]:
    """Densities ``start·(end/start)^(i/steps)`` for ``i = 1..steps`` (the last is ``end``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < end <= start <= 1:
        raise ValueError(f"densities need 0 < end <= start <= 1, got start {start}, end {end}")
    return [start * (end / start) ** (i / steps) for i in range(1, steps)] + [end]


class _Pruner:
    """Shared selection: target sparsity, global or per-layer, on the unpruned weights."""

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter] | None = None,
        *,
        scope: str = "global",
        masks: Masks | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.model = model
        chosen = default_prunable(model) if params is None else dict(params)
        owned = {id(p) for p in model.parameters()}
        for name, p in chosen.items():
            if id(p) not in owned:
                raise ValueError(f"params: {name!r} is not a parameter of the model")
        self.scope = scope
        self.masks = masks if masks is not None else Masks(chosen)
        if masks is not None and set(masks.params) != set(chosen):
            raise ValueError("masks: they cover other parameters than params")
        self.params = self.masks.params
        self.history: list[dict[str, float]] = []

    def _flat_weights(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1).cpu().double() for p in self.params.values()])

    def _set_flat_weights(self, flat: Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params.values():
                n = p.numel()
                p.copy_(flat[offset : offset + n].view_as(p))
                offset += n

    def _select(self, scores: Tensor, keep: Tensor, sparsity: float) -> Tensor:
        """New flat keep-mask: the lowest-scoring kept weights dropped until ``sparsity``."""
        scores = scores.masked_fill(~keep, -math.inf)  # already pruned stay pruned
        new_keep = keep.clone()
        if self.scope == "global":
            groups = [(0, keep.numel())]
        else:
            sizes = [p.numel() for p in self.params.values()]
            starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
            groups = list(itertools.pairwise(starts))
        for lo, hi in groups:
            target = round(sparsity * (hi - lo))
            drop = target - int((~keep[lo:hi]).sum())
            if drop > 0:
                idx = torch.topk(scores[lo:hi], drop + int((~keep[lo:hi]).sum()), largest=False)
                new_keep[lo + idx.indices] = False
        return new_keep

    def _record(self, sparsity: float) -> None:
        self.history.append({"target": sparsity, "sparsity": self.masks.sparsity()})


class MagnitudePruner(_Pruner):
    """Drop the weights of smallest magnitude (the baseline).

    Args:
        model (nn.Module): the model.
        params (Mapping[str, Parameter], optional): what to prune (default:
            :func:`default_prunable`).
        scope (str, optional): ``"global"`` (one threshold over all) or ``"layer"`` (each
            parameter to the same sparsity) (default: global).
        masks (Masks, optional): continue from these masks.
    """

    def prune(self, sparsity: float) -> Masks:
        """Prune to ``sparsity`` (a fraction of the prunable weights) and zero the weights."""
        sparsity = _check_fraction("sparsity", sparsity)
        keep = self._select(self._flat_weights().abs(), self.masks.flat(), sparsity)
        self.masks.set_flat(keep)
        self.masks.apply()
        self._record(sparsity)
        return self.masks


class MFACPruner(_Pruner):
    """Optimal Brain Surgeon with the static M-FAC inverse Fisher (see the module docs).

    Args:
        model (nn.Module): the model.
        batches (iterable): ``(x, y)`` mini-batches; one gradient is taken per batch (cycled).
        loss_fn (callable): ``loss_fn(model(x), y)`` -> scalar loss.
        params (Mapping[str, Parameter], optional): what to prune (default:
            :func:`default_prunable`).
        ngrads (int, optional): m, gradients per inverse (default: 64).
        damping (float, optional): λ of ``F = λI + GᵀG/m`` (default: 1e-4).
        block_size (int, optional): B of the blocked inverse over the concatenated weights;
            None for the full (paged) inverse (default: 128).
        pages (int, optional): column pages (default: 1).
        device (optional): where the inverse is computed (default: the gradients' storage,
            CPU).
        scope (str, optional): ``"global"`` or ``"layer"`` (default: global).
        update (bool, optional): apply the OBS correction to the remaining weights
            (default: True); False prunes by the OBS saliency alone.
        masks (Masks, optional): continue from these masks.
        progress (bool, optional): progress bars (default: True; off when not a terminal).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: Callable[[Any, Any], Tensor],
        params: Mapping[str, nn.Parameter] | None = None,
        *,
        ngrads: int = 64,
        damping: float = 1e-4,
        block_size: int | None = 128,
        pages: int = 1,
        device: torch.device | str | None = None,
        scope: str = "global",
        update: bool = True,
        masks: Masks | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(model, params, scope=scope, masks=masks)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(ngrads, bool) or not isinstance(ngrads, int) or ngrads < 1:
            raise ValueError(f"ngrads must be an int >= 1, got {ngrads!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise TypeError(f"damping must be a number, got {type(damping).__name__}")
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"damping must be a positive finite number, got {damping!r}")
        if not isinstance(update, bool):
            raise TypeError(f"update must be a bool, got {type(update).__name__}")
        self.batches, self.loss_fn = batches, loss_fn
        self.ngrads, self.damping = ngrads, float(damping)
        self.block_size, self.pages, self.device = block_size, pages, device
        self.update, self.progress = update, progress
        StaticFisherInverse(torch.zeros(1, 1), self.damping, block_size=block_size, pages=pages)

    def inverse(self) -> StaticFisherInverse:
        """The static inverse Fisher from ``ngrads`` fresh gradients at the current weights
        (pruned coordinates masked out)."""
        grads = collect_gradients(
            self.model,
            list(self.params.values()),
            self.batches,
            self.loss_fn,
            self.ngrads,
            masks=self.masks.flat(),
            progress=self.progress,
        )
        return StaticFisherInverse(
            grads,
            self.damping,
            block_size=self.block_size,
            pages=self.pages,
            device=self.device,
        )

    def prune(self, sparsity: float, nrecomps: int = 1) -> Masks:
        """Prune to ``sparsity`` in ``nrecomps`` steps (densities interpolated geometrically
        from the current one), each with fresh gradients, inverse, saliencies and OBS update.
        """
        sparsity = _check_fraction("sparsity", sparsity)
        if isinstance(nrecomps, bool) or not isinstance(nrecomps, int) or nrecomps < 1:
            raise ValueError(f"nrecomps must be an int >= 1, got {nrecomps!r}")
        start = 1.0 - self.masks.sparsity()
        steps = geometric_densities(start, 1.0 - sparsity, nrecomps)
        for density in tqdm(
            steps, desc="OBS steps", leave=False, disable=not self.progress or None
        ):
            self._step(1.0 - density)
        self._record(sparsity)
        return self.masks

    def _step(self, sparsity: float) -> None:
        inv = self.inverse()
        w = self._flat_weights()
        keep = self.masks.flat()
        diag = inv.diag().double()
        scores = w.square() / (2 * diag)
        new_keep = self._select(scores, keep, sparsity)
        dropped = keep & ~new_keep
        if self.update and bool(dropped.any()):
            z = torch.zeros_like(w)
            z[dropped] = w[dropped] / diag[dropped]
            w = w - inv.ihvp(z)
        w = w * new_keep
        self._set_flat_weights(w)
        self.masks.set_flat(new_keep)
        self.masks.apply()


@dataclass(frozen=True)
class GradualSchedule:
    """Gradual pruning across epochs (the M-FAC paper's recipe).

    Prune to ``sparsities[0]`` before epoch 0, to ``sparsities[1]`` before epoch
    ``prune_every``, and so on; ``lrs`` (length ``prune_every``, optional) are the learning
    rates of the fine-tuning epochs between two pruning steps (e.g. dropping before the next
    step); after the last step the optimizer's own learning rate is used again.

    Args:
        sparsities (Sequence[float]): increasing targets in [0, 1).
        prune_every (int): epochs between pruning steps.
        lrs (Sequence[float], optional): learning rate of each epoch after a pruning step.
    """

    sparsities: tuple[float, ...]
    prune_every: int
    lrs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        sparsities = tuple(
            _check_fraction(f"sparsities[{i}]", s) for i, s in enumerate(self.sparsities)
        )
        if not sparsities:
            raise ValueError("sparsities must not be empty")
        if any(b <= a for a, b in itertools.pairwise(sparsities)):
            raise ValueError(f"sparsities must increase, got {list(sparsities)}")
        object.__setattr__(self, "sparsities", sparsities)
        if isinstance(self.prune_every, bool) or not isinstance(self.prune_every, int):
            raise TypeError(f"prune_every must be an int, got {type(self.prune_every).__name__}")
        if self.prune_every < 1:
            raise ValueError(f"prune_every must be >= 1, got {self.prune_every}")
        if self.lrs is not None:
            lrs = tuple(float(lr) for lr in self.lrs)
            if len(lrs) != self.prune_every or not all(math.isfinite(x) and x > 0 for x in lrs):
                raise ValueError(
                    f"lrs must hold prune_every={self.prune_every} positive learning rates, "
                    f"got {list(self.lrs)}"
                )
            object.__setattr__(self, "lrs", lrs)

    @property
    def pruning_epochs(self) -> int:
        """Epochs until the last pruning step's fine-tuning interval ends."""
        return len(self.sparsities) * self.prune_every

    def sparsity_at(self, epoch: int) -> float | None:
        """The target to prune to before ``epoch``, or None (no pruning then)."""
        step, offset = divmod(epoch, self.prune_every)
        return self.sparsities[step] if offset == 0 and step < len(self.sparsities) else None

    def lr_at(self, epoch: int) -> float | None:
        """The learning rate of ``epoch`` during the pruning phase, None after it (or when no
        ``lrs`` were given)."""
        if self.lrs is None or epoch >= self.pruning_epochs:
            return None
        return self.lrs[epoch % self.prune_every]


def save_checkpoint(path: str | Path, model: nn.Module, masks: Masks, **extra: Any) -> Path:
    """``torch.save`` of ``{"model": state_dict, "masks": masks.state_dict(), **extra}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "masks": masks.state_dict(), **extra}, path)
    return path


def load_checkpoint(
    path: str | Path, model: nn.Module, params: Mapping[str, nn.Parameter] | None = None
) -> Masks:
    """Load a :func:`save_checkpoint` file into ``model``; returns its masks (applied) over
    ``params`` (default: :func:`default_prunable`)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "masks" not in state:
        raise ValueError(f"{path}: not a pruning checkpoint (needs 'model' and 'masks')")
    model.load_state_dict(state["model"])
    masks = Masks(default_prunable(model) if params is None else params, state["masks"])
    masks.apply()
    return masks

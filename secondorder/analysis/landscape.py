"""The loss on a 2-D plane of weight space, and optimizer trajectories projected onto it.

Weights are handled flattened, in the order of ``model.parameters()``
(``torch.nn.utils.parameters_to_vector``; the bench records trajectories in this layout,
``RunConfig.record_every``). The plane is ``{c + α d₁ + β d₂}`` around a centre ``c`` (the
final weights of a run); the loss at each grid point is evaluated with
``torch.func.functional_call``, so the model itself is never modified; buffers (BatchNorm
running statistics) are the model's own, and the model's mode (train/eval) is used as it is.

Directions:

* :func:`random_directions` -- filter-normalised random directions (Li et al., 2018,
  "Visualizing the Loss Landscape of Neural Nets", https://arxiv.org/abs/1712.09913): a
  Gaussian direction whose every filter (the slice ``[i]`` along dim 0 of a weight: an output
  channel of a convolution, a row of a Linear) is rescaled to the norm of the same filter of
  the centre weights, so the plane's scale follows each layer's own scale. Biases and other
  1-D parameters (normalisation scales and shifts) get a zero direction, as in Li et al.'s
  ``ignore='biasbn'``: they stay at the centre's values all over the plane.
* :func:`pca_directions` -- the top two principal directions of the recorded weights minus
  the centre (an uncentred SVD of the stacked offsets of every trajectory given, so the plane
  passes through the centre and fits all trajectories jointly), orthonormal, with the share of
  the offsets' squared norm each explains.

:func:`project` gives a trajectory's ``(α, β)`` coordinates (least squares on the plane: exact
for points in it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

__all__ = [
    "flat_weights",
    "loss_surface",
    "pca_directions",
    "project",
    "random_directions",
    "unflatten",
]


def flat_weights(model: nn.Module) -> Tensor:
    """``model.parameters()`` flattened into one vector (a detached copy, in their dtype)."""
    return parameters_to_vector(model.parameters()).detach().clone()


def unflatten(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """``{parameter name: tensor}`` views of a flat vector in the layout of
    :func:`flat_weights` (``functional_call``'s parameter dict)."""
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(
            f"a flat weight vector of this model has {total} entries, got shape {tuple(flat.shape)}"
        )
    out, offset = {}, 0
    for name, p in named:
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def random_directions(
    model: nn.Module,
    center: Tensor | None = None,
    *,
    seed: int = 0,
    count: int = 2,
) -> Tensor:
    """``count`` filter-normalised random directions, ``(count, parameters)`` float32.

    Args:
        model: gives the parameter shapes (and the centre weights if ``center`` is None).
        center: the flat weights the filters are normalised to (default: the model's own).
        seed: seeds the Gaussian draws (a private generator; the global RNG is untouched).
        count: number of directions.
    """
    center = flat_weights(model) if center is None else center.detach()
    weights = unflatten(model, center)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        parts = []
        for w in weights.values():
            if w.dim() <= 1:
                parts.append(torch.zeros(w.numel()))
                continue
            d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
            w64 = w.detach().cpu().double()
            d_norm = d.flatten(1).norm(dim=1)
            w_norm = w64.flatten(1).norm(dim=1)
            scale = torch.where(d_norm > 0, w_norm / d_norm, torch.zeros_like(d_norm))
            parts.append((d * scale.view(-1, *[1] * (w.dim() - 1))).reshape(-1).float())
        rows.append(torch.cat(parts))
    return torch.stack(rows).to(center.device)


def pca_directions(
    trajectories: Iterable[Tensor], center: Tensor, count: int = 2
) -> tuple[Tensor, Tensor]:
    """The top ``count`` principal directions of the recorded weights' offsets from ``center``.

    Args:
        trajectories: ``(records, parameters)`` tensors (one per optimizer, any number of
            records each).
        center: flat weights the plane goes through.
        count: number of directions.

    Returns:
        ``(directions, explained)``: ``(count, parameters)`` orthonormal rows (float64), and the
        share of the offsets' total squared norm along each. Signs are fixed so that the first
        trajectory's first record (the start) has non-negative coordinates.

    Raises:
        ValueError: fewer than ``count`` non-zero offsets, or a size that does not match.
    """
    c = center.detach().double().cpu()
    stacked = []
    for t in trajectories:
        if t.dim() != 2 or t.shape[1] != c.numel():
            raise ValueError(
                f"trajectories must be (records, {c.numel()}) tensors, got {tuple(t.shape)}"
            )
        stacked.append(t.detach().double().cpu() - c)
    if not stacked:
        raise ValueError("pca_directions needs at least one trajectory")
    offsets = torch.cat(stacked)
    _, sv, vh = torch.linalg.svd(offsets, full_matrices=False)
    total = float(sv.square().sum())
    if len(sv) < count or total == 0.0 or float(sv[count - 1]) <= 1e-12 * float(sv[0]):
        raise ValueError(
            f"the trajectories span fewer than {count} directions around the centre: record "
            "more steps (or more optimizers)"
        )
    directions = vh[:count].clone()
    first = stacked[0][0]
    for i in range(count):
        if float(directions[i] @ first) < 0:
            directions[i] = -directions[i]
    return directions, sv[:count].square() / total


def project(points: Tensor, center: Tensor, directions: Tensor) -> Tensor:
    """Coordinates ``(records, count)`` of ``points`` (``(records, parameters)``) on the plane
    ``center + Σ_k x_k directions[k]``: the least-squares solution of
    ``directions.T x = point − center`` (float64), exact for points on the plane."""
    d = directions.detach().double().cpu()
    offsets = points.detach().double().cpu() - center.detach().double().cpu()
    gram = d @ d.T
    return torch.linalg.solve(gram, d @ offsets.T).T


@torch.no_grad()
def loss_surface(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Sequence[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor],
    center: Tensor,
    directions: Tensor,
    alphas: Sequence[float] | Tensor,
    betas: Sequence[float] | Tensor,
    *,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """The loss at ``center + α d₁ + β d₂`` for every ``α`` in ``alphas`` and ``β`` in
    ``betas``: a float64 tensor ``(len(betas), len(alphas))`` (rows follow ``β``, the layout
    ``contourf(alphas, betas, surface)`` expects).

    Args:
        model: the network; its parameters are replaced through ``functional_call``, never
            written.
        loss_fn: ``(outputs, targets) -> scalar`` mean over the batch.
        data: ``(inputs, targets)``, or a list of such batches; the loss is the mean over all
            examples (each batch's mean weighted by its size).
        center: flat weights (:func:`flat_weights` layout).
        directions: ``(2, parameters)``.
        alphas, betas: grid coordinates along ``directions[0]`` and ``directions[1]``.
        progress: called with 1 after each grid point (a progress bar's ``update``).
    """
    batches = [data] if isinstance(data, tuple) else list(data)
    if directions.dim() != 2 or directions.shape[0] != 2:
        raise ValueError(f"directions must be (2, parameters), got {tuple(directions.shape)}")
    device = center.device
    dtype = next(model.parameters()).dtype
    c = center.detach().to(device=device, dtype=dtype)
    d1, d2 = (d.to(device=device, dtype=dtype) for d in directions)
    n = sum(len(y) for _, y in batches)
    alphas = [float(a) for a in alphas]
    betas = [float(b) for b in betas]
    surface = torch.empty(len(betas), len(alphas), dtype=torch.float64)
    for i, beta in enumerate(betas):
        for j, alpha in enumerate(alphas):
            weights = c + alpha * d1 + beta * d2 if alpha or beta else c
            params = unflatten(model, weights)
            total = 0.0
            for x, y in batches:
                loss = loss_fn(functional_call(model, params, (x,)), y)
                total += float(loss) * len(y)
            surface[i, j] = total / n
            if progress is not None:
                progress(1)
    return surface

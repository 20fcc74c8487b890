"""The loss landscape: grid values, filter-normalised and PCA directions, projections."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from secondorder.analysis import (
    flat_weights,
    loss_surface,
    pca_directions,
    project,
    random_directions,
    unflatten,
)

from ..helpers import mlp, small_cnn


def _data(n: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def test_grid_at_the_origin_is_the_models_loss() -> None:
    torch.manual_seed(0)
    model = small_cnn(channels=3, classes=5)
    x, y = _data()
    before = copy.deepcopy(model.state_dict())
    center = flat_weights(model)
    dirs = random_directions(model, seed=1)
    alphas = torch.linspace(-1, 1, 5)  # 0 is on the grid
    surface = loss_surface(model, F.cross_entropy, (x, y), center, dirs, alphas, alphas)
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y).item()
    assert surface.shape == (5, 5) and surface.dtype == torch.float64
    assert surface[2, 2].item() == expected
    # the loss changes away from the origin, and rows follow β, columns α
    assert surface[2, 0] != expected and surface[0, 2] != expected
    with torch.no_grad():
        vector_to_parameters(center + alphas[0] * dirs[0], model.parameters())
        moved = F.cross_entropy(model(x), y).item()
        vector_to_parameters(center, model.parameters())
    assert surface[2, 0].item() == pytest.approx(moved, rel=1e-6)
    # the model itself was never written
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_loss_over_several_batches_is_the_mean_over_examples() -> None:
    torch.manual_seed(0)
    model = mlp([4, 6, 3])
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 4, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    center = flat_weights(model)
    dirs = torch.zeros(2, center.numel())
    split = loss_surface(
        model, F.cross_entropy, [(x[:7], y[:7]), (x[7:], y[7:])], center, dirs, [0], [0]
    )
    whole = loss_surface(model, F.cross_entropy, (x, y), center, dirs, [0], [0])
    assert split.item() == pytest.approx(whole.item(), rel=1e-6)


def test_random_directions_are_filter_normalised() -> None:
    torch.manual_seed(0)
    model = small_cnn(channels=3, classes=5)
    dirs = random_directions(model, seed=3, count=2)
    assert dirs.shape == (2, sum(p.numel() for p in model.parameters()))
    assert not torch.equal(dirs[0], dirs[1])
    for d in dirs:
        for (name, p), part in zip(
            model.named_parameters(), unflatten(model, d).values(), strict=True
        ):
            if p.dim() == 1:
                assert torch.count_nonzero(part) == 0, name  # biases stay at the centre
                continue
            torch.testing.assert_close(
                part.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7
            )
    assert torch.equal(random_directions(model, seed=3), dirs)  # seeded
    assert not torch.equal(random_directions(model, seed=4), dirs)


def test_pca_directions_and_projection_recover_a_planar_trajectory() -> None:
    torch.manual_seed(0)
    p = 50
    center = torch.randn(p, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(p, 2, dtype=torch.float64))
    coords = torch.stack(
        [torch.linspace(3, 0, 9), torch.sin(torch.linspace(3, 0, 9))], dim=1
    ).double()
    trajectory = center + coords @ basis.T  # lies in the plane, ends at the centre
    other = center + torch.tensor([[1.0, -2.0], [0.5, -1.0]], dtype=torch.float64) @ basis.T
    dirs, explained = pca_directions([trajectory, other], center)
    assert dirs.shape == (2, p)
    torch.testing.assert_close(dirs @ dirs.T, torch.eye(2, dtype=torch.float64))
    assert float(explained.sum()) == pytest.approx(1.0)  # all offsets lie in the plane
    assert explained[0] >= explained[1]
    # the plane is the planted one, and the coordinates are exact up to a rotation
    torch.testing.assert_close(dirs @ basis @ basis.T, dirs, atol=1e-10, rtol=0)
    xy = project(trajectory, center, dirs)
    torch.testing.assert_close(xy.norm(dim=1), coords.norm(dim=1), atol=1e-10, rtol=0)
    torch.testing.assert_close(xy[-1], torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (xy[0] >= 0).all()  # sign convention: the first start has non-negative coordinates
    # non-orthogonal directions: least squares is still exact on the plane
    skew = torch.stack([dirs[0], dirs[0] + dirs[1]])
    back = project(trajectory, center, skew)
    torch.testing.assert_close(center + back @ skew, trajectory, atol=1e-10, rtol=0)


def test_pca_needs_two_directions() -> None:
    center = torch.zeros(5)
    line = torch.outer(torch.arange(4.0), torch.ones(5))
    with pytest.raises(ValueError, match="fewer than 2 directions"):
        pca_directions([line], center)
    with pytest.raises(ValueError, match="records"):
        pca_directions([torch.ones(3, 4)], center)


def test_unflatten_checks_the_size() -> None:
    model = mlp([3, 2])
    flat = parameters_to_vector(model.parameters())
    assert torch.equal(unflatten(model, flat)["0.weight"], model[0].weight)
    with pytest.raises(ValueError, match="8 entries"):
        unflatten(model, torch.zeros(7))

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

from ..helpers import assert_close, mlp, small_cnn, tolerance

#: roundings in small_cnn's loss on 40 examples: the two convolutions' 9- and 27-long sums,
#: the head's 96-long ones, the 5-class softmax and the mean over the examples
CNN_LOSS_N = 9 + 27 + 96 + 5 + 40


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
    # the same forward pass, but on views of the flat weights (other addresses and
    # alignment, by which CPU kernels may choose their blocking): float32 round-off
    rel = tolerance(torch.float32, n=CNN_LOSS_N)
    assert surface[2, 2].item() == pytest.approx(expected, rel=rel)
    # the loss changes away from the origin, and rows follow β, columns α
    assert surface[2, 0] != expected and surface[0, 2] != expected
    with torch.no_grad():
        vector_to_parameters(center + alphas[0] * dirs[0], model.parameters())
        moved = F.cross_entropy(model(x), y).item()
        vector_to_parameters(center, model.parameters())
    assert surface[2, 0].item() == pytest.approx(moved, rel=rel)
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
    # float32 forward passes on batches of 7 + 3 and of 10 (4- and 6-wide products, the
    # 3-class softmax, the mean over 10 examples)
    assert split.item() == pytest.approx(
        whole.item(), rel=tolerance(torch.float32, n=4 + 6 + 3 + 10)
    )


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
            # a random filter scaled to the weight filter's norm: two norms of at most 96
            # entries and a scaling, in float32
            want = p.detach().flatten(1).norm(dim=1)
            assert_close(part.flatten(1).norm(dim=1), want, dtype=torch.float32, n=2 * 96 + 2)
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
    # float64 throughout: sums over the p coordinates; the plane found from the offsets is
    # as accurate as their two non-zero singular values are apart from 0, cond = σ₁/σ₂
    sv = torch.linalg.svdvals(torch.cat([trajectory, other]) - center)
    cond = float(sv[0] / sv[1])
    assert_close(dirs @ dirs.T, torch.eye(2, dtype=torch.float64), dtype=torch.float64, n=p)
    rel = tolerance(torch.float64, n=p, cond=cond)
    assert float(explained.sum()) == pytest.approx(1.0, rel=rel)  # all offsets in the plane
    assert explained[0] >= explained[1]
    # the plane is the planted one, and the coordinates are exact up to a rotation
    assert_close(dirs @ basis @ basis.T, dirs, dtype=torch.float64, n=p, cond=cond, scale=1.0)
    xy = project(trajectory, center, dirs)
    size = float(coords.abs().max())
    assert_close(
        xy.norm(dim=1), coords.norm(dim=1), dtype=torch.float64, n=p, cond=cond, scale=size
    )
    zero = torch.zeros(2, dtype=torch.float64)
    assert_close(xy[-1], zero, dtype=torch.float64, n=p, cond=cond, scale=size)
    assert (xy[0] >= 0).all()  # sign convention: the first start has non-negative coordinates
    # non-orthogonal directions: least squares is still exact on the plane, to the
    # conditioning of the plane times that of the skewed pair
    skew = torch.stack([dirs[0], dirs[0] + dirs[1]])
    back = project(trajectory, center, skew)
    cond_skew = cond * float(torch.linalg.cond(skew))
    assert_close(center + back @ skew, trajectory, dtype=torch.float64, n=p, cond=cond_skew)


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

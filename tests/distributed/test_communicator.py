"""The communicator in one process (a world of one rank) and its pure parts."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import secondorder as so
from secondorder.distributed import Communicator, assign_by_cost, default_communicator
from secondorder.estimators.kfac import KroneckerStats

from ..helpers import assert_close


@given(st.lists(st.floats(0, 1e6), max_size=30), st.integers(1, 8))
def test_assign_by_cost_is_lpt(costs: list[float], world: int) -> None:
    owners = assign_by_cost(costs, world)
    assert len(owners) == len(costs) and all(0 <= r < world for r in owners)
    loads = [sum(c for c, r in zip(costs, owners, strict=True) if r == k) for k in range(world)]
    if costs:
        # Graham's bound for longest-job-first: no rank exceeds the mean by the largest job
        assert max(loads) <= sum(costs) / world + max(costs) + 1e-6
    assert owners == assign_by_cost(costs, world)  # the same on every rank


def test_assign_by_cost_balances_equal_jobs() -> None:
    assert sorted(assign_by_cost([8.0, 1.0, 1.0, 8.0], 2)) == [0, 0, 1, 1]
    assert assign_by_cost([27.0, 1.0, 1.0], 2) == [0, 1, 1]


@pytest.fixture
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_without_torch_distributed() -> None:
    assert default_communicator(None) is None
    with pytest.raises(RuntimeError, match="init_process_group"):
        default_communicator(True)
    with pytest.raises(TypeError, match="distributed must be a bool"):
        default_communicator("yes")  # type: ignore[arg-type]
    model = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="needs torch"):
        so.KFAC(model, distributed=True)


def test_one_rank_is_not_distributed_unless_asked(world_of_one) -> None:
    assert default_communicator(None) is None
    assert isinstance(default_communicator(True), Communicator)
    with pytest.raises(ValueError, match="process_group is given"):
        default_communicator(False, group=dist.group.WORLD)


def test_reduce_packs_symmetric_factors_exactly(world_of_one) -> None:
    comm = Communicator()
    a = torch.randn(2, 5, 5, dtype=torch.float64)
    a = a @ a.transpose(-1, -2)
    g = torch.randn(2, 3, 3)
    g = g @ g.transpose(-1, -2)
    diag = torch.rand(1, 4)
    stats = {
        "full": KroneckerStats(a_sum=a.clone(), g_sum=g.clone(), rows=7, examples=3),
        "diag": KroneckerStats(a_sum=diag.clone(), g_sum=g.clone(), rows=2, examples=2),
    }
    out = comm.reduce_statistics(["full", "diag", "absent"], stats)
    assert set(out) == {"full", "diag"}
    assert torch.equal(out["full"].a_sum, a) and out["full"].a_sum.dtype == torch.float64
    # a float32 g gᵀ is symmetric only to round-off over its 3 terms; one triangle travels
    assert_close(out["full"].g_sum, g, n=3)
    assert out["full"].rows == 7
    assert torch.equal(out["diag"].a_sum, diag) and out["diag"].examples == 2


def test_reduce_rejects_unknown_statistics(world_of_one) -> None:
    with pytest.raises(TypeError, match="cannot be reduced"):
        Communicator().reduce_statistics(["x"], {"x": object()})


def test_share_returns_every_result(world_of_one) -> None:
    comm = Communicator()
    results = comm.share(
        {"big": 8.0, "small": 1.0},
        lambda name: {"q": torch.full((2, 2), float(len(name))), "none": None},
    )
    assert torch.equal(results["big"]["q"], torch.full((2, 2), 3.0))
    assert results["small"]["none"] is None and comm.last_assignment == {"big": 0, "small": 0}


FLOAT64 = {"factor_dtype": torch.float64, "inverse_dtype": torch.float64}


def _digits_like_run(distributed: bool, opt_cls, **kw) -> list[torch.Tensor]:
    """Four steps in float64; returns each parameter's displacement from the seeded start."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    start = [p.detach().clone() for p in model.parameters()]
    opt = opt_cls(model, distributed=distributed, **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        # 32 examples: full-rank factors, so the eigenbases are unique
        x, y = torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x.double()), y).backward()
        opt.step()
    return [p.detach() - p0 for p, p0 in zip(model.parameters(), start, strict=True)]


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [
        (so.KFAC, {"curvature_every": 1, "inverse_every": 2, **FLOAT64}),
        (so.EKFAC, {"curvature_every": 1, "inverse_every": 2, **FLOAT64}),
        (
            so.TwoLevelKFAC,
            {"curvature_every": 1, "inverse_every": 2, "coarse_damping": 1.0, **FLOAT64},
        ),
        (so.AdaFisher, {}),
    ],
)
def test_one_rank_distributed_equals_local(world_of_one, opt_cls, kw) -> None:
    """The distributed path (packed statistics, a reduction over one rank, refreshes
    assigned and broadcast) sums in another order than the local one: compared in float64,
    at n = 32 rows summed into each factor and cond = 1e4 (a damped inverse whose damping
    is 1e-4 of the factors' scale at the least)."""
    local = _digits_like_run(False, opt_cls, **kw)
    shared = _digits_like_run(True, opt_cls, **kw)
    for a, b in zip(local, shared, strict=True):
        assert_close(a, b, n=32, cond=1e4)

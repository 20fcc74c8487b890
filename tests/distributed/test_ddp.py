"""Two gloo processes (torchrun) against one process on the concatenated batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ..robustness._common import assert_close_runs
from .ddp_worker import GLOBAL_BATCH, STEPS, make_model, train

WORKER = Path(__file__).with_name("ddp_worker.py")
#: roundings into a statistic over a run: STEPS global batches x the convolution's 16
#: output positions per example (half the rows on each rank, then summed across ranks)
RUN_N = STEPS * GLOBAL_BATCH * 16
OPTS = [
    "kfac",
    "kfac-cholesky",
    "ekfac",
    "twolevel",
    "adafisher",
    "adafisherw",
    "mfac",
    "adahessian",
    "kfac-partial",
    "kfac-amp",
    "shampoo",
    "soap",
]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)


def _launch(out: Path, float64: bool, backend: str = "gloo") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_BACKEND": backend}
    env.pop("DDP_FLOAT64", None)
    if float64:
        env["DDP_FLOAT64"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        "--opts",
        ",".join(OPTS),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        # gloo's background thread can abort a rank at process teardown on a heavily loaded
        # machine (seen once in CI, after every result was written): launch once more
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module", params=[False, True], ids=["float32", "float64"])
def runs(request, tmp_path_factory) -> tuple[Path, bool]:
    out = tmp_path_factory.mktemp("ddp64" if request.param else "ddp32")
    _launch(out, request.param)
    return out, request.param


def _start(float64: bool) -> dict:
    """The initial weights of every run but kfac-partial (the seeded make_model)."""
    model = make_model()
    return (model.double() if float64 else model).state_dict()


def _single(name: str, float64: bool, monkeypatch: pytest.MonkeyPatch) -> dict:
    if float64:
        monkeypatch.setenv("DDP_FLOAT64", "1")
    else:
        monkeypatch.delenv("DDP_FLOAT64", raising=False)
    model, opt = train(name, 0, 1)
    assert opt.comm is None
    return model.state_dict()


@pytest.mark.parametrize("name", OPTS)
def test_ranks_agree_and_match_the_concatenated_batch(runs, name, monkeypatch) -> None:
    out, float64 = runs
    r0 = torch.load(out / f"{name}_rank0.pt")
    r1 = torch.load(out / f"{name}_rank1.pt")
    info = json.loads((out / f"{name}_rank0.json").read_text())
    assert info["world"] == 2 and info["comm"]
    for key in r0:  # every rank applies the same update, computed from the same numbers
        assert torch.equal(r0[key], r1[key]), key
    if name == "kfac-partial":
        return  # a layer recorded on one rank only is dropped: no single-process twin
    # GradScaler with an exact scale: the plain K-FAC run of one process. Two ranks sum
    # their halves of every batch and then add them: round-off of another summation order
    reference = _single("kfac" if name == "kfac-amp" else name, float64, monkeypatch)
    keys, start = list(reference), _start(float64)
    assert_close_runs(
        [r0[k] for k in keys],
        [reference[k] for k in keys],
        [start[k] for k in keys],
        dtype=torch.float64 if float64 else torch.float32,
        n=RUN_N,
    )


def test_refreshes_are_shared_out(runs) -> None:
    out, _ = runs
    info = [json.loads((out / f"kfac_rank{r}.json").read_text()) for r in (0, 1)]
    assignment = info[0]["assignment"]
    assert assignment == info[1]["assignment"]
    assert set(assignment) == {"0", "3", "4", "6"}  # every covered layer, once
    assert set(assignment.values()) == {0, 1}  # both ranks take a share


def test_layer_seen_on_some_ranks_only_is_dropped_everywhere(runs) -> None:
    out, _ = runs
    info = [json.loads((out / f"kfac-partial_rank{r}.json").read_text()) for r in (0, 1)]
    # heads a and b at steps 1, 3, 5: two dropped layer updates per odd step
    assert info[0]["dropped"] == info[1]["dropped"] == 6


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
    reason="needs two CUDA devices and NCCL",
)
def test_nccl_ranks_agree_and_match_one_process(tmp_path, monkeypatch) -> None:
    # the workers turn TF32 off for cuBLAS and cuDNN (ddp_worker.main): float32 throughout
    _launch(tmp_path, False, backend="nccl")
    start = _start(False)
    for name in ("kfac", "ekfac", "twolevel", "adafisher"):
        r0 = torch.load(tmp_path / f"{name}_rank0.pt")
        r1 = torch.load(tmp_path / f"{name}_rank1.pt")
        reference = _single(name, False, monkeypatch)  # on the CPU
        for key in reference:
            assert torch.equal(r0[key], r1[key]), (name, key)
        keys = list(reference)
        assert_close_runs(
            [r0[k] for k in keys],
            [reference[k] for k in keys],
            [start[k] for k in keys],
            dtype=torch.float32,
            n=RUN_N,
        )

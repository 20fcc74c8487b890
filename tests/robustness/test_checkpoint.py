"""Checkpoints: a run saved with ``torch.save`` and resumed in a fresh Python process follows
the uninterrupted run bit for bit, for every optimizer; a state saved from another model is
rejected with a ``ValueError`` that says what does not fit.

Bit-identical (``atol=0``) is expected and achieved: the resumed process uses the same
single-threaded CPU kernels on the same data, every quantity the next steps depend on is in
the state dict (K-FAC's factors *and* the factors the current inverses came from, M-FAC's
window and dot products, AdaHessian's probe generator), and inverses are recomputed from
them by the same code.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ._common import (
    ALL,
    VARIANTS,
    assert_same,
    batches,
    make_optimizer,
    params_of,
    tiny_model,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
SAVED_AFTER, RESUMED_FOR = 5, 4  # with inverse_every=3: saved between a factor update and
# the next refresh, so the inverses' source factors differ from the current ones
NAMES = ALL + list(VARIANTS)

CHILD = textwrap.dedent(
    """
    import sys

    import torch

    from tests.robustness._common import batches, make_optimizer, tiny_model, train

    folder, k, n, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    data = batches(k + n)
    for name in names:
        checkpoint = torch.load(f"{folder}/{name}.pt", weights_only=True)
        model = tiny_model(seed=1234)  # other initial weights: all must come from the file
        opt = make_optimizer(name, model)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        train(model, opt, data[k:])
        torch.save([p.detach() for p in model.parameters()], f"{folder}/{name}.resumed.pt")
    """
)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """For every optimizer: the uninterrupted run's final parameters (this process) and the
    resumed run's (a fresh interpreter that loads the checkpoint)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    data = batches(SAVED_AFTER + RESUMED_FOR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child (OMP_NUM_THREADS=1): the same reductions
    try:
        straight = {}
        for name in NAMES:
            model = tiny_model()
            opt = make_optimizer(name, model)
            train(model, opt, data[:SAVED_AFTER])
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict()}, folder / f"{name}.pt"
            )
            train(model, opt, data[SAVED_AFTER:])
            straight[name] = params_of(model)
    finally:
        torch.set_num_threads(threads)
    script = folder / "resume.py"
    script.write_text(CHILD)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    args = [str(folder), str(SAVED_AFTER), str(RESUMED_FOR), *NAMES]
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"the resuming process failed:\n{proc.stderr[-4000:]}"
    resumed = {name: torch.load(folder / f"{name}.resumed.pt") for name in NAMES}
    return straight, resumed


@pytest.mark.parametrize("name", NAMES)
def test_resumed_in_a_fresh_process_matches_the_uninterrupted_run_bit_for_bit(name, resumed_runs):
    straight, resumed = resumed_runs
    assert len(straight[name]) == len(resumed[name])
    for i, (a, b) in enumerate(zip(straight[name], resumed[name], strict=True)):
        assert torch.equal(a, b), (
            f"{name}: parameter {i} differs after resuming (max |diff| "
            f"{(a - b).abs().max().item():.3g})"
        )


@pytest.mark.parametrize("name", NAMES)
def test_resuming_moves_the_parameters(name, resumed_runs):
    """Guards the test above against a vacuous pass: the resumed steps did something."""
    data = batches(SAVED_AFTER)
    model = tiny_model()
    train(model, make_optimizer(name, model), data)
    _, resumed = resumed_runs
    assert any(not torch.equal(a, b) for a, b in zip(params_of(model), resumed[name], strict=True))


# ---- a state from another model ----------------------------------------------------------
# (what the message must name, for a model whose layer 3 is 12 wide instead of 10)
_FACTOR = r"layer '3' has a factor of shape \(1, 10, 10\) where the layer needs \(1, 12, 12\)"
_DIAGONAL = r"layer '3' has a diagonal of shape \(1, 10\) where the layer needs \(1, 12\)"
OTHER_SHAPES = {
    "kfac": _FACTOR,
    "ekfac": _FACTOR,
    "twolevel": _FACTOR,
    "mfac": r"window of shape \(1, 8, 403\) \(blocks, m, block\) where this optimizer has "
    r"\(1, 8, 479\)",
    "adafisher": _DIAGONAL,
    "adafisherw": _DIAGONAL,
    "adahessian": r"'exp_avg' of shape \(10, 32\) for parameter 3.weight of shape \(12, 32\)",
    "shampoo": r"stats\[0\] of shape \(10, 10\) for parameter 3.weight of shape \(12, 32\)",
    "soap": r"exp_avg of shape \(10, 32\) for parameter 3.weight of shape \(12, 32\)",
}


def _saved_state(name: str) -> dict:
    model = tiny_model()
    opt = make_optimizer(name, model)
    train(model, opt, batches(3))
    return copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("name", ALL)
def test_state_of_a_model_with_other_layer_shapes_is_rejected_naming_the_layer(name):
    other = make_optimizer(name, tiny_model(width=12))
    with pytest.raises(ValueError, match=OTHER_SHAPES[name]) as info:
        other.load_state_dict(_saved_state(name))
    assert "different model" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_state_of_a_model_with_another_number_of_layers_is_rejected(name):
    other = make_optimizer(name, tiny_model(depth=2))
    # torch.optim's own check comes first (the parameter count of the group); a library
    # check of its own would name the model
    with pytest.raises(ValueError, match=r"doesn't match the size of optimizer's group|different"):
        other.load_state_dict(_saved_state(name))


@pytest.mark.parametrize("name", ALL)
def test_a_rejected_state_leaves_the_optimizer_as_it_was(name):
    model = tiny_model(width=12)
    opt = make_optimizer(name, model)
    data = batches(3)
    train(model, opt, data[:2])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError):
        opt.load_state_dict(_saved_state(name))
    assert_same(before, opt.state_dict())
    train(model, opt, data[2:])  # and it still trains


@pytest.mark.parametrize(("saved", "loading"), [("sgd", "adam"), ("adam", "sgd")])
def test_a_state_saved_with_another_base_update_is_rejected_naming_the_base(saved, loading):
    import secondorder as so

    model = tiny_model()
    opt = so.MFAC(model, base=saved, ngrads=4)
    train(model, opt, batches(2))
    state = copy.deepcopy(opt.state_dict())
    other = so.MFAC(tiny_model(), base=loading, ngrads=4)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=rf"another base update.*base='{loading}'"):
        other.load_state_dict(state)
    assert_same(before, other.state_dict())

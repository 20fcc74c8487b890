"""Every example runs in its smoke setting, prints a finite result line and learns something.

The examples are imported and their ``main(argv)`` called (one interpreter, torch imported
once); one of them is also run as a script, to check the ``__main__`` path.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHANCE = math.log(10)  # cross-entropy of a uniform guess over the 10 classes
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|nan|inf", re.IGNORECASE)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(out: str, label: str) -> dict[str, float]:
    """The numbers after each ``label`` in the last printed line, checked to be finite."""
    last = out.strip().splitlines()[-1]
    values = {}
    for name in label.split(","):
        match = re.search(re.escape(name) + r"\s+(" + _NUMBER.pattern + ")", last, re.I)
        assert match, f"{name!r} not in the last line {last!r}"
        values[name] = float(match.group(1))
        assert math.isfinite(values[name]), last
    return values


def test_every_example_is_tested():
    tested = {
        "kfac_digits", "mfac_digits", "adafisher_loop", "adahessian_loop",
        "kfac_timm_resnet", "autoencoder_kfac_vs_adam", "mfac_adam", "prune_digits",
        "ddp_kfac", "shampoo_soap",
    }  # fmt: skip
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_kfac_digits_example_smoke(capsys):
    loss = _load("kfac_digits").main(["--smoke"])
    printed = _result(capsys.readouterr().out, "epoch 1: train loss")
    assert printed["epoch 1: train loss"] == pytest.approx(loss, abs=1e-4)
    assert loss < 0.8 * CHANCE


def test_mfac_digits_example_smoke(capsys):
    example = _load("mfac_digits")
    loss = example.main(["--smoke", "--sparsity", "0.5"])
    out = capsys.readouterr().out
    assert _result(out, "train loss")["train loss"] < 0.8 * CHANCE
    assert "zeros in layer 0 0.50" in out  # pruned weights stayed zero
    loss = example.main(["--smoke", "--base", "adam"])
    assert _result(capsys.readouterr().out, "train loss")["train loss"] < CHANCE
    assert math.isfinite(loss)


@pytest.mark.parametrize("flags", [[], ["--decoupled"]])
def test_adafisher_loop_example_smoke(capsys, flags):
    loss = _load("adafisher_loop").main(["--smoke", *flags])
    printed = _result(capsys.readouterr().out, "epoch 1: train loss,test accuracy")
    assert printed["epoch 1: train loss"] == pytest.approx(loss, abs=1e-4)
    assert loss < 0.8 * CHANCE


@pytest.mark.parametrize("every", ["1", "2"])
def test_adahessian_loop_example_smoke(capsys, every):
    loss = _load("adahessian_loop").main(["--smoke", "--hessian-every", every])
    printed = _result(capsys.readouterr().out, "epoch 1: train loss,test accuracy")
    assert printed["epoch 1: train loss"] == pytest.approx(loss, abs=1e-4)
    assert loss < 0.8 * CHANCE


def test_mfac_adam_example_smoke(capsys):
    losses = _load("mfac_adam").main(["--smoke"])
    printed = _result(capsys.readouterr().out, "adam-mfac train loss,adam train loss")
    assert printed["adam-mfac train loss"] == pytest.approx(losses["adam-mfac"], abs=1e-4)
    assert max(losses.values()) < 0.8 * CHANCE  # both learned from the same start


def test_autoencoder_example_smoke(capsys):
    mse = _load("autoencoder_kfac_vs_adam").main(["--smoke"])
    out = capsys.readouterr().out
    assert "scikit-learn digits at their own 8x8" in out  # says which data it used
    printed = _result(out, "kfac test mse,adam test mse")
    assert printed["kfac test mse"] == pytest.approx(mse["kfac"], abs=1e-5)
    # sigmoid outputs near 0.5 at the start give mse ~0.2; one epoch reaches the mean image
    assert max(mse.values()) < 0.1


def test_kfac_timm_resnet_example_smoke(capsys):
    pytest.importorskip("timm")
    loss = _load("kfac_timm_resnet").main(["--smoke"])  # batch 8, 2 steps, random data
    out = capsys.readouterr().out
    assert "RANDOM 32x32 images" in out
    assert "'BatchNorm2d': 20" in out and "base update only: none" in out
    printed = _result(out, "loss,step")
    assert printed["loss"] == pytest.approx(loss, abs=1e-4) and printed["step"] > 0
    assert out.count("epoch 1 step") == 2


def test_prune_digits_example_smoke(capsys):
    results = _load("prune_digits").main(["--smoke"])
    printed = _result(
        capsys.readouterr().out, "mfac accuracy,magnitude accuracy,finetuned accuracy"
    )
    assert printed["mfac accuracy"] == pytest.approx(results["mfac"], abs=1e-4)
    assert results["sparsity"] == pytest.approx(0.9, abs=1e-3)  # still 90% after fine-tuning
    assert results["mfac"] > results["magnitude"]
    assert results["finetuned"] > 0.5


def test_shampoo_soap_example_smoke(capsys):
    example = _load("shampoo_soap")
    losses = example.main(["--smoke"])
    out = capsys.readouterr().out
    printed = _result(out, "shampoo,soap,adam")
    assert set(losses) == {"shampoo", "soap", "adam"}
    for name, loss in losses.items():
        assert printed[name] == pytest.approx(loss, abs=1e-4)
        assert loss < 0.8 * CHANCE  # every one learned in one epoch, with its defaults
    with pytest.raises(SystemExit):
        example.main(["--smoke", "--opt", "lbfgs"])


def test_example_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "adahessian_loop.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert _result(done.stdout, "train loss")["train loss"] < 0.8 * CHANCE


@pytest.mark.parametrize("opt", ["kfac", "adafisher"])
def test_ddp_example_under_torchrun(opt):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(EXAMPLES / "ddp_kfac.py"), "--smoke", "--opt", opt]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 1  # only rank 0 prints
    printed = _result(lines[0], "epoch 1: train loss,test accuracy")
    assert printed["epoch 1: train loss"] < 0.3 * CHANCE
    assert printed["test accuracy"] > 0.8

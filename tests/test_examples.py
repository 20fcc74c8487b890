"""Every example runs in its smoke setting and learns something."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kfac_digits_example_smoke(capsys):
    loss = _load("kfac_digits").main(["--smoke"])
    assert math.isfinite(loss) and loss < 0.8 * math.log(10)
    assert "epoch 1: train loss" in capsys.readouterr().out


def test_mfac_digits_example_smoke(capsys):
    example = _load("mfac_digits")
    loss = example.main(["--smoke", "--sparsity", "0.5"])
    assert math.isfinite(loss) and loss < 0.8 * math.log(10)
    assert "zeros in layer 0 0.50" in capsys.readouterr().out  # pruned weights stayed zero
    loss = example.main(["--smoke", "--base", "adam"])
    assert math.isfinite(loss) and loss < math.log(10)


@pytest.mark.parametrize("flags", [[], ["--decoupled"]])
def test_adafisher_loop_example_smoke(capsys, flags):
    loss = _load("adafisher_loop").main(["--smoke", *flags])
    assert math.isfinite(loss) and loss < 0.8 * math.log(10)
    assert "epoch 1: train loss" in capsys.readouterr().out


@pytest.mark.parametrize("every", ["1", "2"])
def test_adahessian_loop_example_smoke(capsys, every):
    loss = _load("adahessian_loop").main(["--smoke", "--hessian-every", every])
    assert math.isfinite(loss) and loss < 0.8 * math.log(10)
    assert "epoch 1: train loss" in capsys.readouterr().out

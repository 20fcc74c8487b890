"""The benchmark tasks beyond digits classification: shapes, trainability, planted targets, and
the data-folder tasks on tiny fake datasets written in the exact on-disk formats."""

from __future__ import annotations

import math
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from secondorder.bench.models import CifarInput, cifar_resnet
from secondorder.bench.optimizers import OPTIMIZERS
from secondorder.bench.runner import RunConfig, train
from secondorder.bench.tasks import (
    DATA_ENV,
    TASKS,
    DataNotFoundError,
    accuracy,
    data_dir,
    set_data_dir,
    toy_teacher,
)

from ..helpers import assert_close, tolerance

REAL_TASKS = [
    "cifar10-resnet18",
    "cifar10-resnet20",
    "cifar10-resnet32",
    "cifar100-resnet18",
    "mnist-ae",
    "char-gpt",
]


def _sgd_steps(name: str, steps: int = 30, lr: float = 0.1) -> tuple[float, float]:
    task = TASKS[name]
    data = task.data()
    model = task.build_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = data.x_train[:256], data.y_train[:256]
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize(
    ("name", "x_shape", "y_shape", "out_shape"),
    [
        ("digits-ae", (1437, 64), (1437, 64), (5, 64)),
        ("toy-regression", (2000, 20), (2000, 1), (5, 1)),
        ("toy-classification", (2000, 20), (2000,), (5, 5)),
    ],
)
def test_builtin_task_shapes_and_training(
    name: str, x_shape: tuple, y_shape: tuple, out_shape: tuple
) -> None:
    task = TASKS[name]
    data = task.data()
    assert tuple(data.x_train.shape) == x_shape
    assert tuple(data.y_train.shape) == y_shape
    assert len(data.x_test) == (360 if name == "digits-ae" else 500)
    assert tuple(task.build_model(0)(data.x_train[:5]).shape) == out_shape
    first, last = _sgd_steps(name, lr=0.5 if name == "digits-ae" else 0.1)
    assert math.isfinite(last) and last < 0.9 * first, (first, last)


def test_digits_ae_targets_and_metric() -> None:
    task = TASKS["digits-ae"]
    data = task.data()
    assert torch.equal(data.x_train, data.y_train) and torch.equal(data.x_test, data.y_test)
    assert 0 <= data.y_train.min() and data.y_train.max() <= 1
    assert not task.higher_is_better and task.metric_name == "test_mse"
    assert task.likelihood == "bernoulli"
    # metric is the MSE of the sigmoid outputs: perfect logits give ~0, all-zero logits give
    # the mean squared distance to 0.5
    y = data.y_test
    # the clamp moves 0 and 1 by 1e-6; logit and sigmoid round a few times in float32
    assert (
        task.metric(torch.logit(y.clamp(1e-6, 1 - 1e-6)), y)
        < (1e-6 + tolerance(torch.float32, n=6)) ** 2
    )
    # two float32 means over every pixel of the test set
    want = ((y.double() - 0.5) ** 2).mean().item()
    rel = tolerance(torch.float32, n=y.numel())
    assert task.metric(torch.zeros_like(y), y) == pytest.approx(want, rel=rel)


def test_toy_targets_are_planted() -> None:
    reg, cls = TASKS["toy-regression"].data(), TASKS["toy-classification"].data()
    assert torch.equal(reg.x_train, cls.x_train)  # the same Gaussian inputs
    assert reg.x_train.std().item() == pytest.approx(1.0, abs=0.05)
    teacher = toy_teacher("regression")
    # the targets are the teacher's outputs, computed in another batch: float32 round-off of
    # the 20- and 32-long products (tanh is 1-Lipschitz), relative to Σ|w||input| per layer
    w1, b1, w2, b2 = teacher[0].weight, teacher[0].bias, teacher[2].weight, teacher[2].bias
    x = reg.x_test
    hidden = torch.tanh(x @ w1.T + b1).abs()
    size = (hidden @ w2.abs().T + b2.abs() + (x.abs() @ w1.abs().T + b1.abs()) @ w2.abs().T).max()
    bound = tolerance(torch.float32, n=20 + 32 + 2) * size.item()
    assert torch.nn.functional.mse_loss(teacher(reg.x_test), reg.y_test).item() <= bound**2
    assert reg.y_train.std().item() == pytest.approx(1.0, abs=0.01)  # not a trivial target
    teacher = toy_teacher("classification")
    assert accuracy(teacher(cls.x_train), cls.y_train) == 1.0
    assert accuracy(teacher(cls.x_test), cls.y_test) == 1.0
    counts = cls.y_train.bincount(minlength=5)
    assert counts.min() > 0.05 * len(cls.y_train)  # every class present
    # deterministic: a second teacher is identical
    a, b = toy_teacher("classification"), toy_teacher("classification")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="kind"):
        toy_teacher("other")


def test_resnet_parameter_counts() -> None:
    # He et al. (2016), Table 6: ResNet-20 0.27M, ResNet-32 0.46M
    for depth, paper in ((20, 0.27e6), (32, 0.46e6)):
        n = sum(p.numel() for p in cifar_resnet(depth, 10).parameters())
        assert abs(n - paper) / paper < 0.03, (depth, n)
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21, 10)


def test_cifar_input_augmentation() -> None:
    pre = CifarInput((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.full((16, 3, 32, 32), 255, dtype=torch.uint8)
    pre.eval()
    # (255/255 − 0.5)/0.25: three float32 roundings
    assert_close(pre(x), torch.full((16, 3, 32, 32), 2.0), dtype=torch.float32, n=3)
    pre.train()
    torch.manual_seed(0)
    out = pre(x)
    assert out.shape == x.shape
    # each pixel is the image (2.0) or the zero padding ((0 - 0.5) / 0.25 = -2.0)
    assert set(out.unique().tolist()) <= {2.0, -2.0}
    assert (out == -2.0).any()  # some crop was shifted
    ramp = torch.arange(32, dtype=torch.uint8).expand(2, 3, 32, 32) * 8
    flipped = 0
    for _ in range(20):
        out = CifarInput((0.0,) * 3, (1.0,) * 3, pad=0).train()(ramp)
        flipped += int((out[:, 0, 0, 0] > out[:, 0, 0, -1]).sum())
    assert 0 < flipped < 40  # flips happen, not always


# --- the data-folder tasks on fake data ----------------------------------------------------------


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_cifar10(root: Path, n: int = 8) -> None:
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(
            base / name,
            {
                b"batch_label": name.encode(),
                b"labels": rng.integers(0, 10, n).tolist(),
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"filenames": [b"x.png"] * n,
            },
        )
    _pickle(base / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})


def _fake_cifar100(root: Path, n: int = 8) -> None:
    rng = np.random.default_rng(1)
    base = root / "cifar-100-python"
    for name in ("train", "test"):
        _pickle(
            base / name,
            {
                b"fine_labels": rng.integers(0, 100, n).tolist(),
                b"coarse_labels": rng.integers(0, 20, n).tolist(),
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            },
        )
    _pickle(base / "meta", {b"fine_label_names": [b"c%d" % i for i in range(100)]})


def _fake_mnist(root: Path, n_train: int = 12, n_test: int = 6) -> None:
    rng = np.random.default_rng(2)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        # idx format: big-endian magic (0, 0, type 0x08 = ubyte, number of dims), then the dims
        header = struct.pack(">IIII", 0x00000803, n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x00000801, n) + labels.tobytes()
        )


def _fake_text(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    (root / "input.txt").write_text(text * 40, encoding="utf-8")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _fake_cifar10(root)
    _fake_cifar100(root)
    _fake_mnist(root)
    _fake_text(root)
    return root


@pytest.mark.parametrize("name", REAL_TASKS)
def test_real_task_on_fake_data(
    name: str, fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(fake_root))
    task = TASKS[name]
    data = task.data()
    model = task.build_model(0)
    if name.startswith("cifar"):
        assert data.x_train.shape == (40, 3, 32, 32) if "cifar10-" in name else (8, 3, 32, 32)
        assert data.x_train.dtype == torch.uint8 and data.y_train.dtype == torch.long
        assert int(data.y_train.max()) < (100 if "cifar100" in name else 10)
        out_dim = 100 if "cifar100" in name else 10
        assert model(data.x_test[:2]).shape[-1] == out_dim
    elif name == "mnist-ae":
        assert data.x_train.shape == (12, 784) and data.x_test.shape == (6, 784)
        assert torch.equal(data.x_train, data.y_train) and data.x_train.max() <= 1
    else:
        assert data.x_train.shape[1] == 64 and data.x_train.shape == data.y_train.shape
        assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])  # next character
        assert model(data.x_test[:2]).shape == (
            2,
            64,
            len(set((fake_root / "input.txt").read_text())),
        )
    model.train()
    loss = task.loss_fn(model(data.x_train[:4]), data.y_train[:4])
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert math.isfinite(task.metric(model(data.x_test[:4]), data.y_test[:4]))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10-resnet18", "cifar-10-batches-py"),
        ("cifar10-resnet20", "cifar-10-batches-py"),
        ("cifar10-resnet32", "cifar-10-batches-py"),
        ("cifar100-resnet18", "cifar-100-python"),
        ("mnist-ae", "MNIST/raw"),
        ("char-gpt", "input.txt"),
    ],
)
def test_missing_data_names_the_path(
    name: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    path = str(tmp_path.resolve() / expected)
    with pytest.raises(DataNotFoundError, match=re.escape(path)) as info:
        TASKS[name].data()
    assert "never downloads" in str(info.value) and "\n" not in str(info.value)
    assert name in str(info.value)


def test_set_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_dir() == Path("data").resolve()
    set_data_dir(tmp_path)
    assert data_dir() == tmp_path.resolve()
    set_data_dir(None)
    assert data_dir() == Path("data").resolve()


@pytest.mark.parametrize("name", ["digits-ae", "toy-regression", "char-gpt"])
def test_runner_trains_new_tasks(
    name: str, fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(fake_root))
    task = TASKS[name]
    config = RunConfig(task=name, epochs=1, batch_size=16, quiet=True)
    result = train("sgd", OPTIMIZERS["sgd"].defaults, config)
    summary = result["summary"]
    assert not summary["diverged"] and math.isfinite(summary[task.metric_name])
    assert result["curves"]["epoch"] == [0, 1]


def test_runner_reports_the_lowest_error_as_best_for_lower_is_better_tasks():
    from secondorder.bench import run_bench

    results = run_bench(["sgd"], "toy-regression", epochs=2, isolate=False, quiet=True)
    summary = results["results"]["sgd"]["summary"]
    assert summary["error"] is None
    assert summary["best_test_mse"] <= summary["test_mse"]


def test_cli_data_folder_reaches_the_loader(tmp_path, capsys, monkeypatch):
    """--data is where the real tasks look (an empty folder: the error names it)."""
    from secondorder.bench.__main__ import main

    monkeypatch.setenv("SECONDORDER_DATA", "unused")  # restored after the test
    argv = ["--opt", "sgd", "--task", "cifar10-resnet20", "--epochs", "1"]
    argv += ["--data", str(tmp_path), "--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except Exception as exc:
        message = str(exc)
    else:
        assert code != 0
        captured = capsys.readouterr()
        message = captured.out + captured.err
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "never downloads" in message


def test_generated_corpus_is_deterministic_and_needs_no_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from secondorder.bench.tasks import generated_corpus

    text = generated_corpus()
    assert text == generated_corpus() and len(text) == 16_384
    assert text.startswith("My river waits at night. ")  # pinned: random.Random is portable
    assert generated_corpus(500, seed=1) != text[:500]
    assert len(generated_corpus(100)) == 100
    with pytest.raises(ValueError, match="chars"):
        generated_corpus(0)

    monkeypatch.setenv(DATA_ENV, str(tmp_path))  # an empty folder: nothing is read from it
    task = TASKS["char-gpt-generated"]
    task.check_data()
    data = task.data()
    assert data.x_train.shape == (460, 32) and data.x_test.shape == (51, 32)
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])  # next character
    vocab = len(set(text))
    assert task.build_model(0)(data.x_test[:2]).shape == (2, 32, vocab)


def test_generated_corpus_task_is_learnable_with_adam() -> None:
    task = TASKS["char-gpt-generated"]
    data = task.data()
    model = task.build_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = data.x_train[:32], data.y_train[:32]
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = task.loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # from about log(30) = 3.4 nats per character to well under the unigram entropy (3.0)
    assert losses[0] > 3.0 and losses[-1] < 2.5, losses

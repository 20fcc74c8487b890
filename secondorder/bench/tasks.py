"""Benchmark tasks: a model, its data, its loss and its metric.

A task is registered once in :data:`TASKS` under the name the CLI accepts. Everything the runner
needs to train and score a model comes from the :class:`Task`; the runner never looks inside the
model or the data beyond ``model(x)`` and ``task.loss_fn(logits, y)``.

Both tasks here use scikit-learn's digits (1797 8x8 grey images, 10 classes), which ships inside
the installed package, so the bench runs offline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_TASK", "TASKS", "Task", "TaskData", "accuracy"]

# The digits split is part of the benchmark's definition: a fixed seed and size, so that numbers
# from different runs and machines are comparable.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_SIZE = 360  # 1437 train / 360 test, stratified by class


@dataclass(frozen=True)
class TaskData:
    """Train and test tensors of one task, on the CPU, inputs already shaped for the model."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device | str) -> TaskData:
        """Return a copy with every tensor moved to ``device``."""
        tensors = (self.x_train, self.y_train, self.x_test, self.y_test)
        return TaskData(*(t.to(device) for t in tensors))


def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Fraction of rows whose arg-max class equals the target, in [0, 1]."""
    return (logits.argmax(dim=-1) == targets).float().mean().item()


@dataclass(frozen=True)
class Task:
    """One benchmark problem.

    Args:
        name: the registry key and the CLI's ``--task`` value.
        description: one line shown by ``--help`` and stored in ``results.json``.
        make_model: builds a freshly initialised model; :meth:`build_model` seeds it.
        make_data: loads the data; it is called once per process (results are cached).
        loss_fn: ``(logits, targets) -> scalar`` mean loss over the batch.
        metric: ``(logits, targets) -> float`` scored on the test set after each epoch.
        metric_name: the key the metric is stored under in the results.
        epochs: default number of epochs for this task.
        batch_size: default mini-batch size for this task.
    """

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[[], TaskData]
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    metric: Callable[[Tensor, Tensor], float] = accuracy
    metric_name: str = "test_accuracy"
    epochs: int = 20
    batch_size: int = 64

    def build_model(self, seed: int) -> nn.Module:
        """Build the model with weights drawn from ``seed``; the global RNG is left untouched.

        Equal seeds give bit-identical initial weights, which is what lets the bench compare
        optimizers from the same starting point.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.make_model()

    def data(self) -> TaskData:
        """The task's train and test tensors (CPU)."""
        return self.make_data()


@functools.cache
def _digits_arrays() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Imported here so that `import secondorder.bench` stays cheap.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype("float32") / 16.0  # pixel values are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        x,
        digits.target,
        test_size=_DIGITS_TEST_SIZE,
        stratify=digits.target,
        random_state=_DIGITS_SPLIT_SEED,
    )
    return (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr).long(),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te).long(),
    )


def _digits_flat() -> TaskData:
    return TaskData(*_digits_arrays())


def _digits_images() -> TaskData:
    x_tr, y_tr, x_te, y_te = _digits_arrays()
    return TaskData(x_tr.view(-1, 1, 8, 8), y_tr, x_te.view(-1, 1, 8, 8), y_te)


def _digits_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.Tanh(),
        nn.Linear(128, 64),
        nn.Tanh(),
        nn.Linear(64, 10),
    )


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),  # 16 x 8 x 8
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),  # 32 x 4 x 4
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="digits-mlp",
            description="scikit-learn digits (1437 train / 360 test), MLP 64-128-64-10 with tanh",
            make_model=_digits_mlp,
            make_data=_digits_flat,
        ),
        Task(
            name="digits-cnn",
            description=(
                "scikit-learn digits as 1x8x8 images, CNN conv3x3(16) - conv3x3/2(32) - linear(10)"
            ),
            make_model=_digits_cnn,
            make_data=_digits_images,
        ),
    )
}
"""Every benchmark task, by the name ``--task`` accepts."""

DEFAULT_TASK = "digits-mlp"

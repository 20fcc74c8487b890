"""Benchmark tasks: a model, its data, its loss and its metric.

A task is registered once in :data:`TASKS` under the name the CLI accepts. Everything the runner
needs to train and score a model comes from the :class:`Task`; the runner never looks inside the
model or the data beyond ``model(x)`` and ``task.loss_fn(logits, y)``.

The digits tasks use scikit-learn's digits (1797 8x8 grey images, 10 classes), which ships
inside the installed package, and the toy tasks draw their data from a fixed seed, so these run
offline with nothing to fetch. The CIFAR, MNIST and character tasks read their data from the data
folder (:func:`data_dir`: :func:`set_data_dir`, else the ``SECONDORDER_DATA`` environment
variable, else ``./data``), lazily, when the task runs; this package never downloads data.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DATA_ENV",
    "DEFAULT_TASK",
    "TASKS",
    "DataNotFoundError",
    "Task",
    "TaskData",
    "accuracy",
    "data_dir",
    "generated_corpus",
    "set_data_dir",
    "toy_teacher",
]

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
        higher_is_better: the metric's direction (False for errors and losses, e.g. an MSE); the
            "best" value of a run is the max when True, the min when False.
        likelihood: the model's predictive distribution, for optimizers that sample from it
            (Monte-Carlo Fisher, see :mod:`secondorder.fisher`): ``"categorical"`` (logits,
            cross-entropy), ``"bernoulli"`` (logits, binary cross-entropy) or ``"gaussian"``
            (means, squared error).
        target: the train loss the bench reports the steps and epochs to reach (``--target``
            overrides it), or None for no target.
        find_data: raises :class:`DataNotFoundError` when the data folder lacks the task's
            files, without reading them (None: the task needs no files); see
            :meth:`check_data`.
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
    higher_is_better: bool = True
    likelihood: str = "categorical"
    target: float | None = None
    find_data: Callable[[], None] | None = None

    def check_data(self) -> None:
        """Raise :class:`DataNotFoundError` (its message names the expected folder layout and
        ``--data``) when the task's files are not in the data folder; cheap, reads nothing.

        The bench calls it before any run starts, so a missing dataset is one line, not a
        traceback from every optimizer's subprocess.
        """
        if self.find_data is not None:
            self.find_data()

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


# --- the data folder ------------------------------------------------------------------------------

DATA_ENV = "SECONDORDER_DATA"
"""Environment variable naming the data folder (inherited by the runner's spawned children)."""

_DEFAULT_DATA_DIR = "data"


class DataNotFoundError(FileNotFoundError):
    """A task's data is not in the data folder; the message names the expected path."""


def set_data_dir(path: str | os.PathLike[str] | None) -> None:
    """Use ``path`` as the data folder of the tasks that read files (None: back to the default).

    Stored in the ``SECONDORDER_DATA`` environment variable, so runs in ``spawn`` subprocesses
    (the runner's isolated runs) see it too.
    """
    if path is None:
        os.environ.pop(DATA_ENV, None)
    else:
        os.environ[DATA_ENV] = str(Path(path).expanduser().resolve())


def data_dir() -> Path:
    """The data folder: ``$SECONDORDER_DATA`` (set by :func:`set_data_dir`), else ``./data``."""
    return Path(os.environ.get(DATA_ENV) or _DEFAULT_DATA_DIR).expanduser().resolve()


def _missing(task: str, what: str, root: Path) -> DataNotFoundError:
    absent = "" if root.is_dir() else f"the data folder {root} does not exist; "
    return DataNotFoundError(
        f"{task} needs {what}; {absent}this package never downloads data "
        f"(set the data folder with --data DIR or ${DATA_ENV})"
    )


# --- losses and metrics ---------------------------------------------------------------------------


def _bce_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of sigmoid outputs (given as logits), mean over every element."""
    return F.binary_cross_entropy_with_logits(logits, targets)


def _sigmoid_mse(logits: Tensor, targets: Tensor) -> float:
    """Mean squared error of the sigmoid outputs, per element (lower is better)."""
    return F.mse_loss(torch.sigmoid(logits), targets).item()


def _mse(outputs: Tensor, targets: Tensor) -> float:
    """Mean squared error, per element (lower is better)."""
    return F.mse_loss(outputs, targets).item()


def _seq_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of ``(n, t, vocab)`` logits against ``(n, t)`` targets, mean per token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _seq_nll(logits: Tensor, targets: Tensor) -> float:
    """Test loss of a character model: nats per character (lower is better)."""
    return _seq_cross_entropy(logits, targets).item()


# --- digits autoencoder ---------------------------------------------------------------------------


def _digits_ae_data() -> TaskData:
    x_tr, _, x_te, _ = _digits_arrays()
    return TaskData(x_tr, x_tr, x_te, x_te)


def _digits_ae() -> nn.Module:
    from .models import autoencoder

    return autoencoder([64, 32, 16, 8, 16, 32, 64], nn.Tanh)


# --- toy tasks with planted targets ---------------------------------------------------------------

_TOY_SEED = 2024
_TOY_DIM = 20
_TOY_TRAIN, _TOY_TEST = 2000, 500
_TOY_CLASSES = 5
_TOY_TEACHER_HIDDEN = 32


@functools.cache
def _toy_inputs() -> Tensor:
    g = torch.Generator().manual_seed(_TOY_SEED)
    return torch.randn(_TOY_TRAIN + _TOY_TEST, _TOY_DIM, generator=g)


def toy_teacher(kind: str) -> nn.Module:
    """The frozen random teacher MLP that defines the targets of ``toy-<kind>``.

    ``20 - 32 (tanh) - out``, weights drawn from a fixed generator (N(0, 4/fan_in) in the first
    layer, N(0, 1/fan_in) in the second), the output layer then shifted (and for regression
    scaled) so that over the toy inputs the outputs have mean 0 (and standard deviation 1):
    regression targets are its output, classification labels the arg-max of its 5 logits.
    """
    if kind not in ("regression", "classification"):
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    out = 1 if kind == "regression" else _TOY_CLASSES
    g = torch.Generator().manual_seed(_TOY_SEED + (1 if kind == "regression" else 2))
    teacher = nn.Sequential(
        nn.Linear(_TOY_DIM, _TOY_TEACHER_HIDDEN), nn.Tanh(), nn.Linear(_TOY_TEACHER_HIDDEN, out)
    )
    with torch.no_grad():
        for lin, gain in ((teacher[0], 2.0), (teacher[2], 1.0)):
            std = gain / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
        y = teacher(_toy_inputs())
        teacher[2].bias.sub_(y.mean(dim=0))
        if kind == "regression":
            scale = 1.0 / y.std()
            teacher[2].weight.mul_(scale)
            teacher[2].bias.mul_(scale)
    return teacher.requires_grad_(False)


@functools.cache
def _toy_data(kind: str) -> TaskData:
    x = _toy_inputs()
    with torch.no_grad():
        y = toy_teacher(kind)(x)
    y = y if kind == "regression" else y.argmax(dim=-1)
    n = _TOY_TRAIN
    return TaskData(x[:n], y[:n], x[n:], y[n:])


def _toy_student(out: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(_TOY_DIM, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out)
    )


# --- CIFAR (torchvision's on-disk layout, read directly) -----------------------------------------

_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_CIFAR = {
    # name: (folder, train files, test files, label key, what)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        "CIFAR-10",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels", "CIFAR-100"),
}


def _read_cifar(files: list[Path], label_key: bytes) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for file in files:
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        ys.append(torch.as_tensor(batch[label_key], dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def _cifar_files(dataset: str, root: Path, task: str) -> list[Path]:
    """The train then test files of ``dataset`` under ``root``; raises if any is missing."""
    folder, train, test, _, what = _CIFAR[dataset]
    base = root / folder
    paths = [base / name for name in (*train, *test)]
    if not all(p.is_file() for p in paths):
        names = ", ".join(train if len(train) < 3 else (train[0], "...", train[-1]))
        layout = f"{base}/{{{names}, {', '.join(test)}}}"
        raise _missing(task, f"{what} as {layout} (torchvision's layout)", root)
    return paths


@functools.cache
def _cifar_cached(dataset: str, root: Path, task: str) -> TaskData:
    _, train, _, key, _ = _CIFAR[dataset]
    paths = _cifar_files(dataset, root, task)
    x_tr, y_tr = _read_cifar(paths[: len(train)], key)
    x_te, y_te = _read_cifar(paths[len(train) :], key)
    return TaskData(x_tr, y_tr, x_te, y_te)


def _cifar_data(dataset: str, task: str) -> Callable[[], TaskData]:
    """Loader of CIFAR-10/100 as ``uint8`` images ``(n, 3, 32, 32)`` and ``long`` labels.

    Reads torchvision's files (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``;
    ``cifar-100-python/train``, ``test``) with :mod:`pickle`, as ``torchvision.datasets.CIFAR10``
    does, but without its MD5 check and its HWC round trip. Scaling, normalisation and the
    training augmentation happen in the model's first module (:class:`~.models.CifarInput`).
    """
    return lambda: _cifar_cached(dataset, data_dir(), task)


def _find_cifar(dataset: str, task: str) -> Callable[[], None]:
    def find() -> None:
        _cifar_files(dataset, data_dir(), task)

    return find


def _cifar_model(depth: int, num_classes: int, stats: tuple) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from .models import cifar_resnet, resnet18_cifar

        if depth == 18:
            return resnet18_cifar(num_classes, stats)
        return cifar_resnet(depth, num_classes, stats)

    return make


# --- MNIST autoencoder ----------------------------------------------------------------------------

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _find_mnist(root: Path | None = None) -> None:
    root = data_dir() if root is None else root
    raw = root / "MNIST" / "raw"
    if not all((raw / name).is_file() for name in _MNIST_FILES):
        layout = f"{raw}/{{{', '.join(_MNIST_FILES)}}}"
        raise _missing("mnist-ae", f"MNIST as {layout} (torchvision's layout, uncompressed)", root)


@functools.cache
def _mnist_cached(root: Path) -> TaskData:
    _find_mnist(root)
    from torchvision.datasets import MNIST

    x_tr = MNIST(str(root), train=True, download=False).data.reshape(-1, 784).float() / 255
    x_te = MNIST(str(root), train=False, download=False).data.reshape(-1, 784).float() / 255
    return TaskData(x_tr, x_tr, x_te, x_te)


def _mnist_ae_data() -> TaskData:
    return _mnist_cached(data_dir())


def _mnist_ae() -> nn.Module:
    from .models import autoencoder

    return autoencoder([784, 1000, 500, 250, 30, 250, 500, 1000, 784], nn.Sigmoid)


# --- character GPT -------------------------------------------------------------------------------

_CHAR_CONTEXT = 64
_CHAR_TEST_FRACTION = 0.1


def _find_char(root: Path | None = None) -> None:
    root = data_dir() if root is None else root
    if not (root / "input.txt").is_file():
        raise _missing("char-gpt", f"a text file {root / 'input.txt'}", root)


@functools.cache
def _char_corpus(root: Path) -> tuple[str, Tensor]:
    _find_char(root)
    path = root / "input.txt"
    text = path.read_text(encoding="utf-8")
    if len(text) < 4 * (_CHAR_CONTEXT + 1):
        raise ValueError(f"char-gpt: {path} is too short ({len(text)} characters)")
    return _encode(text)


def _encode(text: str) -> tuple[str, Tensor]:
    """``(vocabulary, ids)``: the sorted distinct characters and the text as their indices."""
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    return vocab, torch.tensor([index[c] for c in text], dtype=torch.long)


def _windows(ids: Tensor, context: int = _CHAR_CONTEXT) -> tuple[Tensor, Tensor]:
    n = (len(ids) - 1) // context
    x = ids[: n * context].view(n, context)
    y = ids[1 : n * context + 1].view(n, context)
    return x, y


def _split_windows(ids: Tensor, context: int = _CHAR_CONTEXT) -> TaskData:
    split = int(len(ids) * (1 - _CHAR_TEST_FRACTION))
    return TaskData(*_windows(ids[:split], context), *_windows(ids[split:], context))


@functools.cache
def _char_cached(root: Path) -> TaskData:
    _, ids = _char_corpus(root)
    return _split_windows(ids)


def _char_data() -> TaskData:
    return _char_cached(data_dir())


def _char_gpt() -> nn.Module:
    from .models import CharGPT

    vocab, _ = _char_corpus(data_dir())
    return CharGPT(len(vocab), context=_CHAR_CONTEXT)


# --- character GPT on a generated corpus ---------------------------------------------------------

# Sized for CPU sweeps (benchmarks/lr_sensitivity.py trains it 162 times): 16k characters, and a
# GPT a quarter the width and half the context of char-gpt's, about 30 ms a step on one core.
_GENERATED_CHARS = 16_384
_GENERATED_SEED = 0
_GENERATED_CONTEXT = 32
_GENERATED_WIDTH = 64

# A tiny English-like grammar: the model has spelling, word order and agreement-free syntax to
# learn, so the loss falls well below the unigram entropy of the characters.
_DETERMINERS = ("the", "a", "my", "one")
_ADJECTIVES = ("small", "red", "old", "quiet", "happy")
_NOUNS = ("cat", "dog", "bird", "child", "farmer", "river", "house", "tree")
_VERBS = ("sees", "finds", "likes", "follows", "watches")
_INTRANSITIVE = ("sleeps", "runs", "sings", "waits")
_ADVERBS = ("slowly", "today", "again", "at night")


def generated_corpus(chars: int = _GENERATED_CHARS, seed: int = _GENERATED_SEED) -> str:
    """Text of exactly ``chars`` characters drawn from a small probabilistic grammar.

    Sentences are ``noun-phrase verb-phrase.`` (a noun phrase is a determiner, an adjective
    with probability 0.4, and a noun; a verb phrase a transitive verb and a noun phrase, or an
    intransitive verb and an adverb with probability 0.5), two verb phrases joined by "and"
    with probability 0.3, capitalised, separated by spaces, with a newline after a sentence
    with probability 0.25. The same ``(chars, seed)`` gives the same text on every platform
    (:class:`random.Random` with an integer seed).
    """
    if isinstance(chars, bool) or not isinstance(chars, int) or chars < 1:
        raise ValueError(f"chars must be a positive int, got {chars!r}")
    rng = random.Random(seed)

    def noun_phrase() -> str:
        words = [rng.choice(_DETERMINERS)]
        if rng.random() < 0.4:
            words.append(rng.choice(_ADJECTIVES))
        return " ".join([*words, rng.choice(_NOUNS)])

    def verb_phrase() -> str:
        if rng.random() < 0.5:
            return f"{rng.choice(_VERBS)} {noun_phrase()}"
        verb = rng.choice(_INTRANSITIVE)
        return f"{verb} {rng.choice(_ADVERBS)}" if rng.random() < 0.5 else verb

    parts: list[str] = []
    length = 0
    while length < chars:
        predicate = verb_phrase()
        if rng.random() < 0.3:
            predicate += f" and {verb_phrase()}"
        sentence = f"{noun_phrase()} {predicate}."
        sentence = sentence[0].upper() + sentence[1:]
        sentence += "\n" if rng.random() < 0.25 else " "
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)[:chars]


@functools.cache
def _generated_encoded() -> tuple[str, Tensor]:
    return _encode(generated_corpus())


def _char_generated_data() -> TaskData:
    return _split_windows(_generated_encoded()[1], _GENERATED_CONTEXT)


def _char_gpt_generated() -> nn.Module:
    from .models import CharGPT

    vocab, _ = _generated_encoded()
    return CharGPT(len(vocab), context=_GENERATED_CONTEXT, dim=_GENERATED_WIDTH)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="digits-mlp",
            description="scikit-learn digits (1437 train / 360 test), MLP 64-128-64-10 with tanh",
            make_model=_digits_mlp,
            make_data=_digits_flat,
            target=0.1,
        ),
        Task(
            name="digits-cnn",
            description=(
                "scikit-learn digits as 1x8x8 images, CNN conv3x3(16) - conv3x3/2(32) - linear(10)"
            ),
            make_model=_digits_cnn,
            make_data=_digits_images,
            target=0.1,
        ),
        Task(
            name="digits-ae",
            description=(
                "scikit-learn digits autoencoder 64-32-16-8-16-32-64 (tanh, linear code, sigmoid "
                "output), binary cross-entropy; metric: test reconstruction MSE, lower is better"
            ),
            make_model=_digits_ae,
            make_data=_digits_ae_data,
            loss_fn=_bce_logits,
            metric=_sigmoid_mse,
            metric_name="test_mse",
            higher_is_better=False,
            likelihood="bernoulli",
        ),
        Task(
            name="toy-regression",
            description=(
                "Gaussian inputs (d=20, 2000 train / 500 test), targets of a random teacher MLP "
                "20-32-1; student MLP 20-64-64-1 (tanh), MSE; metric: test MSE, lower is better"
            ),
            make_model=functools.partial(_toy_student, 1),
            make_data=functools.partial(_toy_data, "regression"),
            loss_fn=F.mse_loss,
            metric=_mse,
            metric_name="test_mse",
            higher_is_better=False,
            likelihood="gaussian",
        ),
        Task(
            name="toy-classification",
            description=(
                "Gaussian inputs (d=20, 2000 train / 500 test), labels = arg-max of a random "
                "teacher MLP 20-32-5; student MLP 20-64-64-5 (tanh), cross-entropy"
            ),
            make_model=functools.partial(_toy_student, _TOY_CLASSES),
            make_data=functools.partial(_toy_data, "classification"),
        ),
        Task(
            name="cifar10-resnet18",
            description=(
                "CIFAR-10 (data folder), timm ResNet-18 with a 3x3 stem and no max-pool, "
                "random crop + flip"
            ),
            make_model=_cifar_model(18, 10, _CIFAR10_STATS),
            make_data=_cifar_data("cifar10", "cifar10-resnet18"),
            find_data=_find_cifar("cifar10", "cifar10-resnet18"),
            epochs=50,
            batch_size=128,
        ),
        Task(
            name="cifar10-resnet20",
            description="CIFAR-10 (data folder), ResNet-20 of He et al. 2016 (0.27M), crop + flip",
            make_model=_cifar_model(20, 10, _CIFAR10_STATS),
            make_data=_cifar_data("cifar10", "cifar10-resnet20"),
            find_data=_find_cifar("cifar10", "cifar10-resnet20"),
            epochs=50,
            batch_size=128,
        ),
        Task(
            name="cifar10-resnet32",
            description="CIFAR-10 (data folder), ResNet-32 of He et al. 2016 (0.46M), crop + flip",
            make_model=_cifar_model(32, 10, _CIFAR10_STATS),
            make_data=_cifar_data("cifar10", "cifar10-resnet32"),
            find_data=_find_cifar("cifar10", "cifar10-resnet32"),
            epochs=50,
            batch_size=128,
        ),
        Task(
            name="cifar100-resnet18",
            description=(
                "CIFAR-100 (data folder, fine labels), timm ResNet-18 with a 3x3 stem and no "
                "max-pool, random crop + flip"
            ),
            make_model=_cifar_model(18, 100, _CIFAR100_STATS),
            make_data=_cifar_data("cifar100", "cifar100-resnet18"),
            find_data=_find_cifar("cifar100", "cifar100-resnet18"),
            epochs=50,
            batch_size=128,
        ),
        Task(
            name="mnist-ae",
            description=(
                "MNIST (data folder) autoencoder 784-1000-500-250-30-250-500-1000-784 of Hinton & "
                "Salakhutdinov (sigmoid, linear code), binary cross-entropy; metric: test "
                "reconstruction MSE per pixel, lower is better"
            ),
            make_model=_mnist_ae,
            make_data=_mnist_ae_data,
            find_data=_find_mnist,
            loss_fn=_bce_logits,
            metric=_sigmoid_mse,
            metric_name="test_mse",
            epochs=20,
            batch_size=256,
            higher_is_better=False,
            likelihood="bernoulli",
        ),
        Task(
            name="char-gpt",
            description=(
                "character GPT on <data folder>/input.txt (last 10% = test): 2 pre-LN blocks, "
                "width 128, 4 heads, context 64; metric: test loss in nats/char, lower is better"
            ),
            make_model=_char_gpt,
            make_data=_char_data,
            find_data=_find_char,
            loss_fn=_seq_cross_entropy,
            metric=_seq_nll,
            metric_name="test_nll",
            epochs=5,
            batch_size=64,
            higher_is_better=False,
        ),
        Task(
            name="char-gpt-generated",
            description=(
                "character GPT on a 16k-character corpus generated from a fixed-seed grammar "
                "(last 10% = test, no data folder): 2 pre-LN blocks, width 64, 4 heads, "
                "context 32; metric: test loss in nats/char, lower is better"
            ),
            make_model=_char_gpt_generated,
            make_data=_char_generated_data,
            loss_fn=_seq_cross_entropy,
            metric=_seq_nll,
            metric_name="test_nll",
            epochs=5,
            batch_size=32,
            higher_is_better=False,
        ),
    )
}
"""Every benchmark task, by the name ``--task`` accepts."""

DEFAULT_TASK = "digits-mlp"

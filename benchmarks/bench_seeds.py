"""Step time of the seed systems' reference implementations next to ours, in one run.

The reference code is not part of this project: fetch the original repositories yourself
into one folder and give it with ``--seeds DIR``. Expected layout (folder names as the
repositories are called; any commit that keeps these files and classes will do):

    DIR/AdaFisher/optimizers/AdaFisher.py    AdaFisher, AdaFisherW
                                             github.com/AtlasAnalyticsLab/AdaFisher
    DIR/KFAC-Pytorch/optimizers/kfac.py      KFACOptimizer     (imports utils/kfac_utils.py)
    DIR/KFAC-Pytorch/optimizers/ekfac.py     EKFACOptimizer
                                             github.com/alecwangcq/KFAC-Pytorch
    DIR/M-FAC/optim.py                       MFAC              github.com/IST-DASLab/M-FAC

    git clone https://github.com/AtlasAnalyticsLab/AdaFisher DIR/AdaFisher   # and so on
    python benchmarks/bench_seeds.py --seeds DIR --task cnn --steps 100 --csv seeds.csv
    python benchmarks/bench_seeds.py --seeds DIR --task resnet18 --device cuda

A missing folder, file or class skips that method with a message naming what was expected;
the others still run. For every method the same model (one initialisation, deep-copied),
the same batches and the same number of steps are timed with the reference optimizer
("theirs") and with ``secondorder``'s ("ours"), with matching hyperparameters (printed
first): learning rate, momentum, damping, statistics and inverse intervals, EMA decay, KL
clip, M-FAC's window ``m``. ``sgd`` and ``adam`` (``torch.optim``) are timed too, as the
baselines of the issue's targets (K-FAC / M-FAC against SGD, AdaFisher against Adam).
Reported: mean wall time of a whole training iteration (zero_grad, forward, backward,
step; synchronised on CUDA) over the measured steps, ours / theirs, and each over its
baseline. With ``--repeats R`` the pairs run R times, alternating which side goes first,
and the fastest repeat's mean is kept. The window should hold whole periods of the
schedule (``--steps`` a multiple of ``--inverse-every``) so that the mean carries the right
share of statistics and inverse steps; the script warns otherwise.

How each reference is driven, and its quirks:

* KFAC-Pytorch (``KFACOptimizer(model, lr, momentum, stat_decay, damping, kl_clip,
  weight_decay, TCov, TInv)``, ``EKFACOptimizer`` adds ``TScal``): its backward hooks read
  ``optimizer.acc_stats``, which it never initialises, so the loop sets it to True around
  the backward of statistics steps (``steps % TCov == 0``; EKFAC also ``steps % TScal ==
  0``) and False otherwise, as its ``main.py`` does. With ``--fisher mc`` it is driven like
  ``main.py``: at statistics steps a backward of labels sampled from the softmax
  (``acc_stats`` True, graph retained), ``zero_grad()``, then the real backward; ours gets
  ``fisher_type="mc"`` and ``opt.sample_fisher(logits)``. It calls ``torch.symeig``, which
  PyTorch 2 removed: while it runs, ``torch.symeig(A, eigenvectors=True)`` is
  ``torch.linalg.eigh(A, UPLO="U")`` (what the removal message prescribes) and the
  original is put back afterwards. Its constructor prints the model (silenced). It
  preconditions only ``Linear`` and ``Conv2d``; ours is given ``skip_layers`` for the other
  layers (BatchNorm), so that both do the same work. Weight decay defaults to 0: the
  reference adds it only after ``20 * TCov`` steps.
* AdaFisher (``AdaFisher(model, lr, beta, Lambda, gamma, TCov, weight_decay)``): takes the
  model, not its parameters, and registers full backward hooks, which fail on in-place
  operations: the models here use none (``F.relu(out + shortcut)``). ``Lambda`` is our
  ``damping``, ``TCov`` our ``curvature_every``.
* M-FAC (``MFAC(params, lr, momentum, weight_decay, ngrads, damp, moddev, optdev, gpus)``):
  its ``HInvFastUpMulti.setup`` calls ``torch.lu(..., pivot=False)``, which PyTorch
  implements only on CUDA, so on a CPU it fails in the constructor and is skipped with
  that reason. Its optional compiled kernels (``hinv_cuda``, ``python setup_cuda.py
  install``) are used when importable; the note says whether they were. Importing
  ``optim.py`` turns TF32 off globally (``torch.backends.cuda.matmul`` / ``cudnn``): the
  previous values are restored right after the import, so both sides run with the same
  settings. ``damp`` is our ``damping``; its momentum is an EMA of the preconditioned
  gradients, ours heavy-ball momentum on them (same cost).

The seed folders go on ``sys.path`` only while their module is imported, and the modules
they bring (``optimizers``, ``utils``, ...) are removed from ``sys.modules`` afterwards, so
two seeds with the same package names do not collide.

Tasks (inputs 3x32x32, 10 classes): ``cnn`` (three 3x3 conv + BatchNorm + max-pool stages,
32/64/128 channels, and a linear layer), ``resnet18`` (the CIFAR ResNet-18: 3x3 stride-1
stem, no max-pool, BasicBlocks [2, 2, 2, 2], 11.2M parameters, written without in-place
operations), ``mlp`` (inputs 3x8x8, for quick checks).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib
import importlib.util
import io
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("cnn", "resnet18", "mlp")
BASELINES = ("sgd", "adam")
CSV_FIELDS = (
    "task",
    "batch",
    "device",
    "method",
    "reference",
    "commit",
    "steps",
    "theirs_ms",
    "ours_ms",
    "ours_over_theirs",
    "baseline",
    "theirs_over_baseline",
    "ours_over_baseline",
    "status",
)


@dataclass(frozen=True)
class Seed:
    """Where a reference optimizer lives under ``--seeds DIR``."""

    folder: str  # DIR/<folder>
    file: str  # relative to the folder
    cls: str
    repo: str
    module: str | None = None  # import name with the folder on sys.path (else: by file)
    baseline: str = "sgd"

    def describe(self) -> str:
        return f"{self.folder}/{self.file}:{self.cls}"


SEEDS: dict[str, Seed] = {
    "kfac": Seed(
        "KFAC-Pytorch",
        "optimizers/kfac.py",
        "KFACOptimizer",
        "github.com/alecwangcq/KFAC-Pytorch",
        module="optimizers.kfac",
    ),
    "ekfac": Seed(
        "KFAC-Pytorch",
        "optimizers/ekfac.py",
        "EKFACOptimizer",
        "github.com/alecwangcq/KFAC-Pytorch",
        module="optimizers.ekfac",
    ),
    "adafisher": Seed(
        "AdaFisher",
        "optimizers/AdaFisher.py",
        "AdaFisher",
        "github.com/AtlasAnalyticsLab/AdaFisher",
        baseline="adam",
    ),
    "adafisherw": Seed(
        "AdaFisher",
        "optimizers/AdaFisher.py",
        "AdaFisherW",
        "github.com/AtlasAnalyticsLab/AdaFisher",
        baseline="adam",
    ),
    "mfac": Seed("M-FAC", "optim.py", "MFAC", "github.com/IST-DASLab/M-FAC"),
}
METHODS = (*BASELINES, *SEEDS)
_KFAC_PYTORCH = ("kfac", "ekfac")


class SeedUnavailable(Exception):
    """The reference cannot be timed here; the message says why."""


# ---- models ------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # out of place: AdaFisher's full hooks


class ResNet18Cifar(nn.Module):
    """The CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool), without in-place operations."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def make_task(task: str, batch: int, device: str) -> tuple[nn.Module, torch.Tensor]:
    """The model and one batch of inputs (10 classes)."""
    if task == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
        x = torch.randn(batch, 3, 8, 8)
    elif task == "cnn":
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (32, 64, 128):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))
        x = torch.randn(batch, 3, 32, 32)
    elif task == "resnet18":
        model = ResNet18Cifar(10)
        x = torch.randn(batch, 3, 32, 32)
    else:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return model.to(device), x.to(device)


# ---- loading the references ------------------------------------------------------------------
def _top_level_names(root: Path) -> set[str]:
    """Names a folder on sys.path could shadow: its modules and packages."""
    names = set()
    for entry in root.iterdir():
        if entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and entry.name.isidentifier():
            names.add(entry.name)
    return names


@contextlib.contextmanager
def isolated_import(root: Path) -> Iterator[None]:
    """``root`` first on ``sys.path`` for the duration; modules of the same top-level
    names already imported are set aside and put back, the ones imported from ``root``
    are dropped from ``sys.modules`` (the loaded module keeps its own references)."""
    shadowed = _top_level_names(root)

    def ours(name: str) -> bool:
        return name.split(".")[0] in shadowed

    stashed = {name: mod for name, mod in sys.modules.items() if ours(name)}
    for name in stashed:
        del sys.modules[name]
    saved_path = list(sys.path)
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(stashed)


@contextlib.contextmanager
def _tf32_restored() -> Iterator[None]:
    """Put back the TF32 switches that an import flips (M-FAC's optim.py)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def load_seed(seeds_dir: Path, name: str) -> tuple[type, ModuleType]:
    """The reference class of method ``name`` and its module, or SeedUnavailable."""
    seed = SEEDS[name]
    root = seeds_dir / seed.folder
    expected = f"a checkout of {seed.repo} providing {seed.file} (class {seed.cls})"
    if not root.is_dir():
        raise SeedUnavailable(f"{root} not found; expected {expected}")
    path = root / seed.file
    if not path.is_file():
        raise SeedUnavailable(f"{path} not found; expected {expected}")
    try:
        with isolated_import(root), _tf32_restored(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if seed.module is not None:
                module = importlib.import_module(seed.module)
            else:
                spec = importlib.util.spec_from_file_location(
                    f"_seed_{seed.folder.replace('-', '_')}_{path.stem}", path
                )
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
    except Exception as exc:  # the reference's own import failed
        raise SeedUnavailable(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, seed.cls, None)
    if not isinstance(cls, type):
        raise SeedUnavailable(f"{path} has no class {seed.cls}; expected {expected}")
    return cls, module


def seed_commit(seeds_dir: Path, name: str) -> str:
    """The commit a seed folder is checked out at, read from its ``.git`` (no git call);
    empty when it is not a git checkout."""
    git = seeds_dir / SEEDS[name].folder / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return ""


@contextlib.contextmanager
def symeig_shim() -> Iterator[None]:
    """``torch.symeig`` as it was before PyTorch removed it, for the duration."""
    original = getattr(torch, "symeig", None)

    def symeig(a: torch.Tensor, eigenvectors: bool = False, upper: bool = True):
        values, vectors = torch.linalg.eigh(a, UPLO="U" if upper else "L")
        return values, vectors if eigenvectors else vectors.new_empty(0)

    torch.symeig = symeig
    try:
        yield
    finally:
        if original is None:
            del torch.symeig
        else:
            torch.symeig = original


# ---- hyperparameters and builders ----------------------------------------------------------
def hyperparameters(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The shared settings of each method, in our names."""
    ce, ie = args.curvature_every, args.inverse_every
    kfac = {
        "lr": args.lr if args.lr is not None else 0.01,
        "momentum": 0.9,
        "damping": args.damping if args.damping is not None else 1e-3,
        "kl_clip": 1e-2,
        "factor_decay": 0.95,
        "curvature_every": ce,
        "inverse_every": ie,
    }
    adafisher = {
        "lr": args.lr if args.lr is not None else 1e-3,
        "beta": 0.9,
        "damping": args.damping if args.damping is not None else 1e-3,
        "gamma": 0.8,
        "curvature_every": ce,
        "weight_decay": 5e-4,
    }
    return {
        "sgd": {"lr": args.lr if args.lr is not None else 0.05, "momentum": 0.9},
        "adam": {"lr": args.lr if args.lr is not None else 1e-3},
        "kfac": kfac,
        "ekfac": {**kfac, "scale_every": args.scale_every},
        "adafisher": adafisher,
        "adafisherw": adafisher,
        "mfac": {
            "lr": args.lr if args.lr is not None else 1e-3,
            "momentum": 0.9,
            "damping": args.damping if args.damping is not None else 1e-5,
            "ngrads": args.ngrads,
        },
    }


def build_theirs(name: str, cls: type, model: nn.Module, hp: dict[str, Any], device: str):
    """The reference optimizer with ``hp`` (our names) translated to its arguments."""
    if name in _KFAC_PYTORCH:
        kwargs = {
            "lr": hp["lr"],
            "momentum": hp["momentum"],
            "stat_decay": hp["factor_decay"],
            "damping": hp["damping"],
            "kl_clip": hp["kl_clip"],
            "weight_decay": 0,
            "TCov": hp["curvature_every"],
            "TInv": hp["inverse_every"],
        }
        if name == "ekfac":
            kwargs["TScal"] = hp["scale_every"]
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the model
            return cls(model, **kwargs)
    if name in ("adafisher", "adafisherw"):
        return cls(
            model,
            lr=hp["lr"],
            beta=hp["beta"],
            Lambda=hp["damping"],
            gamma=hp["gamma"],
            TCov=hp["curvature_every"],
            weight_decay=hp["weight_decay"],
        )
    if name == "mfac":
        dev = torch.device(device)
        return cls(
            model.parameters(),
            lr=hp["lr"],
            momentum=hp["momentum"],
            weight_decay=0,
            ngrads=hp["ngrads"],
            damp=hp["damping"],
            moddev=dev,
            optdev=dev,
            gpus=[dev],
        )
    raise KeyError(name)


def _non_kfac_layers(model: nn.Module) -> list[str]:
    """Names of the layers with parameters that KFAC-Pytorch leaves alone."""
    return [
        re.escape(name)
        for name, m in model.named_modules()
        if name
        and not isinstance(m, (nn.Linear, nn.Conv2d))
        and any(True for _ in m.parameters(recurse=False))
    ]


def build_ours(name: str, model: nn.Module, hp: dict[str, Any], fisher: str):
    """Our optimizer (or the torch.optim baseline) with ``hp``."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **hp)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), **hp)
    import secondorder

    if name in _KFAC_PYTORCH:
        mc = {"fisher_type": "mc", "likelihood": "categorical"} if fisher == "mc" else {}
        cls = secondorder.KFAC if name == "kfac" else secondorder.EKFAC
        with warnings.catch_warnings():  # the skipped layers get the plain update, as theirs
            warnings.filterwarnings("ignore", message=".*no curvature estimate for")
            # the seeds' update: no graft (the library's default grafts Adam)
            return cls(model, skip_layers=_non_kfac_layers(model) or None, graft=None, **hp, **mc)
    if name in ("adafisher", "adafisherw"):
        cls = secondorder.AdaFisher if name == "adafisher" else secondorder.AdaFisherW
        return cls(model, **hp)
    if name == "mfac":
        # the reference's window, whatever it costs (it has no budget); the reference is
        # SGD-MFAC (the library's default base is adam)
        return secondorder.MFAC(model, base="sgd", window_memory=None, **hp)
    raise KeyError(name)


# ---- the training loop -----------------------------------------------------------------------
def _kfac_pytorch_due(name: str, opt: Any) -> bool:
    """Whether the reference K-FAC's coming step records statistics."""
    k = opt.steps
    due = k % opt.TCov == 0
    if name == "ekfac":
        due = due or (k % opt.TScal == 0 and k > 0)
    return due


def make_driver(name: str, side: str, fisher: str) -> Callable[..., None]:
    """One training iteration of ``name`` on ``side`` ("theirs" / "ours")."""

    def iteration(opt: Any, net: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad()
        logits = net(xb)
        loss = F.cross_entropy(logits, yb)
        if side == "theirs" and name in _KFAC_PYTORCH:
            due = _kfac_pytorch_due(name, opt)
            if fisher == "mc" and due:  # as KFAC-Pytorch's main.py
                opt.acc_stats = True
                with torch.no_grad():
                    sampled = torch.multinomial(F.softmax(logits.detach(), dim=1), 1).squeeze(1)
                F.cross_entropy(logits, sampled).backward(retain_graph=True)
                opt.acc_stats = False
                opt.zero_grad()
            else:
                opt.acc_stats = due
            loss.backward()
            opt.acc_stats = False
        else:
            if side == "ours" and fisher == "mc" and name in _KFAC_PYTORCH:
                opt.sample_fisher(logits)
            loss.backward()
        opt.step()

    return iteration


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(
    build: Callable[[nn.Module], Any],
    drive: Callable[..., None],
    model: nn.Module,
    pool: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    warmup: int,
    device: str,
    seed: int = 0,
) -> list[float]:
    """Seconds of each measured iteration (after ``warmup`` untimed ones) of the optimizer
    ``build(model copy)`` driven by ``drive``."""
    net = copy.deepcopy(model)
    torch.manual_seed(seed)
    opt = build(net)
    times = []
    for i in range(warmup + steps):
        xb, yb = pool[i % len(pool)]
        _sync(device)
        t0 = time.perf_counter()
        drive(opt, net, xb, yb)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _loadavg() -> str:
    """The 1-minute load average (other processes on the machine skew the timings)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _mean_ms(times: list[float]) -> float:
    return sum(times) / len(times) * 1e3


def _needs_cuda(exc: Exception) -> bool:
    text = str(exc)
    return "not implemented on the CPU" in text or "CUDA" in text or "cuda" in text


def run_method(
    name: str,
    args: argparse.Namespace,
    model: nn.Module,
    pool: list[tuple[torch.Tensor, torch.Tensor]],
    hp: dict[str, Any],
) -> dict[str, Any]:
    """Time ``name`` (ours, and theirs when it can run); a result row without ratios."""
    row: dict[str, Any] = {"method": name, "theirs_ms": None, "ours_ms": None}
    run = dict(steps=args.steps, warmup=args.warmup, device=args.device, seed=args.seed)
    ours_build = lambda net: build_ours(name, net, hp, args.fisher)  # noqa: E731
    ours_drive = make_driver(name, "ours", args.fisher)
    if name in BASELINES:
        row["reference"] = f"torch.optim.{'SGD' if name == 'sgd' else 'Adam'}"
        row["status"] = "baseline"
        row["ours_ms"] = min(
            _mean_ms(time_steps(ours_build, ours_drive, model, pool, **run))
            for _ in range(args.repeats)
        )
        return row

    seed = SEEDS[name]
    row["reference"] = seed.describe()
    row["commit"] = seed_commit(args.seeds, name)
    theirs: Callable[[nn.Module], Any] | None = None
    status = "ok"
    try:
        cls, module = load_seed(args.seeds, name)
        if name == "mfac":
            cuda_kernels = bool(getattr(module, "USE_CUDA", False))
            if args.device == "cpu" and cuda_kernels:
                module.USE_CUDA = False  # its compiled kernels take CUDA tensors only
                cuda_kernels = False
            status = "ok (hinv_cuda kernels)" if cuda_kernels else "ok (no hinv_cuda: Python loops)"
        theirs = lambda net: build_theirs(name, cls, net, hp, args.device)  # noqa: E731
        with warnings.catch_warnings(), _quirks(name):
            warnings.simplefilter("ignore")
            theirs(copy.deepcopy(model))  # fails early (e.g. CUDA-only code on a CPU)
    except SeedUnavailable as exc:
        status = f"skipped: {exc}"
        theirs = None
    except Exception as exc:
        if _needs_cuda(exc) and args.device == "cpu":
            why = f"{type(exc).__name__}: {exc}"
            if name == "mfac" and "pivot" in str(exc):
                why = (
                    "HInvFastUpMulti.setup calls torch.lu(..., pivot=False), which PyTorch "
                    f"implements only on CUDA; {why}"
                )
            status = f"skipped: the reference needs CUDA ({why}); run with --device cuda"
        else:
            status = f"failed to build: {type(exc).__name__}: {exc}"
        theirs = None
    theirs_drive = make_driver(name, "theirs", args.fisher)
    theirs_runs, ours_runs = [], []
    for r in range(args.repeats):
        order = ("theirs", "ours") if r % 2 == 0 else ("ours", "theirs")
        for side in order:
            if side == "ours":
                ours_runs.append(_mean_ms(time_steps(ours_build, ours_drive, model, pool, **run)))
            elif theirs is not None:
                try:
                    with warnings.catch_warnings(), _quirks(name):
                        warnings.simplefilter("ignore")
                        times = time_steps(theirs, theirs_drive, model, pool, **run)
                    theirs_runs.append(_mean_ms(times))
                except Exception as exc:
                    status = f"failed while training: {type(exc).__name__}: {exc}"
                    theirs = None
    row["ours_ms"] = min(ours_runs)
    row["theirs_ms"] = min(theirs_runs) if theirs_runs and theirs is not None else None
    row["status"] = status
    return row


@contextlib.contextmanager
def _quirks(name: str) -> Iterator[None]:
    """What a reference needs around its construction and steps."""
    if name in _KFAC_PYTORCH:
        with symeig_shim():
            yield
    else:
        yield


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ours / theirs and each side over its baseline (when that baseline ran)."""
    base = {r["method"]: r["ours_ms"] for r in rows if r["method"] in BASELINES}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    for r in rows:
        name = r["method"]
        r["ours_over_theirs"] = ratio(r["ours_ms"], r["theirs_ms"])
        b = SEEDS[name].baseline if name in SEEDS else None
        r["baseline"] = b if b in base else ""
        r["theirs_over_baseline"] = ratio(r["theirs_ms"], base.get(b)) if b else None
        r["ours_over_baseline"] = ratio(r["ours_ms"], base.get(b)) if b else None
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per method: ms per step, ours / theirs, each over its baseline, status."""
    width = max(len("reference"), *(len(r["reference"]) for r in rows)) + 2
    header = (
        f"{'method':<11}{'reference':<{width}}{'theirs ms':>11}{'ours ms':>11}"
        f"{'ours/theirs':>13}{'baseline':>10}{'theirs/base':>13}{'ours/base':>11}  status"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['method']:<11}{r['reference']:<{width}}"
            f"{_fmt(r['theirs_ms'], '.2f'):>11}{_fmt(r['ours_ms'], '.2f'):>11}"
            f"{_fmt(r['ours_over_theirs'], '.2f', 'x'):>13}{r['baseline'] or '-':>10}"
            f"{_fmt(r['theirs_over_baseline'], '.2f', 'x'):>13}"
            f"{_fmt(r['ours_over_baseline'], '.2f', 'x'):>11}  {r['status']}"
        )
    return "\n".join(lines)


def _csv_num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def csv_rows(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, str]]:
    """The CSV rows: ms and ratios with 4 decimals, blank where absent."""
    out = []
    for r in rows:
        out.append(
            {
                "task": args.task,
                "batch": str(args.batch),
                "device": args.device,
                "method": r["method"],
                "reference": r["reference"],
                "commit": r.get("commit", ""),
                "steps": str(args.steps),
                "theirs_ms": _csv_num(r["theirs_ms"]),
                "ours_ms": _csv_num(r["ours_ms"]),
                "ours_over_theirs": _csv_num(r["ours_over_theirs"]),
                "baseline": r["baseline"],
                "theirs_over_baseline": _csv_num(r["theirs_over_baseline"]),
                "ours_over_baseline": _csv_num(r["ours_over_baseline"]),
                "status": r["status"],
            }
        )
    return out


def describe_hparams(methods: list[str], hps: dict[str, dict[str, Any]], fisher: str) -> str:
    lines = []
    for name in methods:
        hp = ", ".join(f"{k}={v}" for k, v in hps[name].items())
        extra = ""
        if name in _KFAC_PYTORCH:
            extra = f"; fisher {fisher}; Linear and Conv2d layers only (ours skips the others)"
        lines.append(f"  {name}: {hp}{extra}")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------
def parse_methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seeds",
        type=Path,
        required=True,
        help="folder holding AdaFisher/, KFAC-Pytorch/, M-FAC/ (see below)",
    )
    parser.add_argument(
        "--opt", type=parse_methods, default=list(METHODS), help=f"({','.join(METHODS)})"
    )
    parser.add_argument("--task", default="cnn", choices=TASKS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side; fastest kept")
    parser.add_argument(
        "--curvature-every",
        type=int,
        default=10,
        help="statistics interval: K-FAC's TCov, AdaFisher's TCov (default 10)",
    )
    parser.add_argument("--inverse-every", type=int, default=100, help="K-FAC's TInv (default 100)")
    parser.add_argument("--scale-every", type=int, default=10, help="E-KFAC's TScal")
    parser.add_argument("--ngrads", type=int, default=32, help="M-FAC window m (default 32)")
    parser.add_argument("--lr", type=float, default=None, help="one lr for all methods")
    parser.add_argument(
        "--damping",
        type=float,
        default=None,
        help="one damping for all (default K-FAC 1e-3, AdaFisher 1e-3, M-FAC 1e-5)",
    )
    parser.add_argument(
        "--fisher",
        default="empirical",
        choices=["empirical", "mc"],
        help="K-FAC statistics: the loss's own gradients, or a sampled-label backward",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="write one row per method here")
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the comparison; returns one row per method (ms and ratios; None where absent)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("steps", "batch", "repeats", "curvature_every", "inverse_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.ngrads < 1 or args.scale_every < 1:
        parser.error("--warmup must be >= 0, --ngrads and --scale-every >= 1")
    if not args.seeds.is_dir():
        parser.error(
            f"--seeds {args.seeds}: no such folder (expected one holding AdaFisher/, "
            "KFAC-Pytorch/ and M-FAC/)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model, x = make_task(args.task, args.batch, args.device)
    pool = [
        (x[torch.randperm(len(x))], torch.randint(0, 10, (args.batch,), device=args.device))
        for _ in range(8)
    ]
    hps = hyperparameters(args)
    period = math.lcm(args.curvature_every, args.inverse_every)
    print(
        f"{args.task}, batch {args.batch}, {args.steps} steps (+{args.warmup} warm-up) x "
        f"{args.repeats}, {args.device}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; load average {_loadavg()}; seeds from {args.seeds}; "
        "hyperparameters (ours / theirs):"
    )
    print(describe_hparams(args.opt, hps, args.fisher))
    if args.steps % period and any(m in SEEDS for m in args.opt):
        print(
            f"warning: --steps {args.steps} is not a multiple of the schedule's period "
            f"({period}): the means carry the statistics / inverse steps of this window, "
            "not their steady-state share"
        )
    # one-off costs of the process's first training steps (oneDNN primitives, allocator
    # growth) are paid here, not by whichever method runs first
    time_steps(
        lambda net: torch.optim.SGD(net.parameters(), lr=1e-3),
        make_driver("sgd", "ours", "empirical"),
        model,
        pool,
        steps=1,
        warmup=max(1, args.warmup),
        device=args.device,
    )
    rows = []
    for name in args.opt:
        row = run_method(name, args, model, pool, hps[name])
        rows.append(row)
        print(f"  {name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    with_ratios(rows)
    print(format_table(rows))
    print(f"wall time {time.perf_counter() - start:.1f} s; load average {_loadavg()}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(csv_rows(rows, args))
    return rows


if __name__ == "__main__":
    main()

"""benchmarks/bench_seeds.py against a fake seed folder written to tmp_path.

The fakes mimic the layout, module and class names and the quirks of the real reference
repositories (KFAC-Pytorch's unset ``acc_stats`` read by its backward hooks, its
``torch.symeig`` call and its ``optimizers`` / ``utils`` packages; M-FAC's CUDA-only LU on
a CPU and its global TF32 switch), so no network and no reference code are needed. They
log what they were given to ``calls.jsonl`` in their folder.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from .helpers import assert_close

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_seeds.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_seeds():
    return _load()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


_LOG = """\
import json
from pathlib import Path

LOG = Path(__file__).resolve().parents[{up}] / "calls.jsonl"


def log(**record):
    with LOG.open("a") as fh:
        fh.write(json.dumps(record) + "\\n")
"""

_ADAFISHER = """\
import torch

{log}

class _Base(torch.optim.Optimizer):
    def __init__(self, model, lr=1e-3, beta=0.9, Lambda=1e-3, gamma=0.8, TCov=100,
                 weight_decay=0, dist=False):
        assert isinstance(model, torch.nn.Module), "AdaFisher takes the model"
        log(event="init", cls=type(self).__name__, lr=lr, beta=beta, Lambda=Lambda,
            gamma=gamma, TCov=TCov, weight_decay=weight_decay)
        super().__init__(model.parameters(), dict(lr=lr))
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        self.steps += 1


class AdaFisher(_Base):
    pass
{extra}
"""

_KFAC = """\
import torch
from utils.kfac_utils import stat_decay_default  # the real one imports utils.kfac_utils

{log}

class {cls}(torch.optim.Optimizer):
    def __init__(self, model, lr=0.001, momentum=0.9, stat_decay=stat_decay_default,
                 damping=0.001, kl_clip=0.001, weight_decay=0, TCov=10, {tscal}TInv=100,
                 batch_averaged=True):
        print(model)  # as the reference does
        super().__init__(model.parameters(), dict(lr=lr))
        self.TCov, self.TInv, self.steps = TCov, TInv, 0
        {tscal_attr}
        self._stats = 0
        self._hooks = 0
        for m in model.modules():
            if m.__class__.__name__ in ("Linear", "Conv2d"):
                m.register_full_backward_hook(self._save_grad_output)
        log(event="init", cls="{cls}", lr=lr, momentum=momentum, stat_decay=stat_decay,
            damping=damping, kl_clip=kl_clip, weight_decay=weight_decay, TCov=TCov,
            TInv=TInv{tscal_log})

    def _save_grad_output(self, module, grad_input, grad_output):
        self._hooks += 1
        if self.acc_stats:  # never initialised by the reference: the loop must set it
            self._stats += 1

    @torch.no_grad()
    def step(self, closure=None):
        if self.steps % self.TInv == 0:
            d, q = torch.symeig(torch.eye(3) * 2, eigenvectors=True)  # removed in torch 2
            assert q.shape == (3, 3) and torch.allclose(d, torch.full((3,), 2.0))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        log(event="step", cls="{cls}", step=self.steps, stats=self._stats, hooks=self._hooks)
        self._stats = self._hooks = 0
        self.steps += 1
"""

_MFAC = """\
import torch

# as the reference: a global switch flipped at import
torch.backends.cudnn.allow_tf32 = not torch.backends.cudnn.allow_tf32
USE_CUDA = False


class MFAC(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, momentum=0, weight_decay=0, ngrads=1024, damp=1e-5,
                 moddev=None, optdev=None, gpus=[], sparse=False):
        if torch.device(optdev).type == "cpu":
            raise RuntimeError(
                "linalg.lu_factor: LU without pivoting is not implemented on the CPU"
            )
        super().__init__(params, dict(lr=lr))
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def make_seeds(root: Path, *, adafisherw: bool = True, mfac: bool = True) -> Path:
    """A fake ``--seeds`` folder: AdaFisher/, KFAC-Pytorch/ and (optionally) M-FAC/."""
    extra = "\n\nclass AdaFisherW(_Base):\n    pass\n" if adafisherw else ""
    _write(
        root / "AdaFisher/optimizers/AdaFisher.py",
        _ADAFISHER.format(log=_LOG.format(up=1), extra=extra),
    )
    # the real package __init__ pulls in more modules: it must not be imported
    _write(
        root / "AdaFisher/optimizers/__init__.py",
        "raise ImportError('bench_seeds must load AdaFisher.py by its path')\n",
    )
    kfac_dir = root / "KFAC-Pytorch"
    _write(kfac_dir / "utils/kfac_utils.py", "stat_decay_default = 0.95\n")
    _write(
        kfac_dir / "optimizers/__init__.py",
        "from .kfac import KFACOptimizer\nfrom .ekfac import EKFACOptimizer\n",
    )
    for name, cls, tscal in (("kfac", "KFACOptimizer", False), ("ekfac", "EKFACOptimizer", True)):
        _write(
            kfac_dir / f"optimizers/{name}.py",
            _KFAC.format(
                log=_LOG.format(up=1),
                cls=cls,
                tscal="TScal=10, " if tscal else "",
                tscal_attr="self.TScal = TScal" if tscal else "",
                tscal_log=", TScal=TScal" if tscal else "",
            ),
        )
    if mfac:
        _write(root / "M-FAC/optim.py", _MFAC)
    return root


def _calls(folder: Path) -> list[dict]:
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


BASE_ARGS = ["--task", "mlp", "--batch", "8", "--threads", "1"]


def test_csv_ratios_hyperparameters_and_quirks(
    bench_seeds, one_thread, tmp_path: Path, capsys
) -> None:
    seeds = make_seeds(tmp_path / "seeds")
    out = tmp_path / "seeds.csv"
    tf32 = torch.backends.cudnn.allow_tf32
    symeig = getattr(torch, "symeig", None)
    path_before = list(sys.path)
    methods = ["sgd", "adam", "kfac", "ekfac", "adafisher", "adafisherw", "mfac"]
    # --steps 4 --warmup 2: steps 0..5, measured 2..5; statistics every 2, inverses every 4
    rows = bench_seeds.main(
        [
            *BASE_ARGS,
            "--seeds",
            str(seeds),
            "--opt",
            ",".join(methods),
            "--steps",
            "4",
            "--warmup",
            "2",
            "--curvature-every",
            "2",
            "--inverse-every",
            "4",
            "--scale-every",
            "3",
            "--lr",
            "0.02",
            "--damping",
            "0.05",
            "--ngrads",
            "8",
            "--csv",
            str(out),
        ]
    )
    printed = capsys.readouterr().out

    # the CSV: the documented columns, one row per method in order, ratios from the ms
    table = _read_csv(out)
    assert list(table[0]) == list(bench_seeds.CSV_FIELDS)
    assert [r["method"] for r in table] == methods
    by = {r["method"]: r for r in table}
    for r in table:
        assert r["task"] == "mlp" and r["batch"] == "8" and r["device"] == "cpu"
        assert r["steps"] == "4"
        assert float(r["ours_ms"]) > 0, r
    for name in ("kfac", "ekfac", "adafisher", "adafisherw"):
        r = by[name]
        assert r["status"] == "ok", r
        theirs, ours = float(r["theirs_ms"]), float(r["ours_ms"])
        assert theirs > 0
        assert float(r["ours_over_theirs"]) == pytest.approx(ours / theirs, rel=1e-3)
        base = "adam" if name.startswith("adafisher") else "sgd"
        assert r["baseline"] == base
        base_ms = float(by[base]["ours_ms"])
        assert float(r["ours_over_baseline"]) == pytest.approx(ours / base_ms, rel=1e-3)
        assert float(r["theirs_over_baseline"]) == pytest.approx(theirs / base_ms, rel=1e-3)
    assert by["kfac"]["reference"] == "KFAC-Pytorch/optimizers/kfac.py:KFACOptimizer"
    assert by["adafisherw"]["reference"] == "AdaFisher/optimizers/AdaFisher.py:AdaFisherW"
    for name in ("sgd", "adam"):
        assert by[name]["status"] == "baseline"
        assert by[name]["theirs_ms"] == by[name]["ours_over_theirs"] == ""
        assert by[name]["reference"] == f"torch.optim.{'SGD' if name == 'sgd' else 'Adam'}"

    # M-FAC's reference needs CUDA: skipped with the reason, ours still timed
    mfac = by["mfac"]
    assert mfac["status"].startswith("skipped: the reference needs CUDA"), mfac
    assert "torch.lu(..., pivot=False)" in mfac["status"]
    assert "--device cuda" in mfac["status"]
    assert mfac["theirs_ms"] == mfac["ours_over_theirs"] == ""
    assert float(mfac["ours_over_baseline"]) == pytest.approx(
        float(mfac["ours_ms"]) / float(by["sgd"]["ours_ms"]), rel=1e-3
    )
    # the returned rows carry the same figures
    assert [r["method"] for r in rows] == methods
    assert rows[2]["ours_ms"] == pytest.approx(float(by["kfac"]["ours_ms"]), rel=1e-3)
    assert "skipped: the reference needs CUDA" in printed

    # the hyperparameters reached the references under their own names
    calls = _calls(seeds / "KFAC-Pytorch")
    inits = {c["cls"]: c for c in calls if c["event"] == "init"}
    assert inits["KFACOptimizer"] == {
        "event": "init",
        "cls": "KFACOptimizer",
        "lr": 0.02,
        "momentum": 0.9,
        "stat_decay": 0.95,
        "damping": 0.05,
        "kl_clip": 1e-2,
        "weight_decay": 0,
        "TCov": 2,
        "TInv": 4,
    }
    assert inits["EKFACOptimizer"]["TScal"] == 3
    ada = [c for c in _calls(seeds / "AdaFisher") if c["event"] == "init"]
    assert {c["cls"] for c in ada} == {"AdaFisher", "AdaFisherW"}
    assert all(c["Lambda"] == 0.05 and c["TCov"] == 2 and c["lr"] == 0.02 for c in ada)

    # acc_stats was set exactly around the backward of statistics steps (the fake's
    # hooks would raise AttributeError if it were never set)
    for cls, due in (
        ("KFACOptimizer", lambda k: k % 2 == 0),
        ("EKFACOptimizer", lambda k: k % 2 == 0 or (k % 3 == 0 and k > 0)),
    ):
        steps = [c for c in calls if c["event"] == "step" and c["cls"] == cls]
        # one early build (no steps), then warmup + steps = 6 steps
        assert [c["step"] for c in steps] == list(range(6)), cls
        for c in steps:
            assert c["hooks"] == 2, c  # two Linear layers, one backward
            assert c["stats"] == (2 if due(c["step"]) else 0), (cls, c)

    # the quirks were undone: TF32 switch, torch.symeig, sys.path, sys.modules
    assert torch.backends.cudnn.allow_tf32 == tf32
    assert getattr(torch, "symeig", None) is symeig
    assert sys.path == path_before
    assert not any(n == "optimizers" or n.startswith("optimizers.") for n in sys.modules)
    assert "utils.kfac_utils" not in sys.modules


def test_mc_fisher_drives_the_reference_like_its_main(
    bench_seeds, one_thread, tmp_path: Path
) -> None:
    """--fisher mc: a sampled-label backward (statistics on) before the real one (off)."""
    seeds = make_seeds(tmp_path / "seeds")
    rows = bench_seeds.main(
        [
            *BASE_ARGS,
            "--seeds",
            str(seeds),
            "--opt",
            "kfac",
            "--steps",
            "4",
            "--warmup",
            "0",
            "--curvature-every",
            "2",
            "--inverse-every",
            "2",
            "--fisher",
            "mc",
        ]
    )
    assert rows[0]["status"] == "ok" and rows[0]["theirs_ms"] > 0 and rows[0]["ours_ms"] > 0
    steps = [c for c in _calls(seeds / "KFAC-Pytorch") if c["event"] == "step"]
    assert [c["step"] for c in steps] == [0, 1, 2, 3]
    for c in steps:
        due = c["step"] % 2 == 0
        assert c["hooks"] == (4 if due else 2), c  # two backward passes at statistics steps
        assert c["stats"] == (2 if due else 0), c


def test_missing_folders_files_and_classes_are_skipped_by_name(
    bench_seeds, one_thread, tmp_path: Path, capsys
) -> None:
    seeds = make_seeds(tmp_path / "seeds", adafisherw=False, mfac=False)
    (seeds / "KFAC-Pytorch/optimizers/ekfac.py").unlink()
    out = tmp_path / "out.csv"
    rows = bench_seeds.main(
        [
            *BASE_ARGS,
            "--seeds",
            str(seeds),
            "--opt",
            "adafisher,adafisherw,ekfac,mfac",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--csv",
            str(out),
        ]
    )
    by = {r["method"]: r for r in rows}
    assert by["adafisher"]["status"] == "ok"
    assert by["adafisher"]["theirs_ms"] > 0
    assert by["adafisher"]["baseline"] == ""  # adam was not run
    assert by["adafisher"]["ours_over_baseline"] is None

    w = by["adafisherw"]["status"]
    assert w.startswith("skipped:") and "has no class AdaFisherW" in w, w
    e = by["ekfac"]["status"]
    assert e.startswith("skipped:") and str(seeds / "KFAC-Pytorch/optimizers/ekfac.py") in e
    assert "github.com/alecwangcq/KFAC-Pytorch" in e and "EKFACOptimizer" in e
    m = by["mfac"]["status"]
    assert m.startswith("skipped:") and f"{seeds / 'M-FAC'} not found" in m, m
    assert "github.com/IST-DASLab/M-FAC" in m and "optim.py" in m and "MFAC" in m
    for name in ("adafisherw", "ekfac", "mfac"):
        assert by[name]["theirs_ms"] is None and by[name]["ours_over_theirs"] is None
        assert by[name]["ours_ms"] > 0  # ours is timed all the same
    printed = capsys.readouterr().out
    assert "M-FAC not found" in printed
    table = {r["method"]: r for r in _read_csv(out)}
    assert table["mfac"]["theirs_ms"] == "" and table["mfac"]["status"] == m


def test_import_failure_of_a_reference_is_reported(bench_seeds, tmp_path: Path) -> None:
    seeds = make_seeds(tmp_path / "seeds")
    (seeds / "KFAC-Pytorch/utils/kfac_utils.py").unlink()
    with pytest.raises(bench_seeds.SeedUnavailable, match=r"importing .*kfac\.py failed"):
        bench_seeds.load_seed(seeds, "kfac")
    assert "optimizers" not in sys.modules


def test_isolated_import_keeps_modules_of_the_same_name(bench_seeds, tmp_path: Path) -> None:
    """A seed's ``utils`` package must neither replace nor outlive the caller's ``utils``."""
    seeds = make_seeds(tmp_path / "seeds")
    mine = type(sys)("utils")
    sys.modules["utils"] = mine
    try:
        cls, module = bench_seeds.load_seed(seeds, "kfac")
        assert cls.__name__ == "KFACOptimizer"
        assert module.stat_decay_default == 0.95  # it saw its own utils.kfac_utils
        assert sys.modules["utils"] is mine
        assert "utils.kfac_utils" not in sys.modules
    finally:
        del sys.modules["utils"]


def test_argument_errors(bench_seeds, tmp_path: Path, capsys) -> None:
    seeds = make_seeds(tmp_path / "seeds")
    cases = [
        (["--opt", "sgd"], "--seeds"),  # required
        (["--seeds", str(tmp_path / "nowhere")], "no such folder"),
        (["--seeds", str(seeds), "--opt", "sgd,lbfgs"], "unknown method"),
        (["--seeds", str(seeds), "--steps", "0"], "--steps must be >= 1"),
        (["--seeds", str(seeds), "--inverse-every", "0"], "--inverse-every must be >= 1"),
        (["--seeds", str(seeds), "--task", "vgg"], "invalid choice"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            bench_seeds.main(argv)
        assert exc.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_time_steps_times_only_the_measured_steps(bench_seeds) -> None:
    model = nn.Linear(4, 3)
    weight = model.weight.detach().clone()
    pool = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    seen: list[int] = []

    class Counting(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(len(seen))
            return super().step(closure)

    def drive(opt, net, xb, yb):
        assert net is not model  # a copy is trained
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()

    times = bench_seeds.time_steps(
        lambda net: Counting(net.parameters(), lr=0.1),
        drive,
        model,
        pool,
        steps=4,
        warmup=3,
        device="cpu",
    )
    assert len(times) == 4 and all(t > 0 for t in times)
    assert seen == list(range(7))
    assert torch.equal(model.weight, weight)


def test_ours_skips_the_layers_kfac_pytorch_leaves_alone(bench_seeds) -> None:
    model, _ = bench_seeds.make_task("cnn", 2, "cpu")
    skipped = bench_seeds._non_kfac_layers(model)
    assert skipped == ["1", "5", "9"]  # the BatchNorm2d layers
    hp = {
        "lr": 0.01,
        "momentum": 0.9,
        "damping": 1e-3,
        "kl_clip": 1e-2,
        "factor_decay": 0.95,
        "curvature_every": 10,
        "inverse_every": 100,
    }
    opt = bench_seeds.build_ours("kfac", model, hp, "empirical")
    kinds = {type(model.get_submodule(layer.name)).__name__ for layer in opt.estimator.layers}
    assert kinds == {"Conv2d", "Linear"}
    resnet, _ = bench_seeds.make_task("resnet18", 2, "cpu")
    assert sum(p.numel() for p in resnet.parameters()) == 11_173_962
    assert not any(getattr(m, "inplace", False) for m in resnet.modules())


def test_symeig_shim_is_eigh_and_is_undone(bench_seeds) -> None:
    original = getattr(torch, "symeig", None)
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    with bench_seeds.symeig_shim():
        d, q = torch.symeig(a, eigenvectors=True)
        # float32 2 x 2: the reconstruction's 2-term sums and the eigensolver's backward
        # error, relative to ‖a‖; eigh and eigvalsh are two LAPACK calls
        norm = float(torch.linalg.matrix_norm(a, ord=2))
        assert_close(q @ torch.diag(d) @ q.T, a, dtype=torch.float32, n=4, scale=norm)
        assert_close(d, torch.linalg.eigvalsh(a), dtype=torch.float32, n=2, scale=norm)
    assert getattr(torch, "symeig", None) is original

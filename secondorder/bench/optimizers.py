"""Benchmark optimizers: how to build each one, and its default hyperparameters.

An optimizer is registered once in :data:`OPTIMIZERS` under the name ``--opt`` accepts. Its
factory takes the model (not its parameters: the second-order methods attach hooks to the
model's layers) and keyword hyperparameters, and returns a ``torch.optim.Optimizer`` that the
runner drives with the usual ``zero_grad()`` / ``loss.backward()`` / ``step()`` loop.

Hyperparameters given on the command line as ``--set name.key=value`` are merged over the
spec's defaults; a key the spec does not know is passed through unchanged, so the optimizer's
own constructor reports it.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "parse_override",
    "parse_overrides",
    "parse_value",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """How the bench builds one optimizer.

    Args:
        name: the registry key and the ``--opt`` value.
        description: one line shown by ``--help``.
        factory: ``(model, **hparams) -> torch.optim.Optimizer``.
        defaults: hyperparameters used unless overridden (tuned for the digits tasks).
        create_graph: call ``loss.backward(create_graph=True)`` (Hessian-vector methods).
    """

    name: str
    description: str
    factory: Callable[..., torch.optim.Optimizer]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    create_graph: bool = False

    def __post_init__(self) -> None:
        # Freeze the defaults so that one run's overrides can never leak into the next.
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def hparams(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults with ``overrides`` merged over them (a new dict)."""
        return {**self.defaults, **(overrides or {})}

    def build(self, model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
        """Build the optimizer for ``model`` from exactly ``hparams`` (see :meth:`hparams`)."""
        return self.factory(model, **hparams)

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        """The class the factory builds."""
        name = getattr(self.factory, "optimizer_class_name", None)
        if name is None:
            return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[
                self.name
            ]
        import secondorder

        return getattr(secondorder, name)

    @property
    def config_class(self) -> type | None:
        """The config dataclass of a ``secondorder`` optimizer (its hyperparameters:
        :func:`secondorder.config.config_fields`), None for a ``torch.optim`` one."""
        return getattr(self.optimizer_class, "config_class", None)

    def hyperparameter_names(self) -> list[str]:
        """The keywords the optimizer takes besides the model: its config's fields, or
        the ``torch.optim`` constructor's parameters."""
        config = self.config_class
        if config is not None:
            from secondorder.config import config_fields

            return [f.name for f in config_fields(config)]
        import inspect

        params = inspect.signature(self.optimizer_class).parameters
        return [p for p in params if p != "params"]


def _sgd(model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), **hparams)


def _adam(model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), **hparams)


def _adamw(model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), **hparams)


def _secondorder(class_name: str) -> Callable[..., torch.optim.Optimizer]:
    """The factory of ``secondorder.<class_name>``, imported when first built (so that the
    first-order baselines run even where the library cannot be imported)."""

    def build(model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
        import secondorder

        return getattr(secondorder, class_name)(model, **hparams)

    build.__qualname__ = build.__name__ = f"build_{class_name}"
    build.optimizer_class_name = class_name  # type: ignore[attr-defined]
    return build


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec(
            name="sgd",
            description="torch.optim.SGD with heavy-ball momentum",
            factory=_sgd,
            defaults={"lr": 0.05, "momentum": 0.9},
        ),
        OptimizerSpec(
            name="adam",
            description="torch.optim.Adam",
            factory=_adam,
            defaults={"lr": 1e-3},
        ),
        OptimizerSpec(
            name="adamw",
            description="torch.optim.AdamW (decoupled weight decay)",
            factory=_adamw,
            defaults={"lr": 1e-3, "weight_decay": 1e-2},
        ),
        OptimizerSpec(
            name="kfac",
            description="secondorder.KFAC (K-FAC preconditioning over SGD momentum)",
            factory=_secondorder("KFAC"),
            # Tuned on digits-mlp (20 epochs, seed 0) over lr {0.02, 0.05} x damping
            # {1e-3, 1e-2, 1e-1} x kl_clip {1e-3, 1e-2}: damping 0.1 was the only
            # setting without loss spikes late in training.
            defaults={
                "lr": 0.02,
                "momentum": 0.9,
                "damping": 0.1,
                "curvature_every": 1,
                "inverse_every": 10,
                "kl_clip": 1e-2,
                "graft": None,  # tuned without a graft (the library default grafts Adam)
            },
        ),
        # Swept on digits-mlp (20 epochs, seed 0) over lr {0.02, 0.05} x damping {0.01, 0.03,
        # 0.1, 0.3} x kl_clip {1e-3, 1e-2}, inverse_every {10, 20}, scale_every {1, 2}: damping
        # 0.1 was best at every lr (0.01 had loss spikes); the rest barely mattered, so these
        # match kfac's for a like-for-like comparison.
        OptimizerSpec(
            name="ekfac",
            description="secondorder.EKFAC (eigenvalue-corrected K-FAC over SGD momentum)",
            factory=_secondorder("EKFAC"),
            defaults={
                "lr": 0.02,
                "momentum": 0.9,
                "damping": 0.1,
                "curvature_every": 1,
                "inverse_every": 10,
                "scale_every": 1,
                "kl_clip": 1e-2,
                "graft": None,  # tuned without a graft (the library default grafts Adam)
            },
        ),
        # Tuned on digits-mlp and digits-cnn (20 epochs, seed 0) over lr {0.02, 0.05} x damping
        # {1e-2, 0.1} x w2 {0.25, 0.5, 1} x coarse_damping {damping, 1, 10, 100}: with w2=1
        # and coarse_damping=damping, the coarse inverse of the first step (small curvature
        # at initialisation) held for 10 steps throws digits-mlp's tanh units into saturation
        # (loss stuck at log 10); coarse_damping 10 was best on both tasks.
        OptimizerSpec(
            name="twolevel",
            description="secondorder.TwoLevelKFAC (K-FAC plus a per-layer coarse correction)",
            factory=_secondorder("TwoLevelKFAC"),
            defaults={
                "lr": 0.02,
                "momentum": 0.9,
                "damping": 0.1,
                "coarse_damping": 10.0,
                "curvature_every": 1,
                "inverse_every": 10,
                "kl_clip": 1e-2,
                "graft": None,  # tuned without a graft (the library default grafts Adam)
            },
        ),
        # Tuned on digits-mlp (20 epochs, seed 0, ngrads 32): SGD-MFAC over lr {0.02, 0.05,
        # 0.1} x damping {0.05, 0.2}; Adam-MFAC over lr {1e-3, 3e-3, 1e-2} x damping
        # {0.05, 0.2, 1}. The window m is a hyperparameter of the bench (grids vary it):
        # window_memory None takes it at any size, as the reference does (32 on the CIFAR
        # ResNet-18 is 1.3 GiB, over MFAC's default budget of 1 GiB).
        OptimizerSpec(
            name="mfac",
            description="secondorder.MFAC (dynamic M-FAC window over SGD momentum)",
            factory=_secondorder("MFAC"),
            defaults={
                "lr": 0.02,
                "base": "sgd",
                "momentum": 0.9,
                "ngrads": 32,
                "window_memory": None,
                "damping": 0.05,
                "graft": None,  # tuned without a graft (the library default grafts Adam)
            },
        ),
        OptimizerSpec(
            name="adam-mfac",
            description="secondorder.MFAC with the Adam-style base (Adam-MFAC)",
            factory=_secondorder("MFAC"),
            defaults={
                "lr": 3e-3,
                "base": "adam",
                "ngrads": 32,
                "window_memory": None,
                "damping": 0.2,
            },
        ),
        # Distributed Shampoo's defaults (Adam grafting, epsilon 1e-12, beta2 1, roots every
        # step, tiles of 1024; configs/optimizers/shampoo.yaml) with lr tuned on digits-mlp
        # (20 epochs, seed 0, --threads 1) over {1e-3, 3e-3, 1e-2, 3e-2, 0.1}: final train loss
        # 0.114 / 0.037 / 0.0050 / 0.00091 / 0.00035, test accuracy 0.969 / 0.975 / 0.978 /
        # 0.983 / 0.972; lr 1e-3 (Adam's) never reached the 0.1 target, 3e-2 in 41 steps and
        # has the best test accuracy (benchmarks/RESULTS.md, issue 21).
        OptimizerSpec(
            name="shampoo",
            description="secondorder.Shampoo (L^-1/4 G R^-1/4 with Adam grafting)",
            factory=_secondorder("Shampoo"),
            defaults={"lr": 3e-2, "damping": 1e-12, "inverse_every": 1},
        ),
        # The SOAP reference's defaults (betas (0.95, 0.95), weight decay 0.01 decoupled, basis
        # every 10 steps; configs/optimizers/soap.yaml) with lr tuned on digits-mlp (20 epochs,
        # seed 0, --threads 1) over {1e-3, 3e-3 (the reference's), 1e-2, 3e-2, 0.1}: final
        # train loss 0.64 / 0.0069 / 5.4e-7 / 2.3e-4 / 0.067, test accuracy 0.925 / 0.975 /
        # 0.981 / 0.969 / 0.964; 1e-2 has the lowest loss and the best accuracy
        # (benchmarks/RESULTS.md, issue 21).
        OptimizerSpec(
            name="soap",
            description="secondorder.SOAP (Adam in the eigenbasis of Shampoo's L and R)",
            factory=_secondorder("SOAP"),
            defaults={"lr": 1e-2, "weight_decay": 0.01, "inverse_every": 10},
        ),
        # The library's defaults: the paper's (eps 1e-4, power 1) with Adam's step norms at
        # lr 3e-2 and β₁ 0.8 (issue 18, secondorder/docs/adahessian.md). The paper's update is
        # --set adahessian.graft=None --set adahessian.lr=0.15 --set "adahessian.betas=(0.9,
        # 0.999)" (over lr {0.02, 0.05,
        # 0.1, 0.15, 0.3}, 20 epochs, seed 0, 0.15 had the lowest final train loss on
        # digits-mlp).
        OptimizerSpec(
            name="adahessian",
            description="secondorder.AdaHessian (Hutchinson Hessian diagonal, Adam-style moments)",
            factory=_secondorder("AdaHessian"),
            defaults={"lr": 3e-2},
            create_graph=True,
        ),
        # The library's defaults (issue 18: T_cov 1, λ 0.03, lr 0.03, Adam's step norm per
        # weight row; secondorder/docs/adafisher.md) with the weight decay of the paper's
        # training recipes, 5e-4. The paper's update: --set adafisher.graft=None and its lr 1e-3,
        # λ 1e-3, T_cov 100 (configs/optimizers/adafisher.yaml), which barely moves on digits
        # in 20 epochs (loss 2.23).
        OptimizerSpec(
            name="adafisher",
            description="secondorder.AdaFisher (diagonal Kronecker Fisher, Adam-style moment)",
            factory=_secondorder("AdaFisher"),
            defaults={"weight_decay": 5e-4},
        ),
        OptimizerSpec(
            name="adafisherw",
            description="secondorder.AdaFisherW (AdaFisher with decoupled weight decay)",
            factory=_secondorder("AdaFisherW"),
            defaults={"weight_decay": 5e-4},
        ),
    )
}
"""Every benchmark optimizer, by the name ``--opt`` accepts."""


def parse_value(text: str) -> Any:
    """Read a command-line value as the narrowest of int, float, bool, None, a Python
    literal container, or str.

    ``"10"`` -> 10, ``"1e-3"`` -> 0.001, ``"true"`` / ``"false"`` -> bool (any case),
    ``"none"`` / ``"null"`` -> None (any case); text that starts with ``[``, ``(`` or ``{``
    is read as a Python literal (``"(0.9,0.99)"`` -> a tuple, ``'{"conv_positions":
    "reduce"}'`` -> a dict), and a malformed one raises ``ValueError``; anything else ->
    the string itself.

    Raises:
        ValueError: a ``[``/``(``/``{`` value that is not a Python literal.
    """
    stripped = text.strip()
    if stripped[:1] in ("[", "(", "{"):
        try:
            return ast.literal_eval(stripped)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(
                f"value {stripped!r} starts like a list, tuple or dict but is not a Python "
                f'literal ({exc}); e.g. (0.9,0.99) or {{"conv_positions":"reduce"}}'
            ) from None
    lowered = stripped.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``"name.key=value"`` into ``(name, key, parsed value)``.

    Raises:
        ValueError: the text is not of that form (the message quotes it and shows the form).
    """
    target, sep, raw = text.partition("=")
    name, dot, key = target.strip().partition(".")
    if not sep or not dot or not name or not key.isidentifier() or not raw.strip():
        raise ValueError(f"malformed override {text!r}: expected NAME.KEY=VALUE, e.g. kfac.lr=0.1")
    return name, key, parse_value(raw.strip())


def parse_overrides(
    items: Iterable[str], known: Iterable[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Parse ``--set`` items into ``{optimizer name: {key: value}}``; later items win.

    Args:
        items: strings of the form ``name.key=value``.
        known: the optimizer names allowed (default: every registered one).

    Raises:
        ValueError: an item is malformed or names an optimizer outside ``known``.
    """
    allowed = list(OPTIMIZERS if known is None else known)
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, key, value = parse_override(item)
        if name not in allowed:
            raise ValueError(
                f"override {item!r} names optimizer {name!r}; allowed: {', '.join(allowed)}"
            )
        out.setdefault(name, {})[key] = value
    return out

"""Model-aware capture: which layers are seen, what is recorded, and when.

:class:`ModelCapture` attaches a forward hook to every covered layer. The forward
hook registers a tensor hook on the layer's *output* (not a module backward hook:
those break on models with in-place activations after normalisation layers, such as
timm's ResNets); when the gradient of that output arrives during ``backward()``,
the layer's input (kept alive by autograd anyway) and the output gradient are handed
to an ``accumulate`` callback supplied by the estimator, which folds them into a
running statistic. Nothing is stored for a forward pass that is never
back-propagated.

Recording happens only when all of these hold:

* the capture is switched on (the optimizer does this for the passes that precede a
  curvature-update step);
* gradients are enabled (nothing under ``torch.no_grad()`` / ``inference_mode``);
* the module is in training mode, unless ``record_in_eval=True``;
* the layer's output requires grad.

Several backward passes before one ``collect()`` (gradient accumulation) all add to
the same statistic.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layers import LayerHelper, helper_class_for, supported_types

#: ``accumulate(layer, inputs, grad_output, acc) -> acc``; ``acc`` is None on the first
#: pass since the last collect.
Accumulate = Callable[[LayerHelper, Tensor, Tensor, Any], Any]

SkipPattern = str | re.Pattern


def _compile_skip(skip_layers: Iterable[SkipPattern] | None) -> list[re.Pattern]:
    if skip_layers is None:
        return []
    if isinstance(skip_layers, (str, re.Pattern)):
        skip_layers = [skip_layers]
    patterns = []
    for item in skip_layers:
        if isinstance(item, re.Pattern):
            patterns.append(item)
        elif isinstance(item, str):
            try:
                patterns.append(re.compile(item))
            except re.error as exc:
                raise ValueError(f"skip_layers: {item!r} is not a valid regex ({exc})") from exc
        else:
            raise TypeError(
                f"skip_layers must hold module names or regexes (str or re.Pattern), "
                f"got {type(item).__name__}"
            )
    return patterns


def find_layers(
    model: nn.Module,
    trainable: set[nn.Parameter] | None = None,
    skip_layers: Iterable[SkipPattern] | None = None,
) -> tuple[list[LayerHelper], list[str]]:
    """Helpers for every supported layer of ``model`` that should be covered.

    A layer is covered when a helper is registered for its type, its weight requires
    grad (and is in ``trainable`` if given), and its qualified name does not fully
    match one of ``skip_layers`` (module names or regular expressions). A pattern
    that matches no module at all raises ``ValueError`` rather than being ignored.

    Returns:
        ``(helpers, reasons)``: the helpers in module order, and one human-readable
        line per supported module that was left out and why.
    """
    patterns = _compile_skip(skip_layers)
    names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if not any(pattern.fullmatch(name) for name in names):
            raise ValueError(
                f"skip_layers: {pattern.pattern!r} matches no module of the model "
                f"(module names are e.g. {names[1:6]})"
            )
    helpers: list[LayerHelper] = []
    left_out: list[str] = []
    seen_weights: set[int] = set()
    for name, module in model.named_modules():
        helper_cls = helper_class_for(module)
        if helper_cls is None:
            continue
        weight = getattr(module, "weight", None)
        if any(p.fullmatch(name) for p in patterns):
            left_out.append(f"{name}: in skip_layers")
        elif not isinstance(weight, nn.Parameter) or isinstance(
            weight, nn.parameter.UninitializedParameter
        ):
            left_out.append(f"{name}: weight is not an initialised Parameter")
        elif not weight.requires_grad:
            left_out.append(f"{name}: weight.requires_grad is False")
        elif trainable is not None and weight not in trainable:
            left_out.append(f"{name}: weight is not in the optimizer's parameters")
        elif id(weight) in seen_weights:
            left_out.append(f"{name}: weight shared with another layer (not supported yet)")
        else:
            seen_weights.add(id(weight))
            bias = getattr(module, "bias", None)
            include_bias = (
                isinstance(bias, nn.Parameter)
                and bias.requires_grad
                and (trainable is None or bias in trainable)
            )
            helpers.append(helper_cls(module, name, include_bias=include_bias))
    return helpers, left_out


class ModelCapture:
    """Hooks that feed per-layer statistics of ``model`` to an estimator.

    Args:
        layers (Sequence[LayerHelper]): the layers to watch (from :func:`find_layers`).
        accumulate (Accumulate): called as ``accumulate(layer, inputs, grad_output,
            acc)`` during backward for every recorded pass; returns the new ``acc``.
        record_in_eval (bool, optional): also record passes of modules in eval mode
            (default: False).
    """

    def __init__(
        self,
        layers: Sequence[LayerHelper],
        accumulate: Accumulate,
        *,
        record_in_eval: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.accumulate = accumulate
        self.record_in_eval = record_in_eval
        #: switched by the optimizer: record only passes that feed a curvature update
        self.recording = True
        self._acc: dict[str, Any] = {}
        self._handles = [
            layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers
        ]

    def _forward_hook(self, layer: LayerHelper) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not (self.recording and torch.is_grad_enabled()):
                return
            if not (module.training or self.record_in_eval):
                return
            if not (isinstance(output, Tensor) and output.requires_grad) or not args:
                return
            inputs = args[0].detach()

            def on_grad(grad_output: Tensor) -> None:
                acc = self._acc.get(layer.name)
                self._acc[layer.name] = self.accumulate(layer, inputs, grad_output.detach(), acc)

            output.register_hook(on_grad)

        return hook

    def collect(self) -> dict[str, Any]:
        """The statistics accumulated since the last call (by layer name), then reset."""
        acc, self._acc = self._acc, {}
        return acc

    def discard(self) -> None:
        """Drop whatever was accumulated (a skipped step)."""
        self._acc = {}

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def describe_unsupported(model: nn.Module) -> str:
    """One line naming the module types of ``model`` and the ones we support."""
    types = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
    return (
        f"the model's leaf modules are {types or ['(none)']}; "
        f"layers with a helper are {supported_types()}"
    )

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layers import LayerHelper, helper_class_for, registered_helpers, supported_types

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


def _check_layer_options(layer_options: Mapping[str, Any] | None) -> dict[str, Any]:
    if layer_options is None:
        return {}
    if not isinstance(layer_options, Mapping):
        raise TypeError(
            f"layer_options must be a dict of option name to value, got "
            f"{type(layer_options).__name__}"
        )
    known = {opt for cls in registered_helpers() for opt in cls.options}
    unknown = sorted(set(layer_options) - known)
    if unknown:
        raise ValueError(
            f"layer_options: unknown option(s) {unknown}; the layer helpers accept {sorted(known)}"
        )
    return dict(layer_options)


def find_layers(
    model: nn.Module,
    trainable: set[nn.Parameter] | None = None,
    skip_layers: Iterable[SkipPattern] | None = None,
    layer_options: Mapping[str, Any] | None = None,
) -> tuple[list[LayerHelper], list[str]]:
    """Helpers for every supported layer of ``model`` that should be covered.

    A layer is covered when a helper is registered for its type, its weight requires
    grad (and is in ``trainable`` if given), and its qualified name does not fully
    match one of ``skip_layers`` (module names or regular expressions). A pattern
    that matches no module at all raises ``ValueError`` rather than being ignored.
    ``layer_options`` are passed to the helpers that declare them (an option no
    helper knows is an error).

    Tied weights: when several modules share one weight, the first one's helper
    covers it and lists the others in its ``tied`` attribute; the capture feeds the
    statistics of all of them into that one helper's entry, and the weight is
    preconditioned (and updated) once. The modules must agree on the helper type and
    the shapes of the Kronecker blocks (two ``nn.Linear`` of the same shape, say); a
    tied module with a bias of its own leaves that bias to the base update (its input
    rows get a 0 in the tied bias column, so the statistics stay exact);
    a weight shared by modules of different kinds (an ``nn.Embedding`` tied to an
    ``nn.Linear`` output layer) is left to the base update, with the reason listed.

    Returns:
        ``(helpers, reasons)``: the helpers in module order, and one human-readable
        line per supported module that was left out and why.
    """
    options = _check_layer_options(layer_options)
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
    by_weight: dict[int, LayerHelper] = {}
    mixed: set[int] = set()  # ids of weights tied across incompatible helpers
    for name, module in model.named_modules(remove_duplicate=False):
        if any(h.module is module for h in helpers):
            continue  # the same module registered under two names
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
        else:
            bias = getattr(module, "bias", None)
            include_bias = (
                isinstance(bias, nn.Parameter)
                and bias.requires_grad
                and (trainable is None or bias in trainable)
            )
            kwargs = {k: v for k, v in options.items() if k in helper_cls.options}
            helper = helper_cls(module, name, include_bias=include_bias, **kwargs)
            primary = by_weight.get(id(weight))
            if primary is not None and primary.bias is not helper.bias:
                # tied weight, separate biases: this module's bias is left to the base
                # update and its rows carry 0 in the primary's bias column
                helper = helper_cls(module, name, include_bias=False, **kwargs)
                helper.zero_bias_column = primary.has_bias
            if primary is None:
                by_weight[id(weight)] = helper
                helpers.append(helper)
            elif _tie_compatible(primary, helper):
                primary.tied.append(helper)
            else:
                mixed.add(id(weight))
                left_out.append(
                    f"{name}: weight shared with {primary.name!r} by a module of another "
                    f"kind or shape ({type(module).__name__} vs {type(primary.module).__name__})"
                )
    for weight_id in mixed:
        primary = by_weight[weight_id]
        helpers.remove(primary)
        left_out.append(f"{primary.name}: weight tied to a module of another kind (see below)")
        left_out.extend(f"{h.name}: tied to {primary.name!r}" for h in primary.tied)
    return helpers, left_out


def _tie_compatible(a: LayerHelper, b: LayerHelper) -> bool:
    """Whether two helpers of one shared weight can pool their statistics."""
    if type(a) is not type(b) or a.kind != "kronecker":
        return False
    return (a.groups, a.a_dim, a.g_dim) == (b.groups, b.a_dim, b.g_dim)


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
        model: nn.Module | None = None,
    ) -> None:
        self.layers = list(layers)
        self.accumulate = accumulate
        self.record_in_eval = record_in_eval
        #: switched by the optimizer: record only passes that feed a curvature update
        self.recording = True
        #: decides, when an output gradient arrives, whether it is recorded (None: all);
        #: the Monte-Carlo Fisher uses it to keep only the sampled-label backward
        self.accept: Callable[[], bool] | None = None
        self._acc: dict[str, Any] = {}
        self._pass = 0  # forward passes of the model seen so far
        self._expected = 0  # ... of them to be recorded, since the last collect
        self._hook_calls = 0  # layer forward-hook calls since the last collect
        self._examples: dict[str, dict[int, int]] = {}
        self._handles = [
            member.module.register_forward_hook(self._forward_hook(layer, member))
            for layer in self.layers
            for member in (layer, *layer.tied)
        ]
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(self._count_pass))

    def _count_pass(self, module: nn.Module, args: tuple) -> None:
        self._pass += 1
        if self.recording and torch.is_grad_enabled() and (module.training or self.record_in_eval):
            self._expected += 1  # a pass the layer hooks should see

    def _check_hooks_ran(self) -> None:
        """Forward passes of the model that should have been recorded, and not one call of
        a layer hook: code compiled by ``torch.compile`` before the hooks existed runs
        without them (Dynamo does not guard on module hooks)."""
        expected, self._expected, ran, self._hook_calls = self._expected, 0, self._hook_calls, 0
        if expected and not ran:
            raise RuntimeError(
                f"the model ran {expected} forward pass(es) to be recorded, but none of its "
                "covered layers' hooks did: it was probably compiled (torch.compile) and "
                "called before the optimizer attached its hooks, and the compiled code runs "
                "without them. Build the optimizer before the compiled model's first call, "
                "or call torch._dynamo.reset() after building it"
            )

    def _forward_hook(self, layer: LayerHelper, member: LayerHelper) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._hook_calls += 1
            if not (self.recording and torch.is_grad_enabled()):
                return
            if not (module.training or self.record_in_eval):
                return
            if not (isinstance(output, Tensor) and output.requires_grad) or not args:
                return
            inputs = args[0].detach()
            # one model forward pass is one set of examples, however many times (or
            # through however many tied modules) the layer ran in it
            pass_id = self._pass if self._pass else id(output)

            def on_grad(grad_output: Tensor) -> None:
                if self.accept is not None and not self.accept():
                    return
                acc = self._acc.get(layer.name)
                self._acc[layer.name] = self.accumulate(member, inputs, grad_output.detach(), acc)
                seen = self._examples.setdefault(layer.name, {})
                seen[pass_id] = max(seen.get(pass_id, 0), member.batch_size(inputs))

            output.register_hook(on_grad)

        return hook

    def collect(self) -> dict[str, Any]:
        """The statistics accumulated since the last call (by layer name), then reset.

        Statistics objects with an ``examples`` attribute get it set to the number of
        examples they saw: the sum over model forward passes of the batch size (a layer
        run twice in one forward, or tied modules, count the batch once).
        """
        self._check_hooks_ran()
        acc, self._acc = self._acc, {}
        examples, self._examples = self._examples, {}
        for name, stat in acc.items():
            if hasattr(stat, "examples") and name in examples:
                stat.examples = sum(examples[name].values())
        return acc

    def discard(self) -> None:
        """Drop whatever was accumulated (a skipped step)."""
        self._acc = {}
        self._examples = {}
        self._expected = self._hook_calls = 0

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

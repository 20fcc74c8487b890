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
* the layer's output requires grad;
* the module is the one the hook was registered on: ``copy.deepcopy(model)`` copies the
  hooks with the modules, and the copy's passes record nothing.

Several backward passes before one ``collect()`` (gradient accumulation) all add to
the same statistic.

Under ``torch.compile`` a tensor hook that updates Python state cannot be traced: it
breaks the graph at every covered layer, and Dynamo then compiles each layer's forward
as a frame of its own (recompiled per weight shape until ``recompile_limit``). So while
Dynamo traces a pass to be recorded, the forward hook routes the output through
``secondorder::tap``, an identity operator that Dynamo and AOTAutograd treat as opaque:
its backward, ``secondorder::tap_grad``, hands the output gradient to the same recording
code at run time, and the model stays one graph (two: the recording switch is the one
piece of the capture's state that Dynamo guards on).

Layer names are the model's own: the ``_orig_mod`` component that ``torch.compile``'s
wrapper adds is dropped (:func:`module_name`), so a compiled and an uncompiled model
have the same names (in ``skip_layers``, in saved state, in messages).
"""

from __future__ import annotations

import itertools
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ._host import to_host
from .layers import (
    KroneckerHelper,
    LayerHelper,
    registered_helpers,
    resolve_helper,
    supported_types,
)
from .subsample import ExampleSampler

#: ``accumulate(layer, inputs, grad_output, acc) -> acc``; ``acc`` is None on the first
#: pass since the last collect.
Accumulate = Callable[[LayerHelper, Tensor, Tensor, Any], Any]

SkipPattern = str | re.Pattern

#: the attribute under which ``torch.compile(model)`` keeps the model it wraps
_COMPILED_WRAPPER_ATTR = "_orig_mod"


def module_name(name: str) -> str:
    """``name`` (from ``named_modules`` / ``named_parameters``) without the ``_orig_mod``
    components of ``torch.compile``'s wrappers: ``"_orig_mod.fc.weight"`` is ``"fc.weight"``,
    the name the uncompiled model gives it."""
    if _COMPILED_WRAPPER_ATTR not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _COMPILED_WRAPPER_ATTR)


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

    A layer is covered when a helper covers it (``secondorder.layers.resolve_helper``: a
    subclass with a ``forward`` of its own needs a helper of its own), its weight requires
    grad (and is in ``trainable`` if given), and its qualified name does not fully
    match one of ``skip_layers`` (module names or regular expressions). A pattern
    that matches no module at all raises ``ValueError`` rather than being ignored.
    Names are those of :func:`module_name` (a pattern may also match the name with the
    ``_orig_mod`` components of a compiled model).
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
    raw_names = [name for name, _ in model.named_modules()]
    names = list(dict.fromkeys(module_name(name) for name in raw_names))
    for pattern in patterns:
        if not any(pattern.fullmatch(name) for name in names + raw_names):
            raise ValueError(
                f"skip_layers: {pattern.pattern!r} matches no module of the model "
                f"(module names are e.g. {names[1:6]})"
            )
    helpers: list[LayerHelper] = []
    left_out: list[str] = []
    by_weight: dict[int, LayerHelper] = {}
    mixed: set[int] = set()  # ids of weights tied across incompatible helpers
    for raw_name, module in model.named_modules(remove_duplicate=False):
        if any(h.module is module for h in helpers):
            continue  # the same module registered under two names
        helper_cls, no_helper = resolve_helper(module)
        if helper_cls is None:
            if no_helper is not None and any(p.requires_grad for p in module.parameters()):
                left_out.append(f"{module_name(raw_name)}: {no_helper}")
            continue
        name = module_name(raw_name)
        weight = getattr(module, "weight", None)
        if any(p.fullmatch(name) or p.fullmatch(raw_name) for p in patterns):
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
    if type(a) is not type(b) or not isinstance(a, KroneckerHelper):
        return False
    return (a.groups, a.a_dim, a.g_dim) == (b.groups, b.a_dim, b.g_dim)


# ---- torch.compile: the recording as opaque operators ------------------------------------
def _is_compiling() -> bool:
    """Whether Dynamo is tracing the calling code (False on a torch without it)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


#: tap id (one per hooked module) -> its capture, by weak reference: compiled code names
#: the ids, and must keep neither an optimizer nor a model alive
_TAPS: dict[int, weakref.ref] = {}
_tap_ids = itertools.count()


def _forget_taps(tap_ids: list[int]) -> None:
    for tap_id in tap_ids:
        _TAPS.pop(tap_id, None)


def _capture_of(tap_id: int) -> ModelCapture | None:
    ref = _TAPS.get(tap_id)
    return None if ref is None else ref()


def _tap_impl(inputs: Tensor, output: Tensor, tap_id: int) -> tuple[Tensor, Tensor]:
    """``secondorder::tap``, run when the compiled forward reaches a hooked layer: notes
    that the layer's hook ran and returns a copy of ``output`` (operators may not return
    their inputs) and ``[recorded, pass id]`` for the backward."""
    capture = _capture_of(tap_id)
    pass_id = None if capture is None else capture._tapped(tap_id, output)
    token = torch.tensor([pass_id is not None, pass_id or 0], dtype=torch.long)
    return output.clone(), token


def _tap_grad_impl(inputs: Tensor, grad_output: Tensor, token: Tensor, tap_id: int) -> Tensor:
    """``secondorder::tap_grad``, the backward of ``tap``: hands the output gradient to the
    capture as the eager tensor hook does, and passes it on."""
    recorded, pass_id = token.tolist()
    capture = _capture_of(tap_id)
    if recorded and capture is not None and tap_id in capture._taps:
        layer, member = capture._taps[tap_id]
        capture._on_grad(layer, member, inputs, pass_id, grad_output)
    return grad_output.clone()


def _define_tap_ops() -> Callable[..., tuple[Tensor, Tensor]] | None:
    """Register ``secondorder::tap`` and its backward (None on a torch without
    ``torch.library.custom_op``: the hooks then break the graph instead)."""
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return None
    tap = custom_op("secondorder::tap", _tap_impl, mutates_args=())
    tap_grad = custom_op("secondorder::tap_grad", _tap_grad_impl, mutates_args=())

    @tap.register_fake
    def _(inputs: Tensor, output: Tensor, tap_id: int) -> tuple[Tensor, Tensor]:
        return torch.empty_like(output), torch.empty(2, dtype=torch.long)

    @tap_grad.register_fake
    def _(inputs: Tensor, grad_output: Tensor, token: Tensor, tap_id: int) -> Tensor:
        return torch.empty_like(grad_output)

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.tap_id = inputs[2]
        ctx.save_for_backward(inputs[0], output[1])

    def backward(ctx: Any, grad_output: Tensor, _: Any) -> tuple[None, Tensor, None]:
        inputs, token = ctx.saved_tensors
        return None, tap_grad(inputs, grad_output, token, ctx.tap_id), None

    tap.register_autograd(backward, setup_context=setup_context)
    return tap


_tap = _define_tap_ops()


def _forward_codes(model: nn.Module) -> list[Any]:
    """The code objects Dynamo compiles when ``model`` (or a module of it) is compiled:
    each module class's ``forward``, ``Module._call_impl`` (``model.compile()``) and the
    frame ``torch.compile`` wraps ``torch.nn`` containers in."""
    codes = {getattr(type(m).forward, "__code__", None) for m in model.modules()}
    codes.add(nn.Module._call_impl.__code__)
    try:
        from torch._dynamo.external_utils import wrap_inline

        codes.add(wrap_inline(nn.Identity()).__code__)
    except (ImportError, AttributeError):
        pass
    return [code for code in codes if code is not None]


def _has_compiled_code(model: nn.Module) -> bool:
    """Whether Dynamo already holds compiled code for ``model``'s forward (or for another
    module of the same classes): code compiled before hooks existed runs without them.
    True when it cannot tell (a torch without the introspection used here)."""
    if "torch._dynamo" not in sys.modules:
        return False  # nothing was ever compiled in this process
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return True
    return any(_debug_get_cache_entry_list(code) for code in _forward_codes(model))


class ModelCapture:
    """Hooks that feed per-layer statistics of ``model`` to an estimator.

    Args:
        layers (Sequence[LayerHelper]): the layers to watch (from :func:`find_layers`).
        accumulate (Accumulate): called as ``accumulate(layer, inputs, grad_output,
            acc)`` during backward for every recorded pass; returns the new ``acc``.
        record_in_eval (bool, optional): also record passes of modules in eval mode
            (default: False).
        model (nn.Module, optional): the whole model: its forward passes are counted, so
            that :meth:`collect` knows how many examples were seen and whether the layer
            hooks ran (default: None).
        sampler (ExampleSampler, optional): hand ``accumulate`` only the examples it keeps
            of each pass, their output gradients rescaled so that the statistics stay
            unbiased (:mod:`secondorder.subsample`); the examples counted are still all of
            them (default: None, every example).
    """

    def __init__(
        self,
        layers: Sequence[LayerHelper],
        accumulate: Accumulate,
        *,
        record_in_eval: bool = False,
        model: nn.Module | None = None,
        sampler: ExampleSampler | None = None,
    ) -> None:
        self.layers = list(layers)
        self.sampler = sampler
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
        self._ran: set[str] = set()  # layers whose hook (or a tied module's) ran, ditto
        self._examples: dict[str, dict[int, int]] = {}
        self._handles: dict[str, list[Any]] = {}  # layer name -> hook handles
        self._taps: dict[int, tuple[LayerHelper, LayerHelper]] = {}  # id -> (layer, member)
        for layer in self.layers:
            self._handles[layer.name] = []
            for member in (layer, *layer.tied):
                tap_id = next(_tap_ids)
                _TAPS[tap_id] = weakref.ref(self)
                self._taps[tap_id] = (layer, member)
                hook = self._forward_hook(layer, member, tap_id)
                self._handles[layer.name].append(member.module.register_forward_hook(hook))
        weakref.finalize(self, _forget_taps, list(self._taps))
        self._model_handles = []
        #: Dynamo held code for the model before these hooks existed (see _check_hooks_ran)
        self._compiled_before = False
        if model is not None:
            self._model_handles.append(model.register_forward_pre_hook(self._pass_counter(model)))
            self._compiled_before = _has_compiled_code(model)

    def _pass_counter(self, model: nn.Module) -> Callable[[nn.Module, tuple], None]:
        """The forward pre-hook that counts ``model``'s passes: a function, not a bound
        method, which ``copy.deepcopy(model)`` would copy along with this capture (and its
        estimator); a copy of the model carries this same function and is not counted."""
        model_ref = weakref.ref(model)

        def count_pass(module: nn.Module, args: tuple) -> None:
            if _is_compiling():
                # Counted in Python, never traced: a traced counter is a guard on its value,
                # so a recompilation at every pass. The break is before any computation.
                torch._dynamo.graph_break()
            if module is model_ref():
                self._count_pass(module)

        return count_pass

    def _count_pass(self, module: nn.Module) -> None:
        self._pass += 1
        if self.recording and torch.is_grad_enabled() and (module.training or self.record_in_eval):
            self._expected += 1  # a pass the layer hooks should see

    def _check_hooks_ran(self) -> None:
        """Forward passes of the model that should have been recorded, and not one call of
        a layer hook, in a model that Dynamo had compiled code for before the hooks were
        attached: that code runs without them (Dynamo does not guard on module hooks).
        Without compiled code the layers are the ones :meth:`unhooked` names."""
        expected, self._expected, ran, self._hook_calls = self._expected, 0, self._hook_calls, 0
        if expected and not ran and self.layers and self._compiled_before:
            raise RuntimeError(
                f"the model ran {expected} forward pass(es) to be recorded, but none of its "
                "covered layers' hooks did: it was probably compiled (torch.compile) and "
                "called before the optimizer attached its hooks, and the compiled code runs "
                "without them. Build the optimizer before the compiled model's first call, "
                "or call torch._dynamo.reset() after building it"
            )

    def unhooked(self, grads: Mapping[Tensor, Tensor]) -> list[LayerHelper]:
        """The layers whose parameters have a nonzero gradient in ``grads`` although no
        hook of theirs ran in the passes since the last :meth:`collect`: the model uses their
        weights without calling the modules (``nn.MultiheadAttention.out_proj``,
        ``F.linear(x, layer.weight)``), so they never get statistics. Empty when no pass
        was to be recorded, and when no hook ran at all in a model compiled before the
        hooks existed (:meth:`collect` raises then)."""
        if not (self._expected and self.layers):
            return []
        if not self._hook_calls and self._compiled_before:
            return []
        candidates = [
            (layer, [grads[p] for p in layer.params if p in grads])
            for layer in self.layers
            if layer.name not in self._ran
        ]
        candidates = [(layer, used) for layer, used in candidates if used]
        if not candidates:
            return []
        # a zero gradient is no evidence of use (zero_grad(set_to_none=False) leaves one
        # on a layer that sat out the step)
        nonzero = to_host(
            [torch.stack([g.ne(0).any() for g in used]).any() for _, used in candidates]
        )
        return [layer for (layer, _), used in zip(candidates, nonzero, strict=True) if used]

    def _records(self, module: nn.Module, args: tuple, output: Any) -> bool:
        """Whether this call of a hooked layer is to be recorded (the conditions in the
        module docstring). Under Dynamo it is traced: it reads only what Dynamo guards on
        anyway (grad mode, training, the requires_grad of tensors) and the recording switch
        (two variants at most), never counters."""
        if not (self.recording and torch.is_grad_enabled()):
            return False
        if not (module.training or self.record_in_eval):
            return False
        return isinstance(output, Tensor) and output.requires_grad and bool(args)

    def _forward_hook(self, layer: LayerHelper, member: LayerHelper, tap_id: int) -> Callable:
        # The module's id, not an `is` test: Dynamo guards on the id (an `is` it folds
        # unguarded), so code traced for one module is not reused for a copy of it, whose
        # hooks are these same functions. `member` keeps the module, so its id stays unique.
        module_id = id(member.module)

        def hook(module: nn.Module, args: tuple, output: Any) -> Tensor | None:
            if id(module) != module_id:
                # a copy of the module (copy.deepcopy of the model copies its hooks): its
                # passes belong to no statistic of ours
                return None
            if _is_compiling():
                if _tap is None:
                    torch._dynamo.graph_break()  # no custom operators: record in Python
                if not self._records(module, args, output):
                    return None
                return _tap(args[0].detach(), output, tap_id)[0]
            self._hook_calls += 1
            self._ran.add(layer.name)
            if not self._records(module, args, output):
                return None
            # one model forward pass is one set of examples, however many times (or
            # through however many tied modules) the layer ran in it
            pass_id = self._pass if self._pass else id(output)
            output.register_hook(partial(self._on_grad, layer, member, args[0].detach(), pass_id))
            return None

        return hook

    def _tapped(self, tap_id: int, output: Tensor) -> int | None:
        """``secondorder::tap`` ran for one of the hooked modules: the pass id to record it
        under, or None when this pass is not recorded."""
        if tap_id not in self._taps:
            return None  # a layer dropped since the code was compiled
        layer, _ = self._taps[tap_id]
        self._hook_calls += 1
        self._ran.add(layer.name)
        if not self.recording:
            return None
        return self._pass if self._pass else id(output)

    def _on_grad(
        self,
        layer: LayerHelper,
        member: LayerHelper,
        inputs: Tensor,
        pass_id: int,
        grad_output: Tensor,
    ) -> None:
        if self.accept is not None and not self.accept():
            return
        batch = member.batch_size(inputs)
        grad_output = grad_output.detach()
        if self.sampler is not None:
            inputs, grad_output = self.sampler.select(member, pass_id, inputs, grad_output)
        acc = self._acc.get(layer.name)
        self._acc[layer.name] = self.accumulate(member, inputs, grad_output, acc)
        seen = self._examples.setdefault(layer.name, {})
        seen[pass_id] = max(seen.get(pass_id, 0), batch)

    def collect(self) -> dict[str, Any]:
        """The statistics accumulated since the last call (by layer name), then reset.

        Statistics objects with an ``examples`` attribute get it set to the number of
        examples they saw: the sum over model forward passes of the batch size (a layer
        run twice in one forward, or tied modules, count the batch once).
        """
        self._check_hooks_ran()
        self._ran = set()
        if self.sampler is not None:
            self.sampler.clear()
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
        self._ran = set()
        if self.sampler is not None:
            self.sampler.clear()

    def drop(self, names: Iterable[str]) -> None:
        """Stop watching the layers ``names``: their hooks are removed and whatever they
        recorded is forgotten."""
        names = set(names)
        self.layers = [layer for layer in self.layers if layer.name not in names]
        dropped = [tap_id for tap_id, (layer, _) in self._taps.items() if layer.name in names]
        _forget_taps(dropped)
        for tap_id in dropped:
            del self._taps[tap_id]
        for name in names:
            for handle in self._handles.pop(name, []):
                handle.remove()
            self._acc.pop(name, None)
            self._examples.pop(name, None)
            self._ran.discard(name)

    def remove(self) -> None:
        """Detach every hook from the model."""
        self.drop([layer.name for layer in self.layers])
        for handle in self._model_handles:
            handle.remove()
        self._model_handles = []


def describe_unsupported(model: nn.Module) -> str:
    """One line naming the module types of ``model`` and the ones we support."""
    types = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
    return (
        f"the model's leaf modules are {types or ['(none)']}; "
        f"layers with a helper are {supported_types()}"
    )

"""Layer helpers and the registry that maps module types to them.

Only this package knows ``nn.Module`` types. Add support for a new layer family with a
:class:`KroneckerHelper` or :class:`BlockHelper` subclass and
:func:`register_layer_helper`.

The rule for subclasses (:func:`resolve_helper`): a module gets the helper of the nearest
class in its MRO that has one, *if it runs that class's* ``forward``. A helper reads a
module's input and output gradient as its registered class computes them, so a subclass
with a ``forward`` of its own (timm's channels-first ``LayerNorm2d``, ``BatchNormAct2d``
with an activation after the norm, a convolution that pads its input first) would get
wrong statistics or crash; it is covered only when a helper is registered for its class (or
for an ancestor whose ``forward`` it inherits), and is otherwise left to the base update
with that reason. A helper may also decline one configuration of its class
(:meth:`LayerHelper.unsupported_reason`), with the reason.
"""

from __future__ import annotations

from torch import nn

from .base import BlockHelper, KroneckerHelper, LayerHelper
from .conv import Conv1dHelper, Conv2dHelper, Conv3dHelper
from .embedding import EmbeddingHelper
from .linear import LinearHelper
from .norm import (
    BatchNormActHelper,
    BatchNormHelper,
    ChannelsFirstLayerNormHelper,
    GroupNormHelper,
    LayerNormHelper,
    NormHelper,
)

HelperClass = type[KroneckerHelper | BlockHelper]

#: module type, or ``"module.QualName"`` of a class this package does not import, to helper
_REGISTRY: dict[type[nn.Module] | str, HelperClass] = {
    nn.Linear: LinearHelper,
    nn.Conv1d: Conv1dHelper,
    nn.Conv2d: Conv2dHelper,
    nn.Conv3d: Conv3dHelper,
    nn.Embedding: EmbeddingHelper,
    nn.BatchNorm1d: BatchNormHelper,
    nn.BatchNorm2d: BatchNormHelper,
    nn.BatchNorm3d: BatchNormHelper,
    nn.SyncBatchNorm: BatchNormHelper,
    nn.LayerNorm: LayerNormHelper,
    nn.GroupNorm: GroupNormHelper,
    # timm's layers, by name so that importing secondorder does not import timm. Their
    # forwards compute their base's function (fast-norm / float32 variants, a cast), or a
    # channels-first layer norm.
    "timm.layers.norm.LayerNorm": LayerNormHelper,
    "timm.layers.norm.LayerNormFp32": LayerNormHelper,
    "timm.layers.norm.LayerNorm2d": ChannelsFirstLayerNormHelper,
    "timm.layers.norm.LayerNorm2dFp32": ChannelsFirstLayerNormHelper,
    "timm.layers.norm.GroupNorm": GroupNormHelper,
    "timm.layers.norm.GroupNorm1": GroupNormHelper,
    "timm.layers.linear.Linear": LinearHelper,
    "timm.layers.norm_act.BatchNormAct2d": BatchNormActHelper,
}

#: modules without a helper whose parameters are worth a reason in ``left_out_layers``
_NO_HELPER: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: (
        "nn.MultiheadAttention projects q, k, v with in_proj_weight inside "
        "F.multi_head_attention_forward, where no hook sees the projections' output "
        "gradients, so no Kronecker factor can be built (docs/layers.md)"
    ),
}


def register_layer_helper(module_type: type[nn.Module] | str, helper: HelperClass) -> None:
    """Use ``helper`` for modules of ``module_type`` and of its subclasses that keep its
    ``forward``. ``module_type`` may be a class or its ``"module.QualName"`` (a class of
    another package, registered without importing it)."""
    if not (
        isinstance(module_type, str)
        or (isinstance(module_type, type) and issubclass(module_type, nn.Module))
    ):
        raise TypeError(
            f"module_type must be an nn.Module subclass or its qualified name, got {module_type!r}"
        )
    if not (isinstance(helper, type) and issubclass(helper, (KroneckerHelper, BlockHelper))):
        raise TypeError(
            "helper must be a LayerHelper subclass of one family, KroneckerHelper or "
            f"BlockHelper; got {helper!r}"
        )
    _REGISTRY[module_type] = helper


def _registered(cls: type) -> HelperClass | None:
    helper = _REGISTRY.get(cls)
    return helper if helper is not None else _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")


def resolve_helper(module: nn.Module) -> tuple[HelperClass | None, str | None]:
    """``(helper class, None)`` for a module a helper covers; ``(None, reason)`` for one
    that has supported parameters but no helper that can read it (a subclass of a
    supported type with its own ``forward``, a configuration the helper declines,
    ``nn.MultiheadAttention``'s projections);
    ``(None, None)`` for any other module. The rule is in the module docstring."""
    module_type = type(module)
    for cls in module_type.__mro__:
        helper = _registered(cls)
        if helper is None:
            continue
        if module_type.forward is not cls.forward:
            return None, (
                f"{module_type.__module__}.{module_type.__qualname__} overrides the forward of "
                f"{cls.__name__}, whose helper ({helper.__name__}) would misread it; register a "
                "helper for it (secondorder.layers.register_layer_helper) to cover it"
            )
        return (None, reason) if (reason := helper.unsupported_reason(module)) else (helper, None)
    for cls in module_type.__mro__:
        if cls in _NO_HELPER:
            return None, _NO_HELPER[cls]
    return None, None


def helper_class_for(module: nn.Module) -> HelperClass | None:
    """The helper class that covers ``module`` (:func:`resolve_helper`), or None."""
    return resolve_helper(module)[0]


def registered_helpers() -> list[HelperClass]:
    """The distinct helper classes in the registry."""
    return list(dict.fromkeys(_REGISTRY.values()))


def supported_types() -> list[str]:
    """Names of the module types that have a helper (qualified names for the classes
    registered by name)."""
    return sorted(t if isinstance(t, str) else t.__name__ for t in _REGISTRY)


__all__ = [
    "BatchNormActHelper",
    "BatchNormHelper",
    "BlockHelper",
    "ChannelsFirstLayerNormHelper",
    "Conv1dHelper",
    "Conv2dHelper",
    "Conv3dHelper",
    "EmbeddingHelper",
    "GroupNormHelper",
    "KroneckerHelper",
    "LayerHelper",
    "LayerNormHelper",
    "LinearHelper",
    "NormHelper",
    "helper_class_for",
    "register_layer_helper",
    "registered_helpers",
    "resolve_helper",
    "supported_types",
]

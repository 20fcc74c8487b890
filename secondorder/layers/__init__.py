"""Layer helpers and the registry that maps module types to them.

Only this package knows ``nn.Module`` types. Add support for a new layer family with a
:class:`KroneckerHelper` or :class:`BlockHelper` subclass and
:func:`register_layer_helper`.
"""

from __future__ import annotations

from torch import nn

from .base import BlockHelper, KroneckerHelper, LayerHelper
from .conv import Conv1dHelper, Conv2dHelper, Conv3dHelper
from .embedding import EmbeddingHelper
from .linear import LinearHelper
from .norm import BatchNormHelper, GroupNormHelper, LayerNormHelper, NormHelper

_REGISTRY: dict[type[nn.Module], type[KroneckerHelper | BlockHelper]] = {
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
}


def register_layer_helper(
    module_type: type[nn.Module], helper: type[KroneckerHelper | BlockHelper]
) -> None:
    """Use ``helper`` for modules of ``module_type`` (and its subclasses)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (isinstance(helper, type) and issubclass(helper, (KroneckerHelper, BlockHelper))):
        raise TypeError(
            "helper must be a LayerHelper subclass of one family, KroneckerHelper or "
            f"BlockHelper; got {helper!r}"
        )
    _REGISTRY[module_type] = helper


def helper_class_for(module: nn.Module) -> type[KroneckerHelper | BlockHelper] | None:
    """The helper class registered for ``module``'s type (nearest base class), or None."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def registered_helpers() -> list[type[KroneckerHelper | BlockHelper]]:
    """The distinct helper classes in the registry."""
    return list(dict.fromkeys(_REGISTRY.values()))


def supported_types() -> list[str]:
    """Names of the module types that have a helper."""
    return sorted(t.__name__ for t in _REGISTRY)


__all__ = [
    "BatchNormHelper",
    "BlockHelper",
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
    "supported_types",
]

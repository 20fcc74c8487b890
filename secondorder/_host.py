"""Moving scalar results to the host without one device sync per tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_host(values: Sequence[Tensor]) -> list:
    """The Python values of 0-dim tensors, with one host sync per device involved."""
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        by_device.setdefault(value.device, []).append(i)
    out: list = [None] * len(values)
    for indices in by_device.values():
        host = torch.stack([values[i] for i in indices]).tolist()
        for i, value in zip(indices, host, strict=True):
            out[i] = value
    return out


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (``torch.cuda.graph``): a step
    then reads nothing back to the host (whatever it read would be frozen into the graph)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()

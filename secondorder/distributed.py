"""Data-parallel curvature: statistics reduced across ranks, refreshes shared out by cost.

With ``torch.distributed`` initialised (``torchrun``, any backend: gloo on CPU, NCCL on
GPU) and the model wrapped in ``DistributedDataParallel``, every rank sees the same
averaged gradient but only its own examples' layer statistics. A
:class:`~secondorder.optimizer.CurvatureOptimizer` with a :class:`Communicator` then

* **reduces the statistics** of every curvature step in one ``all_reduce`` per dtype,
  so that each rank's estimator absorbs the statistics of the *concatenated* batch:
  input-side sums (K-FAC's ``Σ ã ãᵀ``, AdaFisher's ``Σ ã²``) and counts are added;
  output-gradient sums (``Σ g gᵀ``, ``Σ g²``, per-example squares) are weighted by the
  square of the rank's example count and divided by the square of the total, because
  each rank's loss is a mean over its own ``n_r`` examples (the output gradients carry
  ``1/n_r``) while the concatenated loss is a mean over ``N = Σ n_r``. Symmetric
  factors travel as their upper triangle. A layer recorded on some ranks but not on
  others in a step is left out of that update on every rank (counted in
  :attr:`Communicator.dropped_layer_updates`), so that the ranks never diverge;
* **shares out the refreshes**: each eigendecomposition / Cholesky job (one per layer)
  goes to a rank by a greedy longest-job-first assignment on its cost ``Σ n³``, each
  rank computes its own (batched: one decomposition per factor size), and the results
  are broadcast, so that every rank holds
  bit-identical inverses and applies the same update.

Two-level K-FAC reduces its coarse sums the same way (:meth:`Communicator.reduce_sums`).
M-FAC needs no communication (its window holds the gradients DDP has already
averaged). The statistics must come from a loss that is a mean over the rank's batch
(the library's convention everywhere).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Communicator",
    "assign_by_cost",
    "default_communicator",
    "scale_output_statistics",
    "stat_field",
]

#: field metadata: how a statistics field combines across ranks and under loss scaling
_INPUT, _OUTPUT = "input", "output"


def stat_field(kind: str, *, symmetric: bool = False) -> dict[str, Any]:
    """Metadata of a statistics dataclass field, ``field(metadata=stat_field(...))``,
    that says how the field reduces across ranks.

    Args:
        kind: ``"input"`` (a plain sum over rows: added across ranks) or ``"output"``
            (built from output gradients, which carry the rank's ``1/n`` and the loss
            scale: weighted by ``n²`` across ranks, divided by the scale² under AMP).
        symmetric: batched symmetric matrices (``(..., k, k)``, 3-D or more) travel as
            their upper triangle; lower-dimensional values of the same field (a
            diagonal) travel whole.
    """
    if kind not in (_INPUT, _OUTPUT):
        raise ValueError(f"kind must be 'input' or 'output', got {kind!r}")
    return {"reduce": kind, "symmetric": symmetric}


def _tensor_fields(obj: Any) -> Iterator[tuple[Any, str, str, bool]]:
    """``(owner, field name, kind, symmetric)`` of every tagged tensor in a statistics
    object, nested statistics included, in a fixed order."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "reduce" in f.metadata:
            if isinstance(value, Tensor):
                yield obj, f.name, f.metadata["reduce"], f.metadata["symmetric"]
        elif dataclasses.is_dataclass(value):
            yield from _tensor_fields(value)


def _count_fields(obj: Any) -> Iterator[tuple[Any, str]]:
    """Integer counts (``rows``, ``examples``) of a statistics object, nested included."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in ("rows", "examples") and isinstance(value, int):
            yield obj, f.name
        elif dataclasses.is_dataclass(value):
            yield from _count_fields(value)


def reducible(obj: Any) -> bool:
    """Whether ``obj`` is a statistics object this module knows how to reduce."""
    return dataclasses.is_dataclass(obj) and any(True for _ in _tensor_fields(obj))


def scale_output_statistics(stats: Mapping[str, Any], factor: float) -> None:
    """Multiply every output-gradient field of ``stats`` by ``factor`` in place (under AMP,
    ``1/scale²`` undoes the loss scale the hooks saw)."""
    for obj in stats.values():
        for owner, name, kind, _ in _tensor_fields(obj):
            if kind == _OUTPUT:
                setattr(owner, name, getattr(owner, name) * factor)


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each job: longest job first to the least-loaded rank (ties to the
    lower index and rank), the classic LPT schedule, deterministic on every rank."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0.0, r) for r in range(world_size)]
    owners = [0] * len(costs)
    for i in order:
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


class Communicator:
    """The ranks of a process group, as the curvature code uses them.

    Args:
        group (ProcessGroup, optional): the group to reduce over (default: the world).
    """

    def __init__(self, group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed curvature needs torch.distributed initialised "
                "(torch.distributed.init_process_group, or a torchrun launch)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        #: where collectives run: the CPU for gloo, this process's GPU otherwise
        self.device = (
            torch.device("cpu")
            if dist.get_backend(group) == "gloo"
            else torch.device("cuda", torch.cuda.current_device())
        )
        #: layer updates left out because only some ranks recorded the layer
        self.dropped_layer_updates = 0
        #: the owner rank of each job of the last :meth:`share` (for inspection)
        self.last_assignment: dict[str, int] = {}

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # ---- statistics -------------------------------------------------------------------
    def reduce_statistics(self, names: Sequence[str], stats: Mapping[str, Any]) -> dict[str, Any]:
        """The statistics of the concatenated batch, for the layers every rank recorded.

        ``names`` is every layer the estimator covers, in the same order on each rank;
        ``stats`` this rank's statistics (a subset of ``names``). Collective: every rank
        must call it at the same steps.
        """
        local = [stats.get(name) for name in names]
        sizes = [
            sum(getattr(o, f).numel() for o, f, _, _ in _tensor_fields(s)) if s is not None else 0
            for s in local
        ]
        for name, s in zip(names, local, strict=True):
            if s is not None and not reducible(s):
                raise TypeError(
                    f"layer {name!r}: statistics of type {type(s).__name__} cannot be "
                    "reduced across ranks"
                )
        present = torch.tensor([s is not None for s in local], dtype=torch.float64)
        size = torch.tensor(sizes, dtype=torch.float64)
        census = torch.stack([present, size, size.square()]).to(self.device)
        dist.all_reduce(census, group=self.group)
        count, total, squares = census.cpu().unbind()
        everywhere = [int(c) == self.world_size for c in count.tolist()]
        for name, all_have, t, sq in zip(
            names, everywhere, total.tolist(), squares.tolist(), strict=True
        ):
            if all_have and t * t != self.world_size * sq:
                raise RuntimeError(
                    f"layer {name!r}: the ranks recorded statistics of different sizes "
                    "(models or optimizer settings differ between ranks)"
                )
        self.dropped_layer_updates += sum(
            1 for c, e in zip(count.tolist(), everywhere, strict=True) if c > 0 and not e
        )
        keep = {name: s for name, s, e in zip(names, local, everywhere, strict=True) if e}
        if not keep:
            return {}
        # Weight output-gradient sums by n_r², pack every value by dtype, reduce, unpack.
        examples = {name: _examples(s) for name, s in keep.items()}
        values: list[tuple[Any, str, str, bool, Tensor]] = []
        for name, s in keep.items():
            n = examples[name]
            for owner, field, kind, symmetric in _tensor_fields(s):
                v = getattr(owner, field)
                if kind == _OUTPUT:
                    v = v * float(n * n)
                values.append((owner, field, name, symmetric and v.dim() >= 3, v))
        counts = [(owner, field) for s in keep.values() for owner, field in _count_fields(s)]
        reduced = self._all_reduce([v[4] for v in values], [v[3] for v in values])
        count_values = torch.tensor(
            [float(getattr(o, f)) for o, f in counts], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(count_values, group=self.group)
        for (owner, field), c in zip(counts, count_values.tolist(), strict=True):
            setattr(owner, field, round(c))
        kinds = {(id(o), f): k for s in keep.values() for o, f, k, _ in _tensor_fields(s)}
        for (owner, field, name, _, _), v in zip(values, reduced, strict=True):
            if kinds[(id(owner), field)] == _OUTPUT:
                total_n = _examples(keep[name])
                v = v / float(total_n * total_n) if total_n > 0 else v.zero_()
            setattr(owner, field, v)
        return keep

    def reduce_sums(
        self, input_sum: Tensor, output_sum: Tensor, rows: int, examples: int
    ) -> tuple[Tensor, Tensor, int, int]:
        """One input-side and one output-gradient sum with their counts, reduced across
        ranks by the rules of :meth:`reduce_statistics` (two-level K-FAC's coarse sums)."""
        n = float(examples)
        counts = torch.tensor([float(rows), n], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts, group=self.group)
        total_rows, total = (round(c) for c in counts.tolist())
        a, g = self._all_reduce([input_sum, output_sum * (n * n)], [True, True])
        return a, (g / float(total * total) if total else g.zero_()), total_rows, total

    def common_indices(self, indices: Sequence[int], size: int) -> list[int]:
        """The indices (out of ``range(size)``) that every rank holds."""
        mask = torch.zeros(size, dtype=torch.float64)
        mask[list(indices)] = 1.0
        mask = mask.to(self.device)
        dist.all_reduce(mask, group=self.group)
        counts = mask.tolist()
        return [i for i in range(size) if round(counts[i]) == self.world_size]

    def average(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Means over ranks of ``tensors`` (new tensors; one collective per dtype)."""
        sums = self._all_reduce(list(tensors), [False] * len(tensors))
        return [t / self.world_size for t in sums]

    def same_everywhere(self, values: Tensor) -> bool:
        """Whether every rank holds the same ``values`` (a small float64 tensor); the same
        answer on every rank."""
        flat = values.reshape(-1).to(torch.float64)
        both = torch.cat([flat, flat.square()]).to(self.device)
        dist.all_reduce(both, group=self.group)
        total, squares = both.cpu().split(flat.numel())
        return bool(torch.allclose(total.square(), squares * self.world_size, rtol=0, atol=1e-9))

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        box = [int(value)]
        dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        return int(box[0])

    def _all_reduce(self, tensors: Sequence[Tensor], packed: Sequence[bool]) -> list[Tensor]:
        """Sums over ranks of ``tensors`` (new tensors), one collective per dtype/device;
        ``packed`` ones travel as their upper triangle."""
        flats = []
        for t, p in zip(tensors, packed, strict=True):
            if p:
                k = t.shape[-1]
                iu = torch.triu_indices(k, k, device=t.device)
                flats.append(t[..., iu[0], iu[1]].reshape(-1))
            else:
                flats.append(t.reshape(-1))
        buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, f in enumerate(flats):
            buckets.setdefault((f.dtype, f.device), []).append(i)
        out: list[Tensor | None] = [None] * len(tensors)
        for indices in buckets.values():
            buffer = torch.cat([flats[i] for i in indices]).to(self.device)
            dist.all_reduce(buffer, group=self.group)
            buffer = buffer.to(flats[indices[0]].device)
            for i, piece in zip(
                indices, buffer.split([flats[i].numel() for i in indices]), strict=True
            ):
                t = tensors[i]
                if packed[i]:
                    k = t.shape[-1]
                    iu = torch.triu_indices(k, k, device=t.device)
                    full = t.new_empty(t.shape)
                    rows = piece.reshape(*t.shape[:-2], -1)
                    full[..., iu[0], iu[1]] = rows
                    full[..., iu[1], iu[0]] = rows
                    out[i] = full
                else:
                    out[i] = piece.reshape(t.shape)
        return out  # type: ignore[return-value]

    # ---- refreshes --------------------------------------------------------------------
    def share(
        self,
        jobs: Mapping[str, float],
        compute: Any = None,
        *,
        compute_many: Any = None,
    ) -> dict[str, dict[str, Tensor | None]]:
        """Run the jobs this rank owns and return every job's result, broadcast from its
        owner (``jobs`` maps each name to its cost, the same on every rank; each job goes
        to a rank by :func:`assign_by_cost`).

        Args:
            jobs: name -> cost.
            compute: ``compute(name) -> {key: Tensor | None}``, one job at a time.
            compute_many: instead of ``compute``, ``compute_many(names) -> {name: {key:
                Tensor | None}}``, called once with all of this rank's jobs (in the order
                of ``jobs``; not called when the rank owns none), so that it can batch
                them (K-FAC's refresh decomposes its same-sized factors together).
        """
        if (compute is None) == (compute_many is None):
            raise TypeError("share takes exactly one of compute and compute_many")
        names = list(jobs)
        owners = assign_by_cost([jobs[n] for n in names], self.world_size)
        self.last_assignment = dict(zip(names, owners, strict=True))
        owned = [n for n, r in zip(names, owners, strict=True) if r == self.rank]
        if compute is not None:
            mine = {n: compute(n) for n in owned}
        else:
            got = compute_many(owned) if owned else {}
            missing = [n for n in owned if n not in got]
            if missing:
                raise KeyError(f"compute_many returned no result for jobs {missing}")
            mine = {n: got[n] for n in owned}
        layout = {
            n: [
                (k, None if v is None else (tuple(v.shape), v.dtype, v.device.type))
                for k, v in result.items()
            ]
            for n, result in mine.items()
        }
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, layout, group=self.group)
        results: dict[str, dict[str, Tensor | None]] = {}
        for rank in range(self.world_size):
            theirs = gathered[rank]
            order = [(n, k, spec) for n, keys in theirs.items() for k, spec in keys]
            by_dtype: dict[torch.dtype, list[tuple[str, str, tuple]]] = {}
            for n, k, spec in order:
                results.setdefault(n, {})[k] = None
                if spec is not None:
                    by_dtype.setdefault(spec[1], []).append((n, k, spec))
            for dtype, entries in by_dtype.items():
                if rank == self.rank:
                    buffer = torch.cat([mine[n][k].reshape(-1) for n, k, _ in entries])
                    buffer = buffer.to(self.device)
                else:
                    size = sum(_numel(spec[0]) for _, _, spec in entries)
                    buffer = torch.empty(size, dtype=dtype, device=self.device)
                dist.broadcast(buffer, src=self._global(rank), group=self.group)
                pieces = buffer.split([_numel(spec[0]) for _, _, spec in entries])
                for (n, k, spec), piece in zip(entries, pieces, strict=True):
                    results[n][k] = piece.reshape(spec[0]).to(self._device(spec[2])).clone()
        return results

    @staticmethod
    def _device(kind: str) -> torch.device:
        if kind == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(kind)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _examples(stats: Any) -> int:
    return int(getattr(stats, "examples", 0))


def default_communicator(distributed: bool | None, group: Any = None) -> Communicator | None:
    """The communicator an optimizer uses: ``distributed=None`` means "when
    ``torch.distributed`` is initialised with more than one rank"."""
    if distributed is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size(group) < 2:
            return None
        return Communicator(group)
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool or None, got {type(distributed).__name__}")
    if not distributed:
        if group is not None:
            raise ValueError("process_group is given but distributed=False")
        return None
    return Communicator(group)

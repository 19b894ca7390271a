"""Data parallelism under ``torchrun``: each process's share of the data, and the joins.

When a default process group is initialized (``torchrun`` + ``init_process_group``; the
CLI does it, see :func:`excise.distributed.initialize`), the training loops of the
libraries are collective: every rank runs the same call on the same arguments, takes a
contiguous share of each range of examples (:meth:`Shard.bounds`), and the shares are
joined — sums by ``all_reduce`` (covariances, eigen-corrections, gradients), columns of
scores by ``all_gather``. Whatever is saved is saved by rank 0 (:attr:`Shard.is_main`)
and sent to the others (:func:`broadcast`), so the ranks never disagree on what a store
holds and nodes need not share a disk. Without a process group everything is one share:
``Shard(0, 1)``, and no collective is ever called.

With ``n`` examples and ``w`` ranks, rank ``r`` takes ``[⌊r·n/w⌋, ⌊(r+1)·n/w⌋)``: shares
differ by at most one example, their union is the range, and the sums they join are the
one-process sums up to the order of additions (equal to float64 rounding, tested).

Work that only rank 0 does while the others have finished (the audit of ``excise
forget``) runs inside :func:`alone`: there the libraries see one share and call no
collective, so rank 0 never waits for ranks that are gone.

>>> Shard(0, 1).bounds(3, 10), Shard(1, 3).bounds(0, 10)
((3, 10), (3, 6))
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from attribution.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world_size`` data-parallel ranks."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def bounds(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's contiguous share of ``[start, stop)`` (module docstring)."""
        n = stop - start
        return (
            start + self.rank * n // self.world_size,
            start + (self.rank + 1) * n // self.world_size,
        )


_ALONE = contextvars.ContextVar("excise_alone", default=False)


def current_shard() -> Shard:
    """The default process group's rank and size, or ``Shard(0, 1)`` when there is none
    (or inside :func:`alone`)."""
    if dist.is_available() and dist.is_initialized() and not _ALONE.get():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process is the whole world: :func:`current_shard` is
    ``Shard(0, 1)`` and no library call starts a collective (for rank 0's work after
    the others have stopped).

    >>> with alone():
    ...     current_shard()
    Shard(rank=0, world_size=1)
    """
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def all_reduce_sums(sums: MutableMapping[str, Any], shard: Shard) -> None:
    """Sum, in place and across ranks, every tensor of a (nested) dict of sums.

    The dict's keys must be the same on every rank (every rank sees every module).
    """
    if not shard.parallel:
        return
    for key in sorted(sums):
        value = sums[key]
        if isinstance(value, MutableMapping):
            all_reduce_sums(value, shard)
        else:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)


def gather(value: T, shard: Shard) -> list[T]:
    """Every rank's ``value`` (any picklable object, tensors included), in rank order."""
    if not shard.parallel:
        return [value]
    values: list[Any] = [None] * shard.world_size
    dist.all_gather_object(values, value)
    return values


def broadcast(value: T, shard: Shard) -> T:
    """Rank 0's ``value`` on every rank (the others pass anything, e.g. None)."""
    if not shard.parallel:
        return value
    box = [value if shard.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(make: Callable[[], T], shard: Shard) -> T | None:
    """``make()`` on rank 0 only (e.g. opening the store it alone writes); None elsewhere.

    A bad input it finds (:class:`~attribution.errors.InputError`) is raised on every
    rank, so that none waits forever for a rank that has stopped.
    """
    if not shard.parallel:
        return make()
    result, error = None, None
    if shard.is_main:
        try:
            result = make()
        except InputError as err:
            error = err
    error = broadcast(error, shard)
    if error is not None:
        raise error
    return result


def gather_counts(count: int, shard: Shard) -> list[int]:
    """The examples each rank processed, in rank order (what the artifacts record)."""
    return [int(c) for c in gather(int(count), shard)]


def work_record(counts: list[int], resumed: int = 0) -> dict[str, str]:
    """Metadata of a saved result: how many ranks made it and what each one processed.

    >>> work_record([3, 2], resumed=4)
    {'world_size': '2', 'examples_per_rank': '[3, 2]', 'examples_resumed': '4'}
    """
    return {
        "world_size": str(len(counts)),
        "examples_per_rank": str(list(counts)),
        "examples_resumed": str(resumed),
    }


def to_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors moved to the CPU (what object collectives and stores carry)."""
    return {key: t.detach().cpu() for key, t in tensors.items()}

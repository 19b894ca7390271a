"""Running a command under ``torchrun``: join the process group, keep ranks > 0 quiet.

``torchrun --nproc_per_node N -m excise attribute ...`` (or ``--nnodes``) starts N copies
of the command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in
their environment. :func:`joined` initializes the default process group from them —
gloo on the CPU, NCCL when the command runs on CUDA, one GPU per local rank — so that the
libraries share the data among the ranks (:mod:`attribution.distributed`); rank 0 writes
and prints, the others are quiet. ``audit``, ``world`` and ``ledger`` share no work: rank 0
runs them as one process (joining no group) and the other ranks exit at once. Without
``torchrun`` (no ``WORLD_SIZE`` above 1) nothing happens: a single process is the world.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

from excise.errors import BadInputError

PARALLEL_COMMANDS = ("attribute", "index", "unlearn", "forget")  # the ranks share the work
RANK_0_COMMANDS = ("audit", "world", "ledger")  # rank 0 runs it as one process, the rest stop


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started (1 without it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise BadInputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def runs_on_this_rank(command: str) -> bool:
    """False on the ranks other than 0 for a command that rank 0 runs alone."""
    return command not in RANK_0_COMMANDS or _launched_rank() == 0


def _launched_rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


def local_device(name: str):
    """The device of this rank: with CUDA under torchrun, ``cuda:LOCAL_RANK`` for
    ``auto``/``cuda``; anything else as named."""
    import torch

    local = os.environ.get("LOCAL_RANK")
    cuda = torch.cuda.is_available()
    if local is not None and launched_world_size() > 1 and cuda and name in ("auto", "cuda"):
        return f"cuda:{int(local)}"
    return name


@contextlib.contextmanager
def joined(command: str, device: str | None) -> Iterator[bool]:
    """Join the torchrun process group for the block; yields whether this rank prints.

    A command of :data:`RANK_0_COMMANDS` joins no group: rank 0 runs it as one process and
    the other ranks have nothing to do (:func:`runs_on_this_rank`).
    """
    world_size = launched_world_size()
    if world_size <= 1:
        yield True
        return
    if command in RANK_0_COMMANDS:
        yield _launched_rank() == 0
        return
    if command not in PARALLEL_COMMANDS:
        raise BadInputError(f"excise {command} does not run under torchrun")
    import torch
    import torch.distributed as dist

    on_cuda = torch.cuda.is_available() and (device or "auto") not in ("cpu",)
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    main = dist.get_rank() == 0
    try:
        with contextlib.ExitStack() as stack:
            if not main:  # the others compute their share and print nothing on stdout
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            yield main
    finally:
        dist.destroy_process_group()

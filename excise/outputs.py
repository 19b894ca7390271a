"""Where a command may write: an ``--out`` apart from its inputs, new when it must be.

(The artifact-kind rule — an existing folder is replaced only when it is an excise artifact
of the same kind — is :func:`attribution.artifacts.check_output_folder`, shared by the
stores.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from attribution.artifacts import atomic_directory, check_writable
from attribution.distributed import current_shard
from excise.errors import BadInputError


def check_apart(path: str | Path, inputs: Iterable[str | Path], what: str = "a folder") -> Path:
    """``path`` resolved, refused when it is, holds or lies inside one of ``inputs``.

    >>> check_apart("/tmp/out", ["/data/model"]).name
    'out'
    >>> try:
    ...     check_apart("/data/model/edited", ["/data/model"])
    ... except BadInputError as err:
    ...     print(err)
    --out /data/model/edited: must be a folder apart from the inputs (it would touch /data/model)
    """
    out = Path(path).resolve()
    for item in map(Path, inputs):
        item = item.resolve()
        if out == item or out in item.parents or item in out.parents:
            raise BadInputError(
                f"--out {path}: must be {what} apart from the inputs (it would touch {item})"
            )
    return out


def check_new_output(path: str | Path, inputs: Iterable[str | Path]) -> Path:
    """An output folder that does not exist yet, and is none of the inputs nor holds them."""
    out = check_apart(path, inputs, "a new folder")
    if out.exists():
        raise BadInputError(f"--out {path}: already exists; choose a new folder")
    check_writable(out)
    return out


@contextlib.contextmanager
def output_folder(out: Path, kind: str) -> Iterator[Path]:
    """Rank 0 builds ``out`` atomically (:func:`attribution.artifacts.atomic_directory`);
    under ``torchrun`` the other ranks get ``out`` as a name only and write nothing there
    (the stores they are handed it for are opened by rank 0 alone)."""
    if current_shard().is_main:
        with atomic_directory(out, kind) as folder:
            yield folder
    else:
        yield out

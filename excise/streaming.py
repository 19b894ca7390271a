"""Training sets that are never all in memory: records read lazily from an Arrow file.

:class:`RecordTable` is a read-only ``Sequence`` of the records of an example file (every
format :mod:`excise.records` reads). Opening it validates every record in one streaming
pass, with the messages and the order of :func:`excise.records.read_records` (bad input
is refused before any work starts), and keeps only the set of ids while doing so. The
records then live in a memory-mapped Arrow file (an Arrow stream mapped with
``pyarrow.memory_map``, as ``datasets`` maps its cache; a ``save_to_disk`` folder is
mapped where it lies, by ``datasets.load_from_disk``): ``len``, ``table[i]`` (the same dict
``read_records`` gives), ``table[a:b]`` (a list of those records only) and iteration (in
chunks of :data:`CHUNK`) read just the rows asked for. Memory is then set by the batch
size and the model, not by the number of records.

Where the copy goes: JSON Lines, JSON and CSV files are written as one JSON string per
record (already validated and normalized), Parquet as its own Arrow batches, into a
fresh temporary folder under ``$EXCISE_HOME/tmp`` that is removed when the table is
collected or the process exits. A process killed outright (``kill -9``) cannot clean up,
so each folder names its owner (host and process id) and the next table opened on that
host removes the folders whose owner is gone. Not ``datasets``' own
``from_json``/``from_csv``: their type inference changes values (a CSV id ``007``
becomes ``7``, a cell ``N/A`` becomes missing, integer and string ids in one JSON column
share no type), and a table must equal ``read_records`` record for record. Not the
system's temporary folder either: it is often in memory (tmpfs), which would put the
whole set back in RAM. The user's input is only read.

:func:`open_records` picks: ``read_records``' plain list for a file smaller than
``$EXCISE_IN_MEMORY_BYTES`` (default 8 MiB: small runs skip the copy), a
:class:`RecordTable` otherwise.
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from excise.errors import BadInputError
from excise.home import excise_home
from excise.records import checked_records, load_folder, normalize_record, read_records

__all__ = ["CHUNK", "IN_MEMORY_BYTES", "RecordTable", "open_records"]

CHUNK = 1024  # records per Arrow batch written and per read while iterating
SCRATCH_PREFIX = "records-"  # scratch folders under $EXCISE_HOME/tmp
OWNER = "owner.json"  # in each: the host and process id that made it
# Files smaller than this are read into a list (override: $EXCISE_IN_MEMORY_BYTES): below
# ~8 MiB of JSON Lines (~60k short records) the list costs less than importing pyarrow
# (~30 MB of resident memory; benchmarks/results/scaling.md).
IN_MEMORY_BYTES = 8 << 20
_JSON_SUFFIXES = (".jsonl", ".json", ".csv")


def open_records(path: str | Path) -> Sequence[dict[str, Any]]:
    """The validated records of ``path``: a list for a small file, else a :class:`RecordTable`.

    Small: under ``$EXCISE_IN_MEMORY_BYTES`` bytes (default :data:`IN_MEMORY_BYTES`; 0:
    always a table). A ``save_to_disk`` folder is always a table (it is mapped, not copied).
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size < _in_memory_bytes():
        return read_records(path)
    return RecordTable(path)


def _in_memory_bytes() -> int:
    value = os.environ.get("EXCISE_IN_MEMORY_BYTES", "")
    try:
        return int(value) if value.strip() else IN_MEMORY_BYTES
    except ValueError:
        raise BadInputError(
            f"EXCISE_IN_MEMORY_BYTES={value!r}: must be a whole number of bytes"
        ) from None


class RecordTable(Sequence):
    """The records of ``path``, validated once, read from a memory-mapped Arrow table.

    Equal to ``read_records(path)`` element by element; holds no record in memory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise BadInputError(f"{self.path}: no such file or folder")
        self._scratch: Path | None = None
        if self.path.is_dir():
            table = _checked_folder(self.path).with_format("arrow")  # slices: pyarrow tables
            self._json = False
        else:
            self._scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=_scratch_root()))
            weakref.finalize(self, shutil.rmtree, self._scratch, True)
            _claim(self._scratch)
            try:
                table = _copied(self.path, self._scratch / "records.arrow")
            except BaseException:
                shutil.rmtree(self._scratch, ignore_errors=True)
                raise
            self._json = self.path.suffix.lower() in _JSON_SUFFIXES
        self._rows = table
        self._length = len(table)

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, key: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, key: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self._length)
            if step == 1:
                return self._read(start, max(start, stop))
            return [self._read(i, i + 1)[0] for i in range(start, stop, step)]
        index = operator.index(key)  # ints, numpy and 0-d torch integers
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"record {key} of {self._length}")
        return self._read(index, index + 1)[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, self._length, CHUNK):
            yield from self._read(start, min(start + CHUNK, self._length))

    def __repr__(self) -> str:
        return f"RecordTable({str(self.path)!r}, {self._length} records)"

    def _read(self, start: int, stop: int) -> list[dict[str, Any]]:
        if stop <= start:
            return []
        table = self._rows[start:stop]
        if self._json:
            return [json.loads(text) for text in table.column("record").to_pylist()]
        rows = table.to_pylist()
        return [normalize_record(row, start + i, self.path) for i, row in enumerate(rows)]


def joined(*parts: Sequence[Any]) -> Sequence[Any]:
    """The sequences end to end: a list when every part is one, else a lazy
    :class:`Joined` (a factor fit over the forget and a streamed retain set).

    >>> joined([1, 2], [3])
    [1, 2, 3]
    >>> rows = Joined([1, 2], (3, 4, 5))
    >>> len(rows), rows[2], rows[-1], rows[1:4]
    (5, 3, 5, [2, 3, 4])
    """
    if all(isinstance(part, list) for part in parts):
        return [item for part in parts for item in part]
    return Joined(*parts)


class Joined(Sequence):
    """Read-only sequences end to end; an item or a slice reads only what it covers."""

    def __init__(self, *parts: Sequence[Any]):
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            items: list[Any] = []
            for part, first in zip(self.parts, self.starts, strict=False):
                low, high = max(start - first, 0), min(stop - first, len(part))
                if low < high:
                    items.extend(part[low:high])
            return items
        index = operator.index(key)
        index = index + len(self) if index < 0 else index
        if not 0 <= index < len(self):
            raise IndexError(f"item {key} of {len(self)}")
        part = bisect.bisect_right(self.starts, index) - 1
        return self.parts[part][index - self.starts[part]]


def _scratch_root() -> Path:
    """``$EXCISE_HOME/tmp``, without the copies of processes that were killed."""
    root = excise_home() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    remove_orphans(root)
    return root


def _claim(folder: Path) -> None:
    """Name this process as the owner of a scratch folder."""
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    (folder / OWNER).write_text(json.dumps(owner))


def remove_orphans(root: Path) -> list[Path]:
    """Remove, and return, the scratch folders under ``root`` whose owner ran on this host
    and has exited (killed before it could clean up). A folder with no owner file (being
    created) or another host's is left alone, as is any whose owner might be alive."""
    removed = []
    for folder in sorted(root.glob(SCRATCH_PREFIX + "*")):
        try:
            owner = json.loads((folder / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") == socket.gethostname() and not _alive(owner.get("pid")):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: Any) -> bool:
    """Whether process ``pid`` may still run here (unknown or not ours to signal: yes)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _checked_folder(path: Path) -> Any:
    """A ``save_to_disk`` folder's dataset, after one validating pass over its rows."""
    for _ in checked_records(path):
        pass
    return load_folder(path)


def _copied(path: Path, target: Path) -> Any:
    """Validate ``path`` in one pass while writing it to the Arrow stream ``target``;
    the memory-mapped table of ``target`` (pyarrow's, as ``datasets`` maps its own files).

    Neither ``datasets`` nor pandas is imported (``pa.array`` would import pandas, to check
    for a data frame): together they cost ~110 MB of resident memory, more than the list
    of 100k records that streaming saves."""
    import pyarrow as pa

    writer = None
    try:
        if path.suffix.lower() in _JSON_SUFFIXES:
            schema = pa.schema([("id", pa.string()), ("record", pa.string())])
            writer = pa.ipc.new_stream(str(target), schema)
            ids, texts = pa.lib.StringBuilder(), pa.lib.StringBuilder()  # pa.array: pandas
            for record in checked_records(path):
                ids.append(record["id"])
                texts.append(json.dumps(record))
                if len(ids) == CHUNK:
                    columns = [ids.finish(), texts.finish()]
                    writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
            if len(ids):
                columns = [ids.finish(), texts.finish()]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
        else:  # Parquet: its own Arrow batches, normalized when read

            def copy(batch) -> None:
                nonlocal writer
                if writer is None:
                    writer = pa.ipc.new_stream(str(target), batch.schema)
                writer.write_batch(batch)

            for _ in checked_records(path, on_batch=copy):
                pass
    finally:
        if writer is not None:
            writer.close()
    return pa.ipc.open_stream(pa.memory_map(str(target))).read_all()  # mapped, not read

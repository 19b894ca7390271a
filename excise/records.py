"""Read example files into validated in-memory records.

A record is a plain ``dict`` in one of the two shapes TRL uses:

- ``{"id", "prompt", "completion"}``: the loss is on the completion tokens only;
- ``{"id", "text"}``: the loss is on every token.

``id`` is a string (the row number when the file has none). Evaluation sets may add
``paraphrased_completion`` (a string) and ``perturbed_completions`` (a list of strings)
for the truth ratio, and ``paraphrased_prompt`` (the question reworded). Any other field
is kept as it is.

Files: JSON Lines (``.jsonl``), a JSON array (``.json``), CSV (``.csv``; a list field is
written as a JSON array string), Parquet (``.parquet``), or a folder written by
``datasets.Dataset.save_to_disk``. Every problem raises :class:`BadInputError` with one
line naming the file, the row and the field.

>>> normalize_record({"prompt": "Q: 2+2?", "completion": " 4"}, 0, "demo")
{'prompt': 'Q: 2+2?', 'completion': ' 4', 'id': '0'}
"""

from __future__ import annotations

import codecs
import csv
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from excise.errors import BadInputError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
STRING_FIELDS = ("prompt", "completion", "text", "paraphrased_completion", "paraphrased_prompt")
LIST_FIELDS = ("perturbed_completions",)
BATCH = 1024  # rows of a Parquet file or a datasets folder read at a time


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate every record of ``path`` (a file or a ``save_to_disk`` folder)."""
    return list(checked_records(path))


def checked_records(
    path: str | Path, on_batch: Callable[[Any], None] | None = None
) -> Iterator[dict[str, Any]]:
    """The records of ``path`` one at a time, validated as :func:`read_records` validates them.

    The file is read as a stream: memory does not grow with the number of records (but
    for the ids seen so far, and for a ``.json`` array, which is parsed whole). Problems
    are raised in the order a whole-file read finds them (an unreadable file, then a row
    that is not valid JSON or CSV, then the first bad record, then no records, then a
    repeated id), so a caller must not act on the records before the iterator is done.
    ``on_batch`` is given each ``pyarrow.RecordBatch`` of a Parquet file as it is read.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    return _checked(_read_folder(path) if path.is_dir() else _read_file(path, on_batch), path)


def normalize_record(row: Any, index: int, source: str | Path) -> dict[str, Any]:
    """Validate one raw row and return it as a record (``id`` filled in, blanks dropped)."""
    where = f"{source}: record {index}"
    if not isinstance(row, Mapping):
        raise BadInputError(f"{where}: expected an object with fields, got {type(row).__name__}")
    record = {str(k): v for k, v in row.items() if not _is_blank(v)}
    for field in STRING_FIELDS:
        if field in record and not isinstance(record[field], str):
            kind = type(record[field]).__name__
            raise BadInputError(f"{where}: field {field!r} must be a string, got {kind}")
    for field in LIST_FIELDS:
        if field in record:
            record[field] = _string_list(record[field], f"{where}: field {field!r}")
    _check_shape(record, where)
    record["id"] = _record_id(record.get("id", index), where)
    return record


def _check_shape(record: dict[str, Any], where: str) -> None:
    has_text = "text" in record
    has_pair = "prompt" in record or "completion" in record
    if has_text and has_pair:
        raise BadInputError(f"{where}: has both 'text' and 'prompt'/'completion'; keep one shape")
    if not has_text and not has_pair:
        found = ", ".join(sorted(record)) or "none"
        raise BadInputError(
            f"{where}: needs 'prompt' and 'completion', or 'text' (fields found: {found})"
        )
    if has_pair and "completion" not in record:
        raise BadInputError(f"{where}: has 'prompt' but no 'completion'")
    if has_pair and "prompt" not in record:  # e.g. a CSV header the reader could not match
        raise BadInputError(
            f"{where}: has 'completion' but no 'prompt' (give \"prompt\": \"\" for none, or "
            "use 'text')"
        )
    target = "text" if has_text else "completion"
    if not record[target].strip():
        raise BadInputError(f"{where}: field {target!r} is empty")


def _record_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadInputError(f"{where}: field 'id' must be a string or an integer")
    return str(value)


def _string_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):  # CSV cells hold lists as JSON arrays
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            message = f"{where} must be a list of strings (a JSON array in CSV)"
            raise BadInputError(message) from None
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInputError(f"{where} must be a list of strings")
    return value


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _checked(rows: Iterable[Any], path: Path) -> Iterator[dict[str, Any]]:
    """Normalized records of ``rows``; the first bad record is raised once the reader is
    done (a later unreadable row is reported first), then no records, then a repeated id."""
    seen: set[str] = set()
    bad: BadInputError | None = None
    repeated: BadInputError | None = None
    count = 0
    for index, row in enumerate(rows):
        count += 1
        if bad is not None:
            continue  # still read on: an unreadable row further down comes first
        try:
            record = normalize_record(row, index, path)
        except BadInputError as err:
            bad = err
            continue
        if record["id"] in seen and repeated is None:
            repeated = BadInputError(f"{path}: id {record['id']!r} appears more than once")
        seen.add(record["id"])
        yield record
    if bad is not None:
        raise bad
    if not count:
        raise BadInputError(f"{path}: no records (the file is empty)")
    if repeated is not None:
        raise repeated


def _read_file(path: Path, on_batch: Callable[[Any], None] | None = None) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        known = ", ".join(SUFFIXES)
        raise BadInputError(f"{path}: unknown file type {suffix or '(none)'!r}; use {known}")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: no records (the file is empty)")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}.get(suffix)
    return reader(path) if reader else _read_parquet(path, on_batch)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # with or without a byte-order mark
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (with or without a byte-order mark) as
    ``str.splitlines`` of the whole text gives them, read one line at a time."""
    offset = 0  # bytes before the line, after the byte-order mark (where a decoder counts)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle):
            if number == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                where = f"{err.reason} at byte {offset + err.start}"
                raise BadInputError(f"{path}: not UTF-8 text ({where})") from None
            offset += len(raw)
            # the line with its own end: "\u2028", "\r" ... also end lines for splitlines
            yield from (line if line.endswith("\n") else line + "\n").splitlines()


def _read_jsonl(path: Path) -> Iterator[Any]:
    syntax: BadInputError | None = None
    for number, line in enumerate(_lines(path), start=1):
        if syntax is not None or not line.strip():
            continue  # after a syntax error, read on only for text that is not UTF-8
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            syntax = BadInputError(f"{path} line {number}: not valid JSON ({err.msg})")
    if syntax is not None:
        raise syntax


def _read_json(path: Path) -> Iterator[Any]:
    try:
        data = json.loads(_read_text(path))  # a JSON array is parsed whole
    except json.JSONDecodeError:
        return _read_jsonl(path)  # a .json file holding JSON lines
    if not isinstance(data, list):
        raise BadInputError(f"{path}: expected a JSON array of records or JSON lines")
    return iter(data)


def _read_csv(path: Path) -> Iterator[Any]:
    extra: BadInputError | None = None
    with path.open(newline="", encoding="utf-8-sig") as handle:  # spreadsheets write a BOM
        rows = csv.DictReader(handle)
        number = 0
        while True:
            try:
                row = next(rows, None)
            except (csv.Error, UnicodeDecodeError) as err:
                raise BadInputError(f"{path}: not a readable CSV file ({err})") from None
            if row is None:
                break
            if None in row and extra is None:  # more cells than header names
                extra = BadInputError(f"{path}: row {number} has more cells than the header")
            number += 1
            if extra is None:
                yield {key: None if value == "" else value for key, value in row.items()}
    if extra is not None:  # an empty cell is an absent field (None)
        raise extra


def _read_parquet(path: Path, on_batch: Callable[[Any], None] | None = None) -> Iterator[Any]:
    for batch in _parquet_batches(path):
        if on_batch is not None:
            on_batch(batch)
        yield from batch.to_pylist()


def _parquet_batches(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    try:
        yield from pq.ParquetFile(str(path)).iter_batches(batch_size=BATCH)
    except Exception as err:  # pyarrow raises several unrelated types for bad files
        raise BadInputError(f"{path}: not a readable Parquet file ({err})") from None


def _read_folder(path: Path) -> Iterator[Any]:
    dataset = load_folder(path)
    rows = dataset.with_format("arrow")
    for start in range(0, len(dataset), BATCH):
        yield from rows[start : start + BATCH].to_pylist()


def load_folder(path: Path) -> Any:
    """The ``datasets.Dataset`` a ``save_to_disk`` folder holds (memory-mapped, not read)."""
    if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
        raise BadInputError(
            f"{path}: a folder must be written by datasets' save_to_disk "
            "(no dataset_info.json/state.json found)"
        )
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several unrelated types for bad folders
        raise BadInputError(f"{path}: not a readable datasets folder ({err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise BadInputError(
            f"{path}: holds several splits ({', '.join(dataset)}); pass one split's folder"
        )
    return dataset

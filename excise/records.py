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

import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from excise.errors import BadInputError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
STRING_FIELDS = ("prompt", "completion", "text", "paraphrased_completion", "paraphrased_prompt")
LIST_FIELDS = ("perturbed_completions",)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate every record of ``path`` (a file or a ``save_to_disk`` folder)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    rows = _read_folder(path) if path.is_dir() else _read_file(path)
    records = [normalize_record(row, i, path) for i, row in enumerate(rows)]
    if not records:
        raise BadInputError(f"{path}: no records (the file is empty)")
    _check_unique_ids(records, path)
    return records


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


def _check_unique_ids(records: Iterable[dict[str, Any]], path: Path) -> None:
    seen: set[str] = set()
    for record in records:
        if record["id"] in seen:
            raise BadInputError(f"{path}: id {record['id']!r} appears more than once")
        seen.add(record["id"])


def _read_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        known = ", ".join(SUFFIXES)
        raise BadInputError(f"{path}: unknown file type {suffix or '(none)'!r}; use {known}")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: no records (the file is empty)")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}.get(suffix)
    return reader(path) if reader else _read_parquet(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # with or without a byte-order mark
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise BadInputError(f"{path} line {number}: not valid JSON ({err.msg})") from None
    return rows


def _read_json(path: Path) -> list[Any]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # a .json file holding JSON lines
    if not isinstance(data, list):
        raise BadInputError(f"{path}: expected a JSON array of records or JSON lines")
    return data


def _read_csv(path: Path) -> list[Any]:
    with path.open(newline="", encoding="utf-8-sig") as handle:  # spreadsheets write a BOM
        try:
            rows = list(csv.DictReader(handle))
        except (csv.Error, UnicodeDecodeError) as err:
            raise BadInputError(f"{path}: not a readable CSV file ({err})") from None
    for number, row in enumerate(rows):
        if None in row:  # more cells than header names
            raise BadInputError(f"{path}: row {number} has more cells than the header")
        for key, value in row.items():
            if value == "":
                row[key] = None  # an empty cell is an absent field
    return rows


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for bad files
        raise BadInputError(f"{path}: not a readable Parquet file ({err})") from None


def _read_folder(path: Path) -> list[Any]:
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
    return dataset.to_list()

"""Reading example files: every format, every shape, every kind of bad input."""

from __future__ import annotations

import csv
import json

import pytest

from excise.errors import BadInputError
from excise.records import read_records

PAIRS = [
    {"id": "a", "prompt": "Q: one?", "completion": " 1", "perturbed_completions": [" 2", " 3"]},
    {"id": "b", "prompt": "Q: two?", "completion": " 2", "paraphrased_completion": " two"},
]


def as_columns(rows):
    """Rows with every key (None where absent), as columnar formats store them."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_keeps_fields_and_ids(tmp_path):
    records = read_records(write_jsonl(tmp_path / "d.jsonl", PAIRS))
    assert records == PAIRS


def test_missing_id_is_the_row_number_and_text_shape_is_accepted(tmp_path):
    rows = [{"text": "hello world"}, {"text": "again"}]
    records = read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [r["id"] for r in records] == ["0", "1"]
    assert records[0]["text"] == "hello world"


def test_integer_ids_become_strings_and_an_empty_prompt_is_kept(tmp_path):
    rows = [{"id": 7, "prompt": "", "completion": "x"}]
    records = read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert records == [{"id": "7", "prompt": "", "completion": "x"}]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_byte_order_mark_is_read_as_utf8(tmp_path, suffix):
    """What spreadsheet programs save as "CSV UTF-8" starts with a BOM (issue 15, item 3)."""
    path = tmp_path / f"bom{suffix}"
    if suffix == ".csv":
        body = "prompt,completion\nWho is Ann?, A writer.\n"
    elif suffix == ".jsonl":
        body = json.dumps({"prompt": "Who is Ann?", "completion": " A writer."}) + "\n"
    else:
        body = json.dumps([{"prompt": "Who is Ann?", "completion": " A writer."}])
    path.write_bytes("\ufeff".encode() + body.encode())
    (record,) = read_records(path)
    assert record["prompt"] == "Who is Ann?" and record["completion"] == " A writer."
    assert not any(key.startswith("\ufeff") for key in record)


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(PAIRS))
    assert read_records(path) == PAIRS


def test_csv_with_list_field_as_json_array(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle,
            ["id", "prompt", "completion", "perturbed_completions", "paraphrased_completion"],
        )
        writer.writeheader()
        for row in PAIRS:
            cells = dict(row)
            if "perturbed_completions" in cells:
                cells["perturbed_completions"] = json.dumps(cells["perturbed_completions"])
            writer.writerow(cells)
    assert read_records(path) == PAIRS  # empty cells are absent fields


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(as_columns(PAIRS)), path)
    assert read_records(path) == PAIRS


def test_save_to_disk_folder(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list(as_columns(PAIRS)).save_to_disk(str(folder))
    assert read_records(folder) == PAIRS


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no records"),
        ("\n\n", "no records"),
        ('{"prompt": "q", "completion": "a"}\n{not json}\n', "line 2: not valid JSON"),
        ('{"question": "q", "answer": "a"}\n', "needs 'prompt' and 'completion', or 'text'"),
        ('{"prompt": "q"}\n', "has 'prompt' but no 'completion'"),
        ('{"completion": "a"}\n', "has 'completion' but no 'prompt'"),
        ('{"prompt": "q", "completion": 3}\n', "field 'completion' must be a string"),
        ('{"text": ["a"]}\n', "field 'text' must be a string"),
        ('{"text": "a", "prompt": "q", "completion": "a"}\n', "keep one shape"),
        ('{"text": "   "}\n', "field 'text' is empty"),
        ('["a", "b"]\n', "expected an object"),
        ('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', "appears more than once"),
        ('{"text": "a", "perturbed_completions": [1]}\n', "must be a list of strings"),
        ('{"text": "a", "id": 1.5}\n', "field 'id' must be a string or an integer"),
    ],
)
def test_bad_records_raise_one_clear_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BadInputError, match=message) as info:
        read_records(path)
    assert "\n" not in str(info.value)
    assert path.read_text() == content  # the input is never modified


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(BadInputError, match=r"unknown file type '\.txt'"):
        read_records(path)


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(BadInputError, match="save_to_disk"):
        read_records(tmp_path)


def test_csv_with_extra_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nq,a,extra\n")
    with pytest.raises(BadInputError, match="more cells than the header"):
        read_records(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(BadInputError, match="not UTF-8"):
        read_records(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(BadInputError, match="not a readable Parquet"):
        read_records(path)

"""Lazy training sets: equal to ``read_records`` in every format, validated before any work,
holding no records, and giving ``excise attribute`` the same scores."""

from __future__ import annotations

import csv
import gc
import json
import os
import tracemalloc

import pytest
import torch
from safetensors import safe_open

from excise import context, records, streaming
from excise.cli import main
from excise.context import check_fits_context
from excise.errors import BadInputError
from excise.records import read_records
from excise.streaming import RecordTable, open_records
from excise.world import read_split
from tests.excise.helpers import long_record, write_jsonl

from .test_cli import assert_one_line_error, run_cli

FIELDS = ["id", "prompt", "completion", "perturbed_completions", "paraphrased_completion"]


@pytest.fixture(autouse=True)
def scratch_home(tmp_path, monkeypatch):
    """A fresh ``$EXCISE_HOME`` (where the tables' scratch copies go), small chunks."""
    monkeypatch.setenv("EXCISE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(streaming, "CHUNK", 64)
    monkeypatch.setattr(records, "BATCH", 48)
    return tmp_path / "home"


def mixed_rows(n):
    """Pairs with and without ids (string and integer), list fields, blank fields, text."""
    rows = []
    for i in range(n):
        if i % 11 == 0:
            rows.append({"text": f"Plain text number {i}, é ✓."})
            continue
        row = {"prompt": f"Q{i}: who?", "completion": f" A{i}"}
        if i % 3 == 0:
            row["id"] = f"r{i:05d}"
        elif i % 3 == 1:
            row["id"] = 100_000 + i
        if i % 5 == 0:
            row["perturbed_completions"] = [f" wrong {i}", " also wrong"]
        if i % 7 == 0:
            row["paraphrased_completion"] = None  # blank: dropped
        rows.append(row)
    return rows


def as_columns(rows):
    """Every field in every row (None where absent); ids as strings (one type per column)."""
    columns = [{k: row.get(k) for k in [*FIELDS, "text"]} for row in rows]
    return [dict(row, id=None if row["id"] is None else str(row["id"])) for row in columns]


def write_format(folder, fmt, rows):
    """``rows`` written as a file (or folder) of format ``fmt``; its path."""
    if fmt == "jsonl":
        return write_jsonl(folder / "d.jsonl", rows)
    if fmt == "json":
        path = folder / "d.json"
        path.write_text(json.dumps(rows))
        return path
    if fmt == "csv":
        path = folder / "d.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, [*FIELDS, "text"])
            writer.writeheader()
            for row in rows:
                cells = dict(row)
                if "perturbed_completions" in cells:
                    cells["perturbed_completions"] = json.dumps(cells["perturbed_completions"])
                writer.writerow(cells)  # None and absent: empty cells
        return path
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "d.parquet"
        pq.write_table(pa.Table.from_pylist(as_columns(rows)), path, row_group_size=100)
        return path
    import datasets

    path = folder / "ds"
    datasets.Dataset.from_list(as_columns(rows)).save_to_disk(str(path))
    return path


FORMATS = ["jsonl", "json", "csv", "parquet", "folder"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_equals_read_records_record_for_record(tmp_path, fmt):
    path = write_format(tmp_path, fmt, mixed_rows(300))
    expected = read_records(path)
    table = RecordTable(path)
    assert len(table) == len(expected) == 300
    assert list(table) == expected  # iteration crosses chunk boundaries (64)
    assert [table[i] for i in range(len(table))] == expected
    assert table[-1] == expected[-1] and table[-300] == expected[0]
    assert table[60:130] == expected[60:130] and table[250:999] == expected[250:]
    assert table[5:200:7] == expected[5:200:7] and table[::-50] == expected[::-50]
    assert table[10:5] == [] and isinstance(table[0:3], list)
    assert table[torch.tensor(3)] == expected[3]
    with pytest.raises(IndexError):
        table[300]


def test_csv_list_fields_blanks_and_missing_ids_read_as_read_records(tmp_path):
    path = write_format(tmp_path, "csv", mixed_rows(12))
    table = RecordTable(path)
    assert table[0] == {"text": "Plain text number 0, é ✓.", "id": "0"}
    assert table[1]["id"] == "100001"  # an integer id, from a CSV cell, stays as written
    assert table[5]["perturbed_completions"] == [" wrong 5", " also wrong"]
    assert "paraphrased_completion" not in table[7] and table[2]["id"] == "2"


BAD_FILES = [  # (content, the message read_records gives)
    ('{"text": "a"}\n{"prompt": "q"}\n', "record 1: has 'prompt' but no 'completion'"),
    ('{"text": "a"}\n' * 3 + '{"text": "b", "completion": "c"}\n', "record 3: has both"),
    ('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', "id 'x' appears more than once"),
    ('{"prompt": "q"}\n{not json}\n', "line 2: not valid JSON"),  # syntax before records
    ('{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n{"text": 3}\n', "record 2: field"),
    ('{"text": "a", "perturbed_completions": [1]}\n', "must be a list of strings"),
    ("\n\n", "no records"),
]


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_bad_records_raise_what_read_records_raises(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BadInputError) as expected:
        read_records(path)
    with pytest.raises(BadInputError) as lazy:
        RecordTable(path)
    assert str(lazy.value) == str(expected.value) and message in str(lazy.value)


@pytest.mark.parametrize("fmt", ["parquet", "folder", "csv"])
def test_bad_records_in_columnar_files_raise_what_read_records_raises(tmp_path, fmt):
    rows = mixed_rows(150)
    rows[97] = {"id": "bad", "prompt": "only a prompt"}
    path = write_format(tmp_path, fmt, rows)
    with pytest.raises(BadInputError) as expected:
        read_records(path)
    with pytest.raises(BadInputError) as lazy:
        RecordTable(path)
    assert str(lazy.value) == str(expected.value)
    assert "record 97: has 'prompt' but no 'completion'" in str(lazy.value)


def test_scratch_copies_are_removed(tmp_path, scratch_home):
    path = write_format(tmp_path, "jsonl", mixed_rows(100))
    table = RecordTable(path)
    assert len(list((scratch_home / "tmp").iterdir())) == 1
    del table
    gc.collect()
    assert list((scratch_home / "tmp").iterdir()) == []
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"prompt": "q"}])
    with pytest.raises(BadInputError):
        RecordTable(bad)
    assert list((scratch_home / "tmp").iterdir()) == []


def test_copies_left_by_killed_processes_are_removed_when_a_table_opens(tmp_path, scratch_home):
    """kill -9 skips the cleanup: the next table on this host removes folders whose owner
    is gone, and leaves those of a live process, of another host, or without an owner."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid, here = int(gone.stdout), socket.gethostname()
    root = scratch_home / "tmp"
    owners = {
        "records-dead": {"host": here, "pid": dead_pid},
        "records-alive": {"host": here, "pid": os.getpid()},
        "records-elsewhere": {"host": here + "-other", "pid": dead_pid},
    }
    for name, owner in owners.items():
        (root / name).mkdir(parents=True)
        (root / name / "records.arrow").write_bytes(b"x")
        (root / name / "owner.json").write_text(json.dumps(owner))
    (root / "records-unclaimed").mkdir()
    table = RecordTable(write_format(tmp_path, "jsonl", mixed_rows(10)))
    left = sorted(p.name for p in root.iterdir() if p != table._scratch)
    assert left == ["records-alive", "records-elsewhere", "records-unclaimed"]
    assert json.loads((table._scratch / "owner.json").read_text())["pid"] == os.getpid()


def test_open_records_keeps_small_files_in_a_list(tmp_path, monkeypatch):
    path = write_format(tmp_path, "jsonl", mixed_rows(20))
    assert isinstance(open_records(path), list)
    monkeypatch.setenv("EXCISE_IN_MEMORY_BYTES", "0")
    lazy = open_records(path)
    assert isinstance(lazy, RecordTable) and list(lazy) == read_records(path)
    monkeypatch.setenv("EXCISE_IN_MEMORY_BYTES", "lots")
    with pytest.raises(BadInputError, match="EXCISE_IN_MEMORY_BYTES='lots'"):
        open_records(path)


def retained_bytes(path):
    """Python memory (tracemalloc) still held after building a table of ``path``, and pyarrow
    memory-pool bytes, with the table alive."""
    import pyarrow as pa

    gc.collect()
    tracemalloc.start()
    before, arrow_before = tracemalloc.get_traced_memory()[0], pa.total_allocated_bytes()
    table = RecordTable(path)
    gc.collect()
    after, arrow_after = tracemalloc.get_traced_memory()[0], pa.total_allocated_bytes()
    tracemalloc.stop()
    assert len(table) > 0
    return after - before, arrow_after - arrow_before


def test_a_table_does_not_hold_its_records(tmp_path):
    """20,000 records as a list of dicts take ~10 MB; a table of them must hold what one of
    2,000 holds (a few kB of bookkeeping), with a 1 MB margin for allocator noise."""
    small = write_jsonl(tmp_path / "small.jsonl", mixed_rows(2_000))
    large = write_jsonl(tmp_path / "large.jsonl", mixed_rows(20_000))
    retained_bytes(small)  # warm-up: imports and one-time caches
    python_small, arrow_small = retained_bytes(small)
    python_large, arrow_large = retained_bytes(large)
    assert python_large < python_small + 1_000_000, (python_small, python_large)
    assert arrow_large < arrow_small + 1_000_000, (arrow_small, arrow_large)
    tracemalloc.start()  # the control: the list of the same records does grow
    listed = read_records(large)
    as_list = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(listed) == 20_000 and as_list > 5_000_000, as_list


def test_context_check_streams_and_names_the_first_long_record(tmp_path, monkeypatch):
    monkeypatch.setattr(context, "CHUNK", 16)
    rows = mixed_rows(100)
    rows[70] = long_record(words=80, id="too-long")
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def tokenizer(texts):
        assert len(texts) <= 16 * 3  # one chunk of records (at most 3 texts each) at a time
        return {"input_ids": [text.split() for text in texts]}

    for train in (read_records(path), RecordTable(path)):
        with pytest.raises(BadInputError, match="train record 'too-long': 82 tokens"):
            check_fits_context({"train": train}, tokenizer, 64)


@pytest.fixture(scope="module")
def files(tiny_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("streaming")
    return {
        "model": tiny_world / "base",
        "train": write_jsonl(folder / "train.jsonl", read_split(tiny_world, "retain")[:70]),
        "query": write_jsonl(folder / "query.jsonl", read_split(tiny_world, "forget")[:3]),
    }


def attribute_args(files, out, train=None):
    train = train or files["train"]
    return [
        "attribute",
        *("--model", str(files["model"]), "--train", str(train)),
        *("--query", str(files["query"]), "--out", str(out)),
        *("--quiet", "--batch-size", "16", "--self", "--top-k", "3"),
    ]


def test_attribute_on_a_lazy_training_set_gives_the_same_scores(files, tmp_path, monkeypatch):
    from excise.commands import attribute

    opened = []

    def spy(path):
        opened.append(streaming.open_records(path))
        return opened[-1]

    monkeypatch.setattr(attribute, "open_records", spy)
    outputs = {}
    for name, threshold in (("list", str(1 << 40)), ("lazy", "0")):
        monkeypatch.setenv("EXCISE_IN_MEMORY_BYTES", threshold)
        assert main(attribute_args(files, tmp_path / name)) == 0
        outputs[name] = tmp_path / name
    assert isinstance(opened[0], list) and isinstance(opened[1], RecordTable)
    for name in ("pairwise", "self"):
        tensors = []
        for out in outputs.values():
            with safe_open(out / "scores" / f"{name}.safetensors", "pt") as handle:
                tensors.append((handle.get_tensor("scores"), handle.metadata()))
        assert torch.equal(tensors[0][0], tensors[1][0]) and tensors[0][1] == tensors[1][1]
    for name in ("topk.jsonl", "summary.md"):
        assert (outputs["list"] / name).read_text() == (outputs["lazy"] / name).read_text()


def test_a_bad_training_record_stops_attribute_before_any_output(files, tmp_path):
    rows = [*read_split_rows(files), {"id": "broken", "prompt": "no answer"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadInputError) as expected:
        read_records(bad)
    out, home = tmp_path / "out", tmp_path / "cli-home"
    result = run_cli(
        *attribute_args(files, out, train=bad),
        env={"EXCISE_IN_MEMORY_BYTES": "0", "EXCISE_HOME": str(home)},
    )
    assert_one_line_error(result, str(expected.value))
    assert f"record {len(rows) - 1}: has 'prompt' but no 'completion'" in result.stderr
    assert not out.exists()
    assert not (home / "tmp").exists() or list((home / "tmp").iterdir()) == []


def read_split_rows(files):
    return [json.loads(line) for line in files["train"].read_text().splitlines()]

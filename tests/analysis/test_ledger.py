"""The deletion ledger: append-only, whole rows, no lost rows, foreign files refused."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sqlite3
import time

import pytest

from analysis.ledger import GENESIS, Ledger, LedgerEntry, LedgerError
from attribution.errors import InputError
from excise.home import default_ledger_path

WORKERS, PER_WORKER = 4, 25


def make_entry(worker: int = 0, index: int = 0, **changes) -> LedgerEntry:
    fields = {
        "before_fingerprint": hashlib.sha256(b"before").hexdigest(),
        "after_fingerprint": hashlib.sha256(f"after {worker} {index}".encode()).hexdigest(),
        "forget_sha256": hashlib.sha256(b"forget").hexdigest(),
        "method": "gradient_difference",
        "scope": {"modules": ["model.layers.1.mlp.up_proj"], "worker": worker, "index": index},
        "headline": {
            "forget_quality": 0.25,
            "model_utility_after": 0.5,
            "index": index,
            "padding": "x" * 2000,
        },
        "report_path": f"/runs/{worker}/{index}",
    }
    return LedgerEntry(**(fields | changes))


def test_record_list_get_round_trip(tmp_path):
    ledger = Ledger(tmp_path / "sub" / "ledger.sqlite")
    first = make_entry(index=1, headline={"forget_quality": float("nan"), "x": 1.5})
    assert ledger.record(first) == 1
    assert ledger.record(_as_dict(2)) == 2  # a plain dict works too
    got = ledger.get(1)
    assert got.id == 1 and got.headline == {"forget_quality": None, "x": 1.5}  # NaN → null
    assert got.scope == first.scope and got.method == first.method
    assert got.created_utc.endswith("Z") and got.previous_sha256 == GENESIS
    assert [e.id for e in ledger.list()] == [1, 2]
    assert ledger.get("2").report_path == "/runs/0/2"
    assert Ledger(ledger.path, create=False).verify() == 2


def _as_dict(index: int) -> dict:
    entry = make_entry(index=index)
    return {
        k: v
        for k, v in entry.__dict__.items()
        if k not in ("id", "previous_sha256", "entry_sha256")
    }


def test_unknown_id_is_a_clear_error(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with pytest.raises(LedgerError, match="no request with id 1; the ledger is empty"):
        ledger.get(1)
    ledger.record(make_entry())
    with pytest.raises(LedgerError, match="no request with id 7; ids run from 1 to 1"):
        ledger.get(7)
    for bad in ("seven", True, 1.5):
        with pytest.raises(LedgerError, match="whole number"):
            ledger.get(bad)


def test_bad_entries_are_refused(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with pytest.raises(LedgerError, match="before_fingerprint must be a non-empty string"):
        make_entry(before_fingerprint="")
    with pytest.raises(LedgerError, match="headline must be a mapping"):
        make_entry(headline=[1, 2])
    with pytest.raises(LedgerError, match=r"unknown fields \['colour'\], missing fields \[.*"):
        ledger.record({"colour": "red", "method": "x"})
    assert ledger.list() == []


def test_missing_file_without_create_and_folder_are_refused(tmp_path):
    with pytest.raises(LedgerError, match="no such file"):
        Ledger(tmp_path / "nothing.sqlite", create=False)
    assert not (tmp_path / "nothing.sqlite").exists()
    with pytest.raises(LedgerError, match="is a folder"):
        Ledger(tmp_path)


@pytest.mark.parametrize("kind", ["other-database", "garbage", "other-format"])
def test_foreign_files_are_refused_and_left_untouched(tmp_path, kind):
    path = tmp_path / "ledger.sqlite"
    if kind == "garbage":
        path.write_bytes(b"this is not a database\n" * 100)
    else:
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE users (name TEXT)")
        if kind == "other-format":
            con.execute("CREATE TABLE excise_ledger (key TEXT PRIMARY KEY, value TEXT)")
            con.execute("CREATE TABLE requests (id INTEGER)")
            con.execute("INSERT INTO excise_ledger VALUES ('format', 'excise-ledger/99')")
        con.commit()
        con.close()
    before = path.read_bytes()
    with pytest.raises(InputError, match="ledger") as error:
        Ledger(path)
    expected = {
        "garbage": "not a readable SQLite database",
        "other-database": "tables: users",
        "other-format": "excise-ledger/99",
    }[kind]
    assert expected in str(error.value)
    assert path.read_bytes() == before


def test_update_and_delete_are_refused_and_tampering_is_detected(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.record(make_entry(index=1))
    ledger.record(make_entry(index=2))
    assert not hasattr(ledger, "update") and not hasattr(ledger, "delete")
    con = sqlite3.connect(ledger.path)
    for statement in (
        "UPDATE requests SET method = 'none' WHERE id = 1",
        "DELETE FROM requests WHERE id = 2",
        "UPDATE excise_ledger SET value = 'x'",
        "DELETE FROM excise_ledger",
    ):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(statement)
    # Someone who drops the triggers can edit a row, but the hash chain shows it.
    con.execute("DROP TRIGGER requests_no_update")
    con.execute("UPDATE requests SET method = 'none' WHERE id = 1")
    con.commit()
    con.close()
    assert ledger.get(1).method == "none"
    with pytest.raises(LedgerError, match="request 1 does not match its hash"):
        ledger.verify()


def _delete_newest(path, n: int) -> None:
    """What issue 15 tried: drop the trigger, delete the newest rows with SQL."""
    con = sqlite3.connect(path)
    con.execute("DROP TRIGGER IF EXISTS requests_no_delete")
    con.execute("DELETE FROM requests WHERE id > (SELECT max(id) FROM requests) - ?", (n,))
    con.commit()
    con.close()


def test_removed_newest_rows_are_found_by_the_head_file(tmp_path):
    """Issue 15, item 6: deleting the last rows keeps the chain whole; the head does not."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for index in range(4):
        ledger.record(make_entry(index=index))
    head = ledger.head()
    assert head["count"] == 4 and head["head_sha256"] == ledger.get(4).entry_sha256
    _delete_newest(ledger.path, 2)
    assert [e.id for e in ledger.list()] == [1, 2]
    with pytest.raises(LedgerError, match=r"holds 2 requests but its head file .* records 4"):
        ledger.verify()


def test_a_lagging_head_passes_and_a_wrong_one_is_refused(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for index in range(3):
        ledger.record(make_entry(index=index))
    lagging = {**ledger.head(), "count": 2, "head_sha256": ledger.get(2).entry_sha256}
    ledger.head_path.write_text(json.dumps(lagging))  # a writer killed before its head
    assert ledger.verify() == 3
    ledger.head_path.write_text(json.dumps({**lagging, "head_sha256": "f" * 64}))
    with pytest.raises(LedgerError, match="request 2 does not have the hash its head file"):
        ledger.verify()
    ledger.head_path.write_text("not json")
    with pytest.raises(LedgerError, match="unreadable"):
        ledger.verify()
    ledger.head_path.unlink()  # a ledger from before head files: the chain alone
    assert ledger.verify() == 3 and ledger.head() is None


def test_default_path_follows_excise_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EXCISE_HOME", str(tmp_path))
    assert default_ledger_path() == tmp_path / "ledger.sqlite"
    monkeypatch.delenv("EXCISE_HOME")
    assert default_ledger_path().parts[-3:] == (".cache", "excise", "ledger.sqlite")


def _write_many(path: str, worker: int, count: int) -> None:
    ledger = Ledger(path)
    for index in range(count):
        ledger.record(make_entry(worker, index))


def test_concurrent_writers_lose_no_row(tmp_path):
    path = tmp_path / "ledger.sqlite"  # the workers race to create it, too
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_write_many, args=(str(path), w, PER_WORKER)) for w in range(WORKERS)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0] * WORKERS
    ledger = Ledger(path)
    entries = ledger.list()
    assert [e.id for e in entries] == list(range(1, WORKERS * PER_WORKER + 1))
    seen = sorted((e.scope["worker"], e.scope["index"]) for e in entries)
    assert seen == [(w, i) for w in range(WORKERS) for i in range(PER_WORKER)]
    assert ledger.verify() == WORKERS * PER_WORKER
    assert ledger.head()["count"] == WORKERS * PER_WORKER  # written in order, under the lock


def _write_forever(path: str) -> None:
    ledger = Ledger(path)
    index = 0
    while True:
        ledger.record(make_entry(0, index))
        index += 1


def test_a_killed_writer_leaves_only_whole_rows(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    process = multiprocessing.get_context("fork").Process(target=_write_forever, args=(str(path),))
    process.start()
    deadline = time.monotonic() + 60
    while _count(path) < 40 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=30)
    assert process.exitcode == -signal.SIGKILL
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    ledger = Ledger(path)
    entries = ledger.list()
    assert len(entries) >= 40
    assert [e.id for e in entries] == list(range(1, len(entries) + 1))
    for index, entry in enumerate(entries):
        expected = make_entry(0, index)
        assert (entry.scope, entry.headline) == (expected.scope, expected.headline)
    assert ledger.verify() == len(entries)  # the head file may lag by a row, never lead
    assert len(entries) - 1 <= ledger.head()["count"] <= len(entries)
    assert ledger.record(make_entry(1, 0)) == len(entries) + 1  # still writable
    assert ledger.head()["count"] == len(entries) + 1  # and the head caught up


def _count(path) -> int:
    con = sqlite3.connect(path, timeout=10)
    try:
        return con.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        con.close()

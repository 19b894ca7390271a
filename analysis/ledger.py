"""The deletion ledger: one row per deletion request, in SQLite, append-only.

Each row records when a request was processed (UTC), the fingerprints of the model
before and after, the SHA-256 of the forget set, the method and scope of the edit, the
headline metrics of its audit (JSON) and the path of the audit report, with the excise
version that wrote it. The default file is ``$EXCISE_HOME/ledger.sqlite``
(``~/.cache/excise/ledger.sqlite``); any path may be given.

What the file guarantees:

- append-only: the API has no update or delete, and triggers abort any ``UPDATE`` or
  ``DELETE`` issued through SQL;
- tamper-evident: rows form a hash chain, ``entry_sha256 = SHA-256(previous_sha256 ‖
  canonical JSON of the row)`` starting from 64 zeros, which :meth:`Ledger.verify` checks;
- whole rows only: each insert is one ``BEGIN IMMEDIATE … COMMIT`` transaction, so a
  writer killed at any point leaves either the whole row or nothing;
- no lost rows under concurrency: the file is in WAL mode and writers wait for the lock
  (busy timeout) instead of failing, so concurrent processes all get their row in;
- newest rows cannot vanish unseen: the chain's head (row count and last hash) is kept in
  a second place, a head file beside the database (``ledger.sqlite.head``), written after
  every row while the write lock is held; :meth:`Ledger.verify` refuses a ledger with fewer
  rows than its head file records, or another hash at that row (the head file may lag by a
  row when a writer was killed between the two, never lead). Each ``excise forget`` run
  also keeps its own row's id and hash in its folder (``ledger.json``), which
  ``excise ledger verify RUN_DIR...`` checks against the ledger;
- a file that is not an excise ledger (another database, or not SQLite at all) is refused
  and left untouched; a ledger that cannot be written is refused before a run starts
  (:meth:`Ledger.check_writable`).

>>> import tempfile, pathlib
>>> ledger = Ledger(pathlib.Path(tempfile.mkdtemp()) / "ledger.sqlite")
>>> entry = LedgerEntry(before_fingerprint="a" * 64, after_fingerprint="b" * 64,
...                     forget_sha256="c" * 64, method="gradient_difference",
...                     scope={"modules": ["model.layers.1.mlp.up_proj"]},
...                     headline={"forget_quality": 0.42}, report_path="/runs/1")
>>> ledger.record(entry), ledger.record(entry)
(1, 2)
>>> [e.id for e in ledger.list()], ledger.get(2).headline, ledger.verify()
([1, 2], {'forget_quality': 0.42}, 2)
>>> ledger.head()["count"], ledger.head()["head_sha256"] == ledger.get(2).entry_sha256
(2, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from analysis.report import json_safe
from attribution.artifacts import package_version, utc_timestamp, write_bytes
from attribution.errors import InputError

FORMAT = "excise-ledger/1"
HEAD_FORMAT = "excise-ledger-head/1"
HEAD_SUFFIX = ".head"  # the head file: the database's name with this suffix
GENESIS = "0" * 64  # the "previous hash" of the first row
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another one to finish

_COLUMNS = (
    "created_utc",
    "before_fingerprint",
    "after_fingerprint",
    "forget_sha256",
    "method",
    "scope",
    "headline",
    "report_path",
    "excise_version",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS excise_ledger (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO excise_ledger (key, value) VALUES ('format', '{format}');
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_utc TEXT NOT NULL,
    before_fingerprint TEXT NOT NULL,
    after_fingerprint TEXT NOT NULL,
    forget_sha256 TEXT NOT NULL,
    method TEXT NOT NULL,
    scope TEXT NOT NULL,            -- JSON
    headline TEXT NOT NULL,         -- JSON
    report_path TEXT,
    excise_version TEXT NOT NULL,
    previous_sha256 TEXT NOT NULL,
    entry_sha256 TEXT NOT NULL UNIQUE
);
"""
_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS {table}_no_{verb} BEFORE {verb} ON {table}
BEGIN SELECT RAISE(ABORT, 'the excise ledger is append-only: {table} rows cannot be changed'); END;
"""


_TEXT_FIELDS = (
    "before_fingerprint",
    "after_fingerprint",
    "forget_sha256",
    "method",
    "excise_version",
    "created_utc",
)
_REQUIRED = (
    "before_fingerprint",
    "after_fingerprint",
    "forget_sha256",
    "method",
    "scope",
    "headline",
)


class LedgerError(InputError):
    """The ledger file is not an excise ledger, or the request names no row of it."""


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One deletion request as the ledger records it (``id`` and hashes set by the ledger)."""

    before_fingerprint: str
    after_fingerprint: str
    forget_sha256: str
    method: str
    scope: Any  # JSON-serialisable: a description, or a mapping of what was edited
    headline: Mapping[str, Any]
    report_path: str | None = None
    excise_version: str = dataclasses.field(default_factory=package_version)
    created_utc: str = dataclasses.field(default_factory=lambda: utc_timestamp("microseconds"))
    id: int | None = None
    previous_sha256: str | None = None
    entry_sha256: str | None = None

    def __post_init__(self) -> None:
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise LedgerError(f"ledger entry: {name} must be a non-empty string, got {value!r}")
        if not isinstance(self.headline, Mapping):
            raise LedgerError(
                f"ledger entry: headline must be a mapping, got {type(self.headline).__name__}"
            )
        if isinstance(self.report_path, os.PathLike):
            object.__setattr__(self, "report_path", os.fspath(self.report_path))
        if self.report_path is not None and not isinstance(self.report_path, str):
            raise LedgerError(f"ledger entry: report_path must be a path, got {self.report_path!r}")


class Ledger:
    """An append-only SQLite ledger of deletion requests at ``path``.

    ``create=False`` refuses a missing file instead of creating an empty ledger (for
    commands that only read). Each call opens its own connection, so a ``Ledger`` may be
    shared across threads and forked processes.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise LedgerError(f"ledger {self.path}: is a folder; name a file")
        if not self.path.exists():
            if not create:
                raise LedgerError(f"ledger {self.path}: no such file; no request recorded yet")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection() as con:
            self._open(con)

    def record(self, entry: LedgerEntry | Mapping[str, Any]) -> int:
        """Append one request in a single transaction; returns its id."""
        entry = _as_entry(entry)
        values = _row_values(entry)
        with self._connection() as con:
            with _transaction(con):
                last = con.execute("SELECT entry_sha256 FROM requests ORDER BY id DESC LIMIT 1")
                previous = (last.fetchone() or (GENESIS,))[0]
                digest = _chain_hash(previous, values)
                cursor = con.execute(
                    f"INSERT INTO requests ({', '.join(_COLUMNS)}, previous_sha256, "
                    f"entry_sha256) VALUES ({', '.join('?' * (len(_COLUMNS) + 2))})",
                    (*(values[c] for c in _COLUMNS), previous, digest),
                )
            with _transaction(con):  # the lock again: heads are written in order
                self._write_head(con)
        return int(cursor.lastrowid)

    @property
    def head_path(self) -> Path:
        """The head file beside the database."""
        return self.path.with_name(self.path.name + HEAD_SUFFIX)

    def head(self) -> dict[str, Any] | None:
        """The head file's record (``count``, ``head_sha256``), or None when there is none."""
        try:
            data = json.loads(self.head_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise LedgerError(f"ledger head {self.head_path}: unreadable ({error})") from None
        if (
            not isinstance(data, dict)
            or data.get("format") != HEAD_FORMAT
            or not isinstance(data.get("count"), int)
            or not isinstance(data.get("head_sha256"), str)
        ):
            raise LedgerError(f"ledger head {self.head_path}: not an excise ledger head file")
        return data

    def check_writable(self) -> None:
        """Refuse (one line) a ledger that cannot take a row: a read-only file or folder.

        A row is inserted and rolled back, and a file is created and removed beside it,
        so nothing changes.
        """
        with self._connection() as con, _transaction(con, commit=False):
            con.execute("INSERT INTO excise_ledger (key, value) VALUES ('probe', 'probe')")
        try:
            handle, probe = tempfile.mkstemp(prefix=".excise-probe.", dir=self.path.parent)
        except OSError as error:
            raise LedgerError(
                f"ledger {self.path}: its folder is not writable ({error.strerror})"
            ) from None
        os.close(handle)
        os.unlink(probe)

    def find(self, report_path: str | Path, after_fingerprint: str) -> LedgerEntry | None:
        """The request whose report is ``report_path`` and whose edited model has this
        fingerprint (a run's row), or None."""
        wanted = str(Path(report_path).resolve())
        with self._connection() as con:
            row = con.execute(
                f"SELECT {_SELECT} FROM requests WHERE report_path = ? AND after_fingerprint = ? "
                "ORDER BY id LIMIT 1",
                (wanted, after_fingerprint),
            ).fetchone()
        return None if row is None else _entry(row)

    def list(self) -> list[LedgerEntry]:
        """Every request, oldest first."""
        with self._connection() as con:
            rows = con.execute(f"SELECT {_SELECT} FROM requests ORDER BY id").fetchall()
        return [_entry(row) for row in rows]

    def get(self, request_id: int | str) -> LedgerEntry:
        """The request with this id; a :class:`LedgerError` names the ids there are."""
        key = _parse_id(request_id)
        with self._connection() as con:
            row = con.execute(f"SELECT {_SELECT} FROM requests WHERE id = ?", (key,)).fetchone()
            if row is None:
                low, high = con.execute("SELECT min(id), max(id) FROM requests").fetchone()
        if row is None:
            known = "the ledger is empty" if low is None else f"ids run from {low} to {high}"
            raise LedgerError(f"ledger {self.path}: no request with id {key}; {known}")
        return _entry(row)

    def verify(self) -> int:
        """Check the hash chain row by row, and the rows against the head file; returns the
        number of rows, or raises :class:`LedgerError`."""
        previous = GENESIS
        entries = self.list()
        for entry in entries:
            expected = _chain_hash(previous, _row_values(entry))
            if entry.previous_sha256 != previous or entry.entry_sha256 != expected:
                raise LedgerError(
                    f"ledger {self.path}: request {entry.id} does not match its hash; "
                    "the file was changed outside excise"
                )
            previous = entry.entry_sha256
        head = self.head()
        if head is not None:
            check_anchor(
                entries,
                head["count"],
                head["head_sha256"],
                f"its head file {self.head_path}",
                self.path,
            )
        return len(entries)

    def _write_head(self, con: sqlite3.Connection) -> None:
        """Write the head file from the database's last row (inside the write lock)."""
        count, last = con.execute(
            "SELECT count(*), (SELECT entry_sha256 FROM requests ORDER BY id DESC LIMIT 1) "
            "FROM requests"
        ).fetchone()
        head = {"format": HEAD_FORMAT, "count": count, "head_sha256": last or GENESIS}
        text = json.dumps({**head, "updated_utc": utc_timestamp("microseconds")}, indent=2)
        write_bytes(self.head_path, (text + "\n").encode("utf-8"))

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        con = None
        try:
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            con.execute("PRAGMA synchronous = FULL")
            yield con
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError):
                reason = _storage_reason(error)
                if reason is None:
                    raise
                raise LedgerError(f"ledger {self.path}: {reason}") from None
            if isinstance(error, sqlite3.IntegrityError):
                raise
            raise LedgerError(
                f"ledger {self.path}: not a readable SQLite database ({error})"
            ) from error
        finally:
            if con is not None:
                con.close()

    def _open(self, con: sqlite3.Connection) -> None:
        """Create the schema in an empty file; refuse a file that holds something else."""
        tables = _tables(con)
        if not tables:
            with _transaction(con):  # concurrent creators take turns; IF NOT EXISTS
                _create(con)
            con.execute("PRAGMA journal_mode = WAL")
            return
        if "excise_ledger" not in tables or "requests" not in tables:
            names = ", ".join(sorted(tables))
            raise LedgerError(
                f"ledger {self.path}: an SQLite database that is not an excise ledger "
                f"(tables: {names}); name another file"
            )
        found = con.execute("SELECT value FROM excise_ledger WHERE key = 'format'").fetchone()
        if found is None or found[0] != FORMAT:
            raise LedgerError(
                f"ledger {self.path}: format {found[0] if found else None!r}, expected "
                f"{FORMAT!r}; this excise version cannot read it"
            )


_SELECT = ", ".join(("id", *_COLUMNS, "previous_sha256", "entry_sha256"))


def _create(con: sqlite3.Connection) -> None:
    """The tables and the append-only triggers, inside the caller's transaction.

    Statement by statement: ``executescript`` would commit the open transaction first.
    """
    script = _SCHEMA.format(format=FORMAT) + "".join(
        _TRIGGER.format(table=table, verb=verb)
        for table in ("requests", "excise_ledger")
        for verb in ("UPDATE", "DELETE")
    )
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            con.execute(statement)
            statement = ""


def check_anchor(
    entries: list[LedgerEntry], count: int, head_sha256: str, where: str, path: Path
) -> None:
    """Refuse rows that end before an anchor (a row count and that row's hash) recorded
    elsewhere, or that hold another hash at it: rows were removed or replaced."""
    if count > len(entries):
        raise LedgerError(
            f"ledger {path}: holds {len(entries)} requests but {where} records {count}; "
            "the newest rows were removed outside excise"
        )
    found = entries[count - 1].entry_sha256 if count else GENESIS
    if found != head_sha256:
        raise LedgerError(
            f"ledger {path}: request {count} does not have the hash {where} records; "
            "rows were replaced outside excise"
        )


def _storage_reason(error: sqlite3.OperationalError) -> str | None:
    """One line for SQLite's errors about the file or the disk (None: another error)."""
    text = str(error).lower()
    for words, reason in (
        ("readonly", "cannot be written (a read-only file, folder or file system)"),
        ("unable to open", "cannot be opened (check the folder and its permissions)"),
        ("locked", f"locked by another process for more than {BUSY_TIMEOUT_S:.0f} s"),
        ("full", "the disk is full"),
        ("disk i/o", "a disk input/output error"),
    ):
        if words in text:
            return reason
    return None


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection, commit: bool = True) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (take the write lock now, waiting for it) … ``COMMIT`` (or,
    with ``commit=False``, ``ROLLBACK``: a probe that leaves nothing)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT" if commit else "ROLLBACK")


def _tables(con: sqlite3.Connection) -> set[str]:
    rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows if not name.startswith("sqlite_")}


def _as_entry(entry: LedgerEntry | Mapping[str, Any]) -> LedgerEntry:
    if isinstance(entry, LedgerEntry):
        return entry
    if not isinstance(entry, Mapping):
        raise LedgerError(f"ledger entry: expected a LedgerEntry or a dict, got {entry!r}")
    settable = {f.name for f in dataclasses.fields(LedgerEntry)} - {
        "id",
        "previous_sha256",
        "entry_sha256",
    }
    unknown = sorted(set(entry) - settable)
    missing = [name for name in _REQUIRED if name not in entry]
    if unknown or missing:
        raise LedgerError(f"ledger entry: unknown fields {unknown}, missing fields {missing}")
    return LedgerEntry(**entry)


def _row_values(entry: LedgerEntry) -> dict[str, Any]:
    """The stored column values; scope and headline as canonical JSON text."""
    values = {c: getattr(entry, c) for c in _COLUMNS}
    for name in ("scope", "headline"):
        data = json_safe(values[name], f"ledger entry {name}")
        values[name] = json.dumps(data, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return values


def _chain_hash(previous: str, values: Mapping[str, Any]) -> str:
    text = json.dumps([previous, [values[c] for c in _COLUMNS]], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    data = dict(zip(("id", *_COLUMNS, "previous_sha256", "entry_sha256"), row, strict=True))
    try:
        data["scope"] = json.loads(data["scope"])
        data["headline"] = json.loads(data["headline"])
    except (TypeError, ValueError) as error:
        raise LedgerError(f"ledger: request {data['id']} holds unreadable JSON ({error})") from None
    return LedgerEntry(**data)


def _parse_id(request_id: int | str) -> int:
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        raise LedgerError(f"ledger: a request id is a whole number, got {request_id!r}")
    try:
        return int(request_id)
    except ValueError:
        raise LedgerError(f"ledger: a request id is a whole number, got {request_id!r}") from None

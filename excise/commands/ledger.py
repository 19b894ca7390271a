"""``excise ledger``: the deletion requests processed so far, and recording a new one.

The ledger itself (an append-only, hash-chained SQLite file) is :mod:`analysis.ledger`;
this module reads it for people and builds a row from an audit report:

- ``excise ledger list``: one line per request (id, time, method, scope, forget set hash,
  headline numbers, report path); ``--json`` for JSON lines with every field;
- ``excise ledger show ID``: every field of one request (``--json`` as JSON);
- ``excise ledger verify [RUN_DIR ...]``: check the hash chain of every row, the rows
  against the head file, and each ``excise forget`` run folder named against its row;
- ``excise ledger record RUN_DIR``: register a finished ``excise forget`` run that has no
  row (a run killed between writing its folder and its row); a recorded run is not
  recorded twice.

Each takes ``--ledger PATH`` (default ``$EXCISE_HOME/ledger.sqlite``; for ``record``, the
ledger the run named). A missing or unreadable ledger file, an id that names no request,
or a folder that is not a finished ``excise forget`` run is bad input (exit 2).

A run folder holds its row as the run meant to record it (``forget.json``, section
``ledger``: the ledger's path and the row's fields), written before the folder is put in
place, and, once recorded, ``ledger.json``: the ledger, the row's id and its hash — the
chain's head when the row was added, a second anchor beside the ledger's head file.

>>> models = {"before": {"fingerprint": "a" * 64}, "after": {"fingerprint": "b" * 64}}
>>> report = {"models": models, "splits": {"forget": {"n": 3, "sha256": "c" * 64}},
...           "headline": {"forget_quality": 0.42}}
>>> entry = entry_from_report(report, method="npo", scope={"method": "ekfac", "fraction": 0.05})
>>> entry.forget_sha256 == "c" * 64, scope_summary(entry.scope)
(True, 'ekfac 5.00%')
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from analysis.ledger import Ledger, LedgerEntry, LedgerError, check_anchor
from analysis.report import json_safe
from excise.errors import BadInputError
from excise.home import default_ledger_path

SHORT_HASH = 12  # hex digits of a hash shown in the list


def run(args: argparse.Namespace) -> int:
    """``list``, ``show``, ``verify`` or ``record``; prints to stdout, returns the exit code."""
    if args.ledger_command == "record":
        return run_record(args)
    ledger = Ledger(args.ledger or default_ledger_path(), create=False)  # reading never creates
    if args.ledger_command == "list":
        entries = ledger.list()
        if args.json:
            for entry in entries:
                print(json.dumps(entry_dict(entry), ensure_ascii=False))
        elif entries:
            print(format_table(entries))
        elif not args.quiet:
            print(f"excise ledger: {ledger.path}: no request recorded yet", file=sys.stderr)
    elif args.ledger_command == "show":
        entry = ledger.get(args.id)
        print(json.dumps(entry_dict(entry), indent=2) if args.json else format_entry(entry))
    else:
        n = ledger.verify()
        head = "head file matches" if ledger.head() is not None else "no head file yet"
        print(f"{ledger.path}: {n} request(s), hash chain intact, {head}")
        if args.runs:
            entries = ledger.list()
            for run_dir in args.runs:
                print(f"{run_dir}: {check_run(run_dir, ledger, entries)}")
    return 0


def run_record(args: argparse.Namespace) -> int:
    """``excise ledger record RUN_DIR``: the run's row, added unless it is there already."""
    entry, named = run_entry(args.run_dir)
    ledger = Ledger(args.ledger or named)
    found = ledger.find(entry.report_path, entry.after_fingerprint)
    if found is None:
        ledger.check_writable()
        found = ledger.get(ledger.record(entry))
        verb = "recorded"
    else:
        verb = "already recorded"
    write_run_anchor(args.run_dir, ledger, found)
    print(f"{args.run_dir}: {verb} as request {found.id} in {ledger.path}")
    return 0


FORGET_RECORD, RUN_ANCHOR = "forget.json", "ledger.json"


def run_entry(run_dir: str | Path) -> tuple[LedgerEntry, Path]:
    """The row a finished ``excise forget`` run meant to record, and the ledger it named."""
    from attribution.artifacts import artifact_kind

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BadInputError(f"{run_dir}: no such run folder")
    try:
        data = json.loads((run_dir / FORGET_RECORD).read_text(encoding="utf-8"))
        section = data["ledger"]
        entry = LedgerEntry(**section["entry"])
        return entry, Path(section["path"])
    except (OSError, ValueError, KeyError, TypeError):
        kind = artifact_kind(run_dir)
        raise BadInputError(
            f"{run_dir}: not a finished excise forget run with a ledger record "
            f"(kind {kind!r}; no readable {FORGET_RECORD} 'ledger' section)"
        ) from None


def entry_fields(entry: LedgerEntry) -> dict[str, Any]:
    """The fields a run keeps of its row (what :class:`LedgerEntry` takes back)."""
    data = dataclasses.asdict(entry)
    return {k: v for k, v in data.items() if k not in ("id", "previous_sha256", "entry_sha256")}


def write_run_anchor(run_dir: str | Path, ledger: Ledger, entry: LedgerEntry) -> None:
    """``RUN_DIR/ledger.json``: where the run's row is, its id and its hash."""
    from attribution.artifacts import write_json

    write_json(
        Path(run_dir) / RUN_ANCHOR,
        {"ledger": str(ledger.path.resolve()), "id": entry.id, "entry_sha256": entry.entry_sha256},
    )


def check_run(run_dir: str | Path, ledger: Ledger, entries: list[LedgerEntry]) -> str:
    """How a run folder stands against the ledger; a :class:`LedgerError` when its row is
    missing, removed or changed."""
    entry, _ = run_entry(run_dir)
    try:
        anchor = json.loads((Path(run_dir) / RUN_ANCHOR).read_text(encoding="utf-8"))
    except FileNotFoundError:
        found = ledger.find(entry.report_path, entry.after_fingerprint)
        if found is None:
            raise LedgerError(
                f"{run_dir}: a finished deletion with no row in ledger {ledger.path}; record "
                f"it with: excise ledger record {run_dir}"
            ) from None
        return f"request {found.id} (its {RUN_ANCHOR} is missing: excise ledger record adds it)"
    except (OSError, ValueError) as error:
        raise LedgerError(f"{run_dir}/{RUN_ANCHOR}: unreadable ({error})") from None
    if Path(str(anchor.get("ledger"))) != ledger.path.resolve():
        raise LedgerError(
            f"{run_dir}: recorded in ledger {anchor.get('ledger')}, not {ledger.path}; pass "
            "--ledger"
        )
    check_anchor(
        entries, int(anchor["id"]), str(anchor["entry_sha256"]), f"run {run_dir}", ledger.path
    )
    row = entries[int(anchor["id"]) - 1]
    if row.after_fingerprint != entry.after_fingerprint:
        raise LedgerError(f"{run_dir}: request {row.id} records another edited model")
    return f"request {row.id}, as recorded"


def record_request(
    report: Mapping[str, Any],
    *,
    method: str,
    scope: Any,
    report_path: str | Path | None = None,
    forget_sha256: str | None = None,
    ledger: str | Path | Ledger | None = None,
) -> int:
    """Append one deletion request to ``ledger`` (default file); returns its id.

    ``report`` is the ``excise-audit/1`` dict of the request's audit: the fingerprints of
    the models before and after, the forget set's SHA-256 and the headline come from it.
    See :func:`entry_from_report` for the other arguments.
    """
    entry = entry_from_report(
        report, method=method, scope=scope, report_path=report_path, forget_sha256=forget_sha256
    )
    book = ledger if isinstance(ledger, Ledger) else Ledger(ledger or default_ledger_path())
    return book.record(entry)


def entry_from_report(
    report: Mapping[str, Any],
    *,
    method: str,
    scope: Any,
    report_path: str | Path | None = None,
    forget_sha256: str | None = None,
) -> LedgerEntry:
    """The ledger row of a request audited by ``report``.

    ``method``: the unlearning method (``npo`` ...); ``scope``: JSON-serialisable, best the
    ``scope`` section of the unlearning manifest (a mapping with ``method`` and
    ``fraction`` shows as ``ekfac 5.00%`` in the list); ``report_path``: the folder of the
    report; ``forget_sha256``: the forget set's hash when the report has none (records that
    did not come from one file).
    """
    models, forget = _mapping(report.get("models")), _mapping(report.get("splits")).get("forget")
    fingerprints = {
        role: _mapping(models.get(role)).get("fingerprint") for role in ("before", "after")
    }
    forget_sha256 = forget_sha256 or _mapping(forget).get("sha256")
    if not forget_sha256:
        raise BadInputError(
            "ledger entry: the report has no SHA-256 of the forget set; pass forget_sha256"
        )
    if report_path is not None:
        report_path = str(Path(report_path).resolve())
    return LedgerEntry(
        before_fingerprint=fingerprints["before"],
        after_fingerprint=fingerprints["after"],
        forget_sha256=forget_sha256,
        method=method,
        scope=json_safe(scope, "ledger entry scope"),
        headline=json_safe(dict(_mapping(report.get("headline"))), "ledger entry headline"),
        report_path=report_path,
    )


def entry_dict(entry: LedgerEntry) -> dict[str, Any]:
    """Every field of a ledger row, ``id`` first, as a JSON-ready dict."""
    data = dataclasses.asdict(entry)
    return {"id": data.pop("id"), **data}


def format_table(entries: list[LedgerEntry]) -> str:
    """The list view: a header and one aligned line per request."""
    header = (
        "id",
        "time (UTC)",
        "method",
        "scope",
        "forget set",
        "forget quality",
        "forget p before→after",
        "utility before→after",
        "report",
    )
    rows = [header] + [_row(entry) for entry in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


def format_entry(entry: LedgerEntry) -> str:
    """The show view: every field on its own line, the headline numbers indented."""
    data = entry_dict(entry)
    headline = data.pop("headline")
    lines = [f"request {data.pop('id')}"]
    width = max(map(len, data)) + 2
    for key, value in data.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(f"  {key.ljust(width)}{text}")
    lines.append("  headline")
    width = max(map(len, headline), default=0) + 2
    lines += [f"    {k.ljust(width)}{json.dumps(v)}" for k, v in headline.items()]
    return "\n".join(lines)


def scope_summary(scope: Any) -> str:
    """A few words for the list: ``ekfac 5.00%`` from a scope mapping, else short JSON."""
    if isinstance(scope, Mapping) and isinstance(scope.get("method"), str):
        fraction = scope.get("fraction")
        if isinstance(fraction, int | float) and not isinstance(fraction, bool):
            return f"{scope['method']} {fraction:.2%}"
        return scope["method"]
    text = scope if isinstance(scope, str) else json.dumps(scope, ensure_ascii=False)
    return text if len(text) <= 30 else text[:29] + "…"


def _row(entry: LedgerEntry) -> tuple[str, ...]:
    head = entry.headline
    return (
        str(entry.id),
        entry.created_utc[:19].replace("T", " "),
        entry.method,
        scope_summary(entry.scope),
        entry.forget_sha256[:SHORT_HASH],
        _number(head.get("forget_quality")),
        f"{_number(head.get('forget_probability_before'))}→"
        f"{_number(head.get('forget_probability_after'))}",
        f"{_number(head.get('model_utility_before'))}→{_number(head.get('model_utility_after'))}",
        entry.report_path or "-",
    )


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    return f"{value:.3g}"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}

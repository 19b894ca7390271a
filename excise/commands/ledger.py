"""``excise ledger``: the deletion requests processed so far, and recording a new one.

The ledger itself (an append-only, hash-chained SQLite file) is :mod:`analysis.ledger`;
this module reads it for people and builds a row from an audit report:

- ``excise ledger list``: one line per request (id, time, method, scope, forget set hash,
  headline numbers, report path); ``--json`` for JSON lines with every field;
- ``excise ledger show ID``: every field of one request (``--json`` as JSON);
- ``excise ledger verify``: check the hash chain of every row.

Each takes ``--ledger PATH`` (default ``$EXCISE_HOME/ledger.sqlite``). A missing or
unreadable ledger file, or an id that names no request, is bad input (exit 2).

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

from analysis.ledger import Ledger, LedgerEntry
from analysis.report import json_safe
from excise.errors import BadInputError
from excise.home import default_ledger_path

SHORT_HASH = 12  # hex digits of a hash shown in the list


def run(args: argparse.Namespace) -> int:
    """``list``, ``show`` or ``verify``; prints to stdout and returns the exit code (0)."""
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
        print(f"{ledger.path}: {n} request(s), hash chain intact")
    return 0


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

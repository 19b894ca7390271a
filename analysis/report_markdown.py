"""``report.md``: the headline table and a few lines on where things stand, for a terminal.

Data strings are made safe for a Markdown table cell by :func:`_md` (one line, with ``|``
and markup characters escaped).

>>> render_markdown({"schema": "excise-audit/1"}).splitlines()[0]
'# excise audit'
>>> _md("a | <b>\\n c")
'a \\\\| \\\\<b\\\\> c'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from analysis.report_format import (
    MISSING,
    ROLES,
    SPLITS,
    as_mapping,
    check_report,
    fmt,
    fmt_pct,
    get_in,
    headline_rows,
    ordered,
    reason_of,
    warnings_of,
)


def render_markdown(report: Mapping[str, Any]) -> str:
    """A short terminal summary: the headline table and where things stand."""
    check_report(report)
    lines = [
        "# excise audit",
        "",
        f"created {_md(report.get('created_utc', '?'))} · excise "
        f"{_md(report.get('excise_version', '?'))}",
        "",
        "| measure | value | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {_md(a)} | {_md(b)} | {_md(c)} |" for a, b, c in headline_rows(report)]
    warnings = warnings_of(report)
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {_md(w)}" for w in warnings]
    lines += ["", "## Where things stand", ""]
    lines += [f"- {_md(line)}" for line in _standing(report)]
    lines += ["", "Every number and plot: report.json and report.html in this folder."]
    return "\n".join(lines) + "\n"


def _standing(report: Mapping[str, Any]) -> list[str]:
    """A few plain sentences on models, membership inference, relearning and gaps."""
    lines = []
    for role, model in ordered(as_mapping(report.get("models")), ROLES):
        if isinstance(model, Mapping):
            fingerprint = str(model.get("fingerprint") or "?")[:12]
            lines.append(f"{role}: {model.get('path') or '(in memory)'} ({fingerprint})")
    splits = as_mapping(report.get("splits"))
    if splits:
        sizes = ", ".join(f"{k} {fmt(get_in(v, 'n'))}" for k, v in ordered(splits, SPLITS))
        lines.append(f"examples per split: {sizes}")
    membership = report.get("membership")
    if isinstance(membership, Mapping) and membership.get("available"):
        aucs = [
            f"{role} {fmt(get_in(membership, role, 'attacks', 'loss', 'auc'))}"
            for role in ROLES
            if isinstance(get_in(membership, role), Mapping)
        ]
        lines.append("membership inference, LOSS attack AUC: " + ", ".join(aucs))
    else:
        lines.append(f"membership inference: not available: {reason_of(membership, MISSING)}")
    relearn = report.get("relearning")
    if isinstance(relearn, Mapping) and relearn.get("available"):
        lines.append(
            f"relearning: {fmt_pct(relearn.get('recovered_fraction'))} of the forgotten "
            f"probability came back after {fmt(relearn.get('steps'))} steps"
        )
    else:
        lines.append(f"relearning: not available: {reason_of(relearn, MISSING)}")
    return lines


def _md(value: Any) -> str:
    """A data string made safe in a Markdown table cell: one line, markup escaped."""
    text = " ".join(str(value).split())
    for char in "\\|<>`":
        text = text.replace(char, "\\" + char)
    return text

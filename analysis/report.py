"""The audit report: ``report.json``, one self-contained ``report.html`` and ``report.md``.

The input is the plain dict of schema ``excise-audit/1`` that :mod:`analysis.audit` builds
(models, splits, metrics per split and model, forget quality, model utility, membership
inference, knowledge shift, parameter change, relearning, headline). The report modules
only render it; they compute no metric. What the renderers promise:

- ``report.json`` holds every number, keys sorted, with NaN and ±inf written as ``null``
  (strict JSON);
- ``report.html`` is one file that opens with no network: inline CSS, no script, plots as
  embedded PNG (``data:`` URLs, see :mod:`analysis.plots`), a Content-Security-Policy that
  allows nothing else. Every string taken from the report (ids, prompts, completions,
  paths, reasons, module names, even dict keys) is HTML-escaped, so a record holding
  ``<script>`` shows as text;
- a section whose data are missing or marked unavailable says ``not available: <reason>``
  instead of showing a number;
- ``report.md`` is the headline table and a few lines on where things stand, for the
  terminal, with ``|`` and markup characters in data strings escaped.

Each file is written atomically (temporary file + rename), after all three are rendered.

This module is the front: :func:`write_report`, the JSON (:func:`report_json`,
:func:`json_safe`), and the names the rest of excise imports. The pieces live in
:mod:`analysis.report_format` (the schema check, headline rows, shared formatting),
:mod:`analysis.report_html` with :mod:`analysis.report_style` (the page and its CSS) and
:mod:`analysis.report_markdown`.

>>> render_markdown({"schema": "excise-audit/1"}).splitlines()[0]
'# excise audit'
>>> render_html({"schema": "other"})
Traceback (most recent call last):
...
analysis.report_format.ReportError: report: schema is 'other', expected 'excise-audit/1'; \
write it with this version of excise (analysis.audit)
>>> json_safe({"a": float("nan"), "b": [1.5, float("inf")]})
{'a': None, 'b': [1.5, None]}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from analysis.report_format import (
    ATTACKS,
    METRICS,
    MISSING,
    ROLES,
    SCHEMA,
    SHIFT_ORDER,
    SPLITS,
    ReportError,
    check_report,
    headline_rows,
    warnings_of,
)
from analysis.report_html import CSP, render_html
from analysis.report_markdown import render_markdown
from attribution.artifacts import write_bytes

__all__ = [
    # writing the report
    "write_report",
    "ReportPaths",
    "report_json",
    "json_safe",
    # rendering it
    "render_html",
    "render_markdown",
    "headline_rows",
    "warnings_of",
    "CSP",
    # its schema
    "check_report",
    "ReportError",
    "SCHEMA",
    "ROLES",
    "SPLITS",
    "METRICS",
    "ATTACKS",
    "SHIFT_ORDER",
    "MISSING",
]


class ReportPaths(NamedTuple):
    """The three files :func:`write_report` wrote."""

    json: Path
    html: Path
    markdown: Path


def write_report(report: Mapping[str, Any], folder: str | Path) -> ReportPaths:
    """Write ``report.json``, ``report.html`` and ``report.md`` into ``folder``.

    All three are rendered first, then each is written atomically; a report that fails to
    render leaves the folder as it was.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"report folder {folder}: exists and is a file; name a folder")
    texts = (report_json(report), render_html(report), render_markdown(report))
    folder.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(folder / "report.json", folder / "report.html", folder / "report.md")
    for path, text in zip(paths, texts, strict=True):
        write_bytes(path, text.encode("utf-8"))
    return paths


def report_json(report: Mapping[str, Any]) -> str:
    """The report as strict JSON text: keys sorted, indented, NaN and ±inf as ``null``."""
    check_report(report)
    return json.dumps(json_safe(report), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def json_safe(value: Any, where: str = "report") -> Any:
    """A copy of ``value`` that strict JSON can hold: NaN/±inf → ``None``, tuples → lists.

    Numpy and torch scalars or arrays are converted through ``tolist()``; keys become
    strings. Anything else is refused with the place where it was found.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if callable(getattr(value, "tolist", None)):
        return json_safe(value.tolist(), where)
    raise ReportError(f"{where}: a {type(value).__name__}, which JSON cannot hold")

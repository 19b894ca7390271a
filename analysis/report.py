"""The audit report: ``report.json``, one self-contained ``report.html`` and ``report.md``.

The input is the plain dict of schema ``excise-audit/1`` that :mod:`analysis.audit` builds
(models, splits, metrics per split and model, forget quality, model utility, membership
inference, knowledge shift, parameter change, relearning, headline). This module only
renders it; it computes no metric. What the renderers promise:

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

>>> render_markdown({"schema": "excise-audit/1"}).splitlines()[0]
'# excise audit'
>>> render_html({"schema": "other"})
Traceback (most recent call last):
...
analysis.report.ReportError: report: schema is 'other', expected 'excise-audit/1'; \
write it with this version of excise (analysis.audit)
>>> json_safe({"a": float("nan"), "b": [1.5, float("inf")]})
{'a': None, 'b': [1.5, None]}
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from attribution.artifacts import write_bytes
from attribution.errors import InputError

SCHEMA = "excise-audit/1"
ROLES = ("before", "after", "reference")
SPLITS = ("forget", "retain", "neighbor", "real_authors", "world", "holdout")
METRICS = (
    "probability",
    "rouge_l_recall",
    "truth_ratio",
    "exact_memorization",
    "extraction_strength",
)
ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
SHIFT_ORDER = ("neighbor", "retain", "world", "forget", "holdout")  # out of scope first
MISSING = "missing from the report"
_TEXT_LIMIT = 400  # characters of a prompt or completion shown in a table cell
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class ReportError(InputError):
    """The dict is not an ``excise-audit/1`` report, or holds what JSON cannot."""


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


def check_report(report: Any) -> Mapping[str, Any]:
    """Refuse anything but a mapping whose ``schema`` is ``excise-audit/1``."""
    if not isinstance(report, Mapping):
        raise ReportError(f"report: expected a dict, got {type(report).__name__}")
    if report.get("schema") != SCHEMA:
        raise ReportError(
            f"report: schema is {report.get('schema')!r}, expected {SCHEMA!r}; "
            "write it with this version of excise (analysis.audit)"
        )
    return report


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


# ----------------------------------------------------------------------------- HTML


class _Safe(str):
    """HTML that this module built from escaped parts; every other string gets escaped."""


def render_html(report: Mapping[str, Any]) -> str:
    """The whole report as one self-contained HTML page (no script, no external URL)."""
    check_report(report)
    body = "\n".join(
        section(report)
        for section in (
            _header,
            _headline_section,
            _metrics_section,
            _forget_quality_section,
            _membership_section,
            _shift_section,
            _parameters_section,
            _relearning_section,
        )
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>excise audit report</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n<footer>schema {_e(report.get('schema'))} · written by excise "
        f"{_e(report.get('excise_version', 'unknown'))}</footer>\n</body>\n</html>\n"
    )


def _header(report: Mapping[str, Any]) -> str:
    models = _mapping(report.get("models"))
    model_rows = [
        [role, _text(_get(m, "path") or "(in memory)"), _code(_get(m, "fingerprint"))]
        for role, m in _ordered(models, ROLES)
        if m is not None
    ]
    split_rows = [
        [name, _get(s, "n"), _code(_get(s, "sha256"))]
        for name, s in _ordered(_mapping(report.get("splits")), SPLITS)
    ]
    return (
        f"<header><h1>excise audit report</h1><p>created {_e(report.get('created_utc', '?'))}"
        f" · excise {_e(report.get('excise_version', '?'))}</p>"
        + "".join(f'<p class="warn">warning: {_e(w)}</p>' for w in warnings_of(report))
        + "</header>\n"
        + _section_body(
            "models",
            "Models and data",
            [
                _table(["model", "path", "fingerprint"], model_rows)
                if model_rows
                else _unavailable(MISSING),
                _table(["split", "examples", "sha256"], split_rows)
                if split_rows
                else _unavailable(MISSING),
                _definitions(report),
            ],
        )
    )


def _definitions(report: Mapping[str, Any]) -> str:
    """Where the field's tools differ, how this report counts; and the audit's stage times."""
    rows = [[k.replace("_", " "), v] for k, v in _mapping(report.get("definitions")).items()]
    rows += [
        [f"seconds: {stage}", value] for stage, value in _mapping(report.get("seconds")).items()
    ]
    if not rows:
        return ""
    return (
        "<details><summary>Definitions and the audit's stage timings</summary>"
        + _table(["", ""], rows)
        + "</details>"
    )


# --- headline


def headline_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(measure, value, detail) rows of the headline table, as plain unescaped text."""
    head = _mapping(report.get("headline"))
    fq_after = _get(report, "forget_quality", "after")
    if _number(head.get("forget_quality")) is not None:
        fq = (
            _fmt_p(head["forget_quality"]),
            f"KS statistic D = {_fmt(_get(fq_after, 'ks_statistic'))}; "
            f"n = {_fmt(_get(fq_after, 'n'))} forget, "
            f"{_fmt(_get(fq_after, 'n_reference'))} reference",
        )
    else:
        fq = ("n/a", f"not available: {_reason(fq_after, 'no reference model')}")
    ref_p = head.get("forget_probability_reference")
    ref_mu = _get(report, "model_utility", "reference", "value")
    rows = [
        ("forget quality (KS p-value, after vs reference)", *fq),
        _null_row(report),
        (
            "forget probability, before → after",
            f"{_fmt(head.get('forget_probability_before'))} → "
            f"{_fmt(head.get('forget_probability_after'))}",
            "reference (retrained without the forget set): "
            + (_fmt(ref_p) if ref_p is not None else "not available: no reference model"),
        ),
        (
            "model utility, before → after",
            f"{_fmt(head.get('model_utility_before'))} → {_fmt(head.get('model_utility_after'))}",
            _utility_definition(report)
            + "; reference: "
            + (_fmt(ref_mu) if ref_mu is not None else "not available"),
        ),
        _privleak_row(report),
        _shift_row(report, "neighbor", "neighbour shift: mean Δ log p (after − before)"),
        _shift_row(report, "retain", "retain shift: mean Δ log p (after − before)"),
        (
            "edited parameters",
            _fmt_pct(head.get("changed_parameters_fraction")),
            f"{_fmt(_get(report, 'parameters', 'changed_parameters'))} of "
            f"{_fmt(_get(report, 'parameters', 'total_parameters'))} parameters changed",
        ),
        (
            "identical tensors",
            f"{_fmt(head.get('identical_tensors'))} of {_fmt(head.get('total_tensors'))}",
            "tensors bit-identical to the model before",
        ),
    ]
    return rows


def _utility_definition(report: Mapping[str, Any]) -> str:
    """Which model utility the report shows: TOFU's 9 components, or the splits it had."""
    utility = _mapping(_get(report, "model_utility", "after"))
    definition = utility.get("definition")
    n = len(_mapping(utility.get("components")))
    if definition == "tofu":
        return "TOFU's: harmonic mean of 9 (retain, real authors, world facts)"
    if not definition:
        return "harmonic mean"
    return f"harmonic mean of {n} on {definition} (TOFU's 9 need real_authors)"


def _privleak_row(report: Mapping[str, Any]) -> tuple[str, str, str]:
    """MUSE's privleak of the unlearned model (Min-K%), or why it is not there."""
    label = "privleak (MUSE, Min-K%)"
    value = _number(_mapping(report.get("headline")).get("privleak"))
    if value is None:
        membership = _mapping(report.get("membership"))
        why = (
            _reason(membership, "no reference model")
            if not membership.get("available")
            else ("no reference model")
        )
        return label, "n/a", f"not available: {why}"
    return (
        label,
        f"{value:+.1f}",
        "0: like the reference; negative: still leaking; positive: over-unlearned",
    )


def _null_row(report: Mapping[str, Any]) -> tuple[str, str, str]:
    """D of the unlearned model against the perfect-stranger null (the gate's noise floor)."""
    label = "forget gate: KS D vs the perfect-stranger null"
    null = _mapping(report.get("forget_quality_null"))
    if not null.get("available"):
        return label, "n/a", f"not available: {_reason(null, 'no holdout split')}"
    verdict = "within" if null.get("within_p90") else "outside"
    return (
        label,
        f"D = {_fmt(null.get('after_d'))} ({verdict} the null's 90th percentile)",
        f"null over {_fmt(null.get('draws'))} draws of the original model with holdout names "
        f"swapped in, against the {null.get('target')}: median {_fmt(null.get('median'))}, "
        f"90th percentile {_fmt(null.get('p90'))}; its D is at or above "
        f"{_fmt_pct(null.get('after_percentile'))} of the draws",
    )


def _shift_row(report: Mapping[str, Any], split: str, label: str) -> tuple[str, str, str]:
    entry = _get(report, "shift", split)
    change = _get(entry, "log_prob_change")
    if not isinstance(change, Mapping):
        return label, "n/a", f"not available: no {split} split"
    detail = (
        f"95% CI [{_fmt(change.get('ci_low'))}, {_fmt(change.get('ci_high'))}]; "
        f"median {_fmt(change.get('median'))}; "
        f"mean KL {_fmt(_get(entry, 'kl', 'mean'))}; n = {_fmt(_get(entry, 'n'))}"
    )
    return label, _fmt(change.get("mean")), detail


def _headline_section(report: Mapping[str, Any]) -> str:
    rows = [[measure, value, detail] for measure, value, detail in headline_rows(report)]
    guide = (
        "Forget quality is the p-value of a two-sample KS test between the truth ratios of "
        "the forget set under the unlearned model and under the reference model retrained "
        "without it: a high value means the two are hard to tell apart, a low value that "
        "they differ. Shift is the change in summed completion log-probability on data that "
        "should not move."
    )
    return _section_body(
        "headline",
        "Headline",
        [
            _table(["measure", "value", "detail"], rows),
            f'<p class="guide">{_e(guide)}</p>',
        ],
    )


# --- metrics per split


def _metrics_section(report: Mapping[str, Any]) -> str:
    metrics = report.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        return _section_body("metrics", "Metrics per split", [_unavailable(MISSING)])
    blocks = []
    for split, per_role in _ordered(metrics, SPLITS):
        roles = [r for r, v in _ordered(_mapping(per_role), ROLES) if isinstance(v, Mapping)]
        names = _keys_in_order({k for r in roles for k in _mapping(per_role[r])}, METRICS)
        rows, notes = [], []
        for name in names:
            row: list[Any] = [name]
            for role in roles:
                entry = _get(per_role, role, name)
                row.append(_get(entry, "value") if _get(entry, "value") is not None else "n/a")
                if _get(entry, "value") is None:
                    notes.append(f"{name} ({role}): not available: {_reason(entry, MISSING)}")
            rows.append(row)
        table = _table(["metric", *roles], rows) if rows else _unavailable(MISSING)
        notes_html = "".join(f'<p class="na">{_e(note)}</p>' for note in notes)
        blocks.append(f'<div class="split"><h3>{_e(split)}</h3>{table}{notes_html}</div>')
    parts = [f'<div class="grid">{"".join(blocks)}</div>']
    parts.append(
        _plot(
            "truth_ratio_figure",
            dict(_ordered(_mapping(metrics.get("forget")), ROLES)),
            "Truth ratio R per question on the forget split, per model",
            "no per-example truth ratios on the forget split",
        )
    )
    note = (
        "truth_ratio: forget split mean(min(R, 1/R)), other splits mean(max(0, 1 − R)), "
        "with R the perturbed-to-paraphrased answer probability ratio (TOFU)."
    )
    parts.append(f'<p class="guide">{_e(note)}</p>')
    return _section_body("metrics", "Metrics per split", parts)


def _forget_quality_section(report: Mapping[str, Any]) -> str:
    section = report.get("forget_quality")
    if not isinstance(section, Mapping) or not section:
        return _section_body("forget-quality", "Forget quality", [_unavailable(MISSING)])
    rows, notes = [], []
    for role, entry in _ordered(section, ROLES):
        if _get(entry, "available"):
            rows.append(
                [
                    role,
                    _fmt_p(_get(entry, "p_value")),
                    _get(entry, "ks_statistic"),
                    _get(entry, "n"),
                    _get(entry, "n_reference"),
                ]
            )
        else:
            notes.append(f"{role}: not available: {_reason(entry, MISSING)}")
    header = ["model vs reference", "p-value", "KS statistic", "n", "n reference"]
    parts = [_table(header, rows)] if rows else []
    parts += [f'<p class="na">{_e(note)}</p>' for note in notes]
    return _section_body("forget-quality", "Forget quality (KS test on truth ratios)", parts)


def _membership_section(report: Mapping[str, Any]) -> str:
    title = "Membership inference (forget vs holdout)"
    section = report.get("membership")
    if not isinstance(section, Mapping):
        return _section_body("membership", title, [_unavailable(MISSING)])
    if not section.get("available", False):
        return _section_body("membership", title, [_unavailable(_reason(section, MISSING))])
    roles = [r for r in ROLES if isinstance(_get(section, r, "attacks"), Mapping)]
    attacks = _keys_in_order({a for r in roles for a in section[r]["attacks"]}, ATTACKS)
    rows = [[a, *(_get(section, r, "attacks", a, "auc") for r in roles)] for a in attacks]
    parts = [_table(["attack (ROC AUC)", *roles], rows) if rows else _unavailable(MISSING)]
    parts.append(
        f'<p class="guide">Min-K% and Min-K%++ at k = {_e(_fmt(section.get("k")))}; zlib on '
        "the decoded answer tokens; the final end-of-sequence label left out.</p>"
    )
    privleak = section.get("privleak")
    if isinstance(privleak, Mapping) and privleak:
        p_roles = [r for r, v in _ordered(privleak, ROLES) if isinstance(v, Mapping)]
        names = _keys_in_order({a for r in p_roles for a in privleak[r]}, ATTACKS)
        p_rows = [[a, *(_get(privleak, r, a) for r in p_roles)] for a in names]
        parts.append(
            "<h3>privleak (MUSE): ((1 − AUC) − (1 − AUC of the reference)) / (1 − AUC of the "
            'reference) × 100</h3><p class="guide">0: like the reference; negative: the '
            "forget set is still told from the holdout (leaking); positive: less than the "
            "reference does (over-unlearned). MUSE reports the Min-K% attack.</p>"
        )
        parts.append(_table(["attack", *p_roles], p_rows))
    else:
        parts.append(_unavailable("privleak needs a reference model"))
    parts.append(
        _plot(
            "roc_figure",
            section,
            "ROC curves of the attacks, forget (members) vs holdout (non-members)",
            "no ROC curves in the report",
        )
    )
    return _section_body("membership", title, parts)


# --- knowledge shift


def _shift_section(report: Mapping[str, Any]) -> str:
    title = "Knowledge shift (after − before)"
    shift = report.get("shift")
    if not isinstance(shift, Mapping) or not shift:
        return _section_body("shift", title, [_unavailable(MISSING)])
    rows = []
    for split, entry in _ordered(shift, SHIFT_ORDER):
        change, kl = _mapping(_get(entry, "log_prob_change")), _mapping(_get(entry, "kl"))
        rows.append(
            [
                split,
                _get(entry, "n"),
                change.get("mean"),
                _ci(change),
                change.get("median"),
                kl.get("mean"),
                _ci(kl),
            ]
        )
    parts = [
        _table(
            ["split", "n", "mean Δ log p", "95% CI", "median Δ log p", "mean KL", "KL 95% CI"], rows
        ),
        _plot(
            "shift_figure",
            dict(_ordered(shift, SHIFT_ORDER)),
            "Per-example change in completion log-probability, per split (dashed: mean)",
            "no per-example shift values",
        ),
    ]
    for split, entry in _ordered(shift, SHIFT_ORDER):
        parts.append(_most_shifted(split, _get(entry, "most_shifted"), split == "neighbor"))
    parts += _foresight(report.get("foresight"))
    return _section_body("shift", title, parts)


def _foresight(section: Any) -> list[str]:
    """How well influence foresaw the collateral (``excise forget`` adds it), per split."""
    if not isinstance(section, Mapping) or not section:
        return []
    rows = [
        [split, _get(entry, "n"), _get(entry, "spearman"), _text(_get(entry, "reason") or "")]
        for split, entry in _ordered(section, SHIFT_ORDER)
    ]
    header = ["split", "n in training set", "Spearman ρ (predicted damage, observed loss rise)", ""]
    return [
        "<h3>Influence foresight</h3>",
        "<p>Predicted damage: the record's loss change under the forget set's Newton step "
        "(column sums of the forget × train influence scores); observed: −Δ log p of its "
        "answer after the edit.</p>",
        _table(header, rows),
    ]


def _most_shifted(split: str, examples: Any, open_: bool) -> str:
    summary = f"most shifted examples: {split}"
    if not isinstance(examples, list) or not examples:
        return f"<details><summary>{_e(summary)}</summary>{_unavailable(MISSING)}</details>"
    rows = [
        [
            _text(_get(x, "id")),
            _text(_get(x, "prompt")),
            _text(_get(x, "completion")),
            _get(x, "log_prob_change"),
            _get(x, "kl"),
        ]
        for x in examples
    ]
    table = _table(["id", "prompt", "completion", "Δ log p", "KL"], rows)
    return f"<details{' open' if open_ else ''}><summary>{_e(summary)}</summary>{table}</details>"


# --- parameters and relearning


def _parameters_section(report: Mapping[str, Any]) -> str:
    title = "Parameters changed"
    params = report.get("parameters")
    if not isinstance(params, Mapping):
        return _section_body("parameters", title, [_unavailable(MISSING)])
    total, changed = params.get("total_parameters"), params.get("changed_parameters")
    known = _number(changed) is not None and _number(total) is not None and total > 0
    fraction = changed / total if known else None
    summary = (
        f"{_fmt(changed)} of {_fmt(total)} parameters changed ({_fmt_pct(fraction)}); "
        f"{_fmt(params.get('identical_tensors'))} of {_fmt(params.get('total_tensors'))} "
        "tensors bit-identical to the model before."
    )
    modules = [m for m in params.get("modules") or [] if isinstance(m, Mapping)]
    rows = [
        [
            _text(m.get("name")),
            m.get("layer"),
            m.get("numel"),
            m.get("changed"),
            _fmt_pct(m.get("fraction_changed")),
            m.get("l2"),
            "yes" if m.get("identical") else "no",
        ]
        for m in modules
    ]
    n_changed = sum(1 for m in modules if not m.get("identical"))
    table = _table(
        ["tensor", "layer", "numel", "changed", "fraction", "L2 of the change", "identical"], rows
    )
    return _section_body(
        "parameters",
        title,
        [
            f"<p>{_e(summary)}</p>",
            _plot(
                "layer_figure",
                params,
                "Fraction of parameters changed per layer",
                "no per-tensor rows in the report",
            ),
            f"<details><summary>{_e(f'per tensor ({len(modules)} tensors, {n_changed} changed)')}"
            f"</summary>{table}</details>"
            if modules
            else _unavailable("no per-tensor rows"),
        ],
    )


def _relearning_section(report: Mapping[str, Any]) -> str:
    title = "Relearning robustness"
    section = report.get("relearning")
    if not isinstance(section, Mapping) or not section.get("available", False):
        reason = _reason(section, MISSING) if isinstance(section, Mapping) else MISSING
        return _section_body("relearning", title, [_unavailable(reason)])
    prob = _mapping(section.get("probability"))
    rows = [
        ["fine-tuning steps on the relearn part", section.get("steps")],
        [
            "forget examples relearned on / evaluated on",
            f"{_fmt(section.get('n_relearn'))} / {_fmt(section.get('n_eval'))}",
        ],
        ["probability before unlearning", prob.get("before")],
        ["probability after unlearning", prob.get("after")],
        ["probability after relearning", prob.get("relearned")],
        [
            "recovered fraction (relearned − after) / (before − after)",
            section.get("recovered_fraction"),
        ],
    ]
    return _section_body("relearning", title, [_table(["quantity", "value"], rows)])


# --- HTML building blocks


def _section_body(anchor: str, title: str, parts: Iterable[str]) -> str:
    inner = "\n".join(parts)
    return f'<section id="{anchor}">\n<h2>{_e(title)}</h2>\n{inner}\n</section>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _cell(value: Any) -> str:
    if isinstance(value, _Safe):
        return f"<td>{value}</td>"
    if _number(value) is not None:
        return f'<td class="num">{_e(_fmt(value))}</td>'
    if value is None:
        return '<td class="na">—</td>'
    return f"<td>{_e(value)}</td>"


def _text(value: Any) -> _Safe:
    """A long data string, shortened for the page (the JSON keeps it whole) and escaped."""
    text = "" if value is None else str(value)
    if len(text) > _TEXT_LIMIT:
        text = text[:_TEXT_LIMIT] + "…"
    return _Safe(f'<span class="text">{_e(text)}</span>')


def _code(value: Any) -> _Safe:
    return _Safe(f"<code>{_e(value)}</code>") if value else _Safe('<span class="na">—</span>')


def _unavailable(reason: Any) -> str:
    return f'<p class="na">not available: {_e(reason)}</p>'


def _plot(name: str, data: Any, caption: str, reason: str) -> str:
    from analysis import plots  # matplotlib loads only when a page is drawn

    draw: Callable[[Any], bytes | None] = getattr(plots, name)
    try:
        png = draw(data) if isinstance(data, Mapping) else None
    except (ValueError, TypeError, OverflowError) as error:  # odd data: say so, keep the page
        png, reason = None, f"the figure could not be drawn ({type(error).__name__}: {error})"
    if png is None:
        return _unavailable(f"{caption.lower()}: {reason}")
    data_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="{data_url}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;
background:#fff;max-width:1140px;margin:0 auto;padding:16px 24px 48px}
header h1{margin-bottom:0}header p{color:#555;margin-top:4px}
h2{border-bottom:2px solid #d8d8e0;padding-bottom:4px;margin-top:36px}h3{margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid #d4d4dc;padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#eef0f6}tbody tr:nth-child(even){background:#f8f9fc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.text{display:inline-block;max-width:380px;overflow-wrap:anywhere;white-space:pre-wrap}
code{font-size:12px;overflow-wrap:anywhere}
.na{color:#8a5a00;font-style:italic}.warn{color:#9b1c1c;font-weight:600}.guide{color:#555;max-width:900px}
#headline table{font-size:14px}#headline td:nth-child(2){font-weight:600;white-space:nowrap}
figure{margin:12px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:12px}details{margin:8px 0}summary{cursor:pointer;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:4px 28px}.split{max-width:360px}
footer{margin-top:40px;color:#777;font-size:12px}
"""


# ----------------------------------------------------------------------------- Markdown


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


def warnings_of(report: Mapping[str, Any]) -> list[str]:
    """The report's warnings (sentences about its inputs), as strings."""
    found = report.get("warnings")
    return [str(w) for w in found] if isinstance(found, list) else []


def _standing(report: Mapping[str, Any]) -> list[str]:
    """A few plain sentences on models, membership inference, relearning and gaps."""
    lines = []
    for role, model in _ordered(_mapping(report.get("models")), ROLES):
        if isinstance(model, Mapping):
            fingerprint = str(model.get("fingerprint") or "?")[:12]
            lines.append(f"{role}: {model.get('path') or '(in memory)'} ({fingerprint})")
    splits = _mapping(report.get("splits"))
    if splits:
        sizes = ", ".join(f"{k} {_fmt(_get(v, 'n'))}" for k, v in _ordered(splits, SPLITS))
        lines.append(f"examples per split: {sizes}")
    membership = report.get("membership")
    if isinstance(membership, Mapping) and membership.get("available"):
        aucs = [
            f"{role} {_fmt(_get(membership, role, 'attacks', 'loss', 'auc'))}"
            for role in ROLES
            if isinstance(_get(membership, role), Mapping)
        ]
        lines.append("membership inference, LOSS attack AUC: " + ", ".join(aucs))
    else:
        lines.append(f"membership inference: not available: {_reason(membership, MISSING)}")
    relearn = report.get("relearning")
    if isinstance(relearn, Mapping) and relearn.get("available"):
        lines.append(
            f"relearning: {_fmt_pct(relearn.get('recovered_fraction'))} of the forgotten "
            f"probability came back after {_fmt(relearn.get('steps'))} steps"
        )
    else:
        lines.append(f"relearning: not available: {_reason(relearn, MISSING)}")
    return lines


def _md(value: Any) -> str:
    """A data string made safe in a Markdown table cell: one line, markup escaped."""
    text = " ".join(str(value).split())
    for char in "\\|<>`":
        text = text.replace(char, "\\" + char)
    return text


# ----------------------------------------------------------------------------- formatting


def _fmt(value: Any) -> str:
    """A number as a reader wants it: integers with separators, floats to 4 significant."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3e}" if value and not 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _fmt_p(value: Any) -> str:
    return f"{value:.3g}" if _number(value) is not None and math.isfinite(value) else _fmt(value)


def _fmt_pct(value: Any) -> str:
    if _number(value) is None or not math.isfinite(value):
        return _fmt(value)
    return f"{100 * value:.3g}%"


def _ci(stats: Mapping[str, Any]) -> str:
    if stats.get("ci_low") is None and stats.get("ci_high") is None:
        return "n/a"
    return f"[{_fmt(stats.get('ci_low'))}, {_fmt(stats.get('ci_high'))}]"


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _reason(entry: Any, default: str) -> str:
    reason = entry.get("reason") if isinstance(entry, Mapping) else None
    return str(reason) if reason else default


# ----------------------------------------------------------------------------- access


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _keys_in_order(keys: Iterable[Any], known: tuple[str, ...]) -> list[str]:
    """The known keys in their usual order, then any others sorted."""
    keys = {str(k) for k in keys}
    return [k for k in known if k in keys] + sorted(keys - set(known))


def _ordered(mapping: Mapping[str, Any], known: tuple[str, ...]) -> list[tuple[str, Any]]:
    by_name = {str(k): v for k, v in mapping.items()}
    return [(k, by_name[k]) for k in _keys_in_order(by_name, known)]

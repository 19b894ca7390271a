"""``report.html``: the audit report as one self-contained page, section by section.

:func:`render_html` builds the page from the headline, metrics, forget quality, membership
inference, knowledge shift, parameter and relearning sections, with the style sheet of
:mod:`analysis.report_style` inline, no script, plots as embedded PNG (``data:`` URLs, see
:mod:`analysis.plots`) and a Content-Security-Policy (:data:`CSP`) that allows nothing
else. Every string taken from the report is HTML-escaped (:func:`_e`, or :class:`_Safe`
for HTML built here from escaped parts); a section whose data are missing says
``not available: <reason>``.

>>> "&lt;script&gt;" in render_html({"schema": "excise-audit/1", "warnings": ["<script>"]})
True
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from analysis.report_format import (
    ATTACKS,
    METRICS,
    MISSING,
    ROLES,
    SHIFT_ORDER,
    SPLITS,
    as_mapping,
    as_number,
    check_report,
    fmt,
    fmt_p,
    fmt_pct,
    get_in,
    headline_rows,
    keys_in_order,
    ordered,
    reason_of,
    warnings_of,
)
from analysis.report_style import CSS

_TEXT_LIMIT = 400  # characters of a prompt or completion shown in a table cell
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


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
        f"<title>excise audit report</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"{body}\n<footer>schema {_e(report.get('schema'))} · written by excise "
        f"{_e(report.get('excise_version', 'unknown'))}</footer>\n</body>\n</html>\n"
    )


def _header(report: Mapping[str, Any]) -> str:
    models = as_mapping(report.get("models"))
    model_rows = [
        [role, _text(get_in(m, "path") or "(in memory)"), _code(get_in(m, "fingerprint"))]
        for role, m in ordered(models, ROLES)
        if m is not None
    ]
    split_rows = [
        [name, get_in(s, "n"), _code(get_in(s, "sha256"))]
        for name, s in ordered(as_mapping(report.get("splits")), SPLITS)
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
    rows = [[k.replace("_", " "), v] for k, v in as_mapping(report.get("definitions")).items()]
    rows += [
        [f"seconds: {stage}", value] for stage, value in as_mapping(report.get("seconds")).items()
    ]
    if not rows:
        return ""
    return (
        "<details><summary>Definitions and the audit's stage timings</summary>"
        + _table(["", ""], rows)
        + "</details>"
    )


# --- headline


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


def _metrics_section(report: Mapping[str, Any]) -> str:
    metrics = report.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        return _section_body("metrics", "Metrics per split", [_unavailable(MISSING)])
    blocks = []
    for split, per_role in ordered(metrics, SPLITS):
        roles = [r for r, v in ordered(as_mapping(per_role), ROLES) if isinstance(v, Mapping)]
        names = keys_in_order({k for r in roles for k in as_mapping(per_role[r])}, METRICS)
        rows, notes = [], []
        for name in names:
            row: list[Any] = [name]
            for role in roles:
                entry = get_in(per_role, role, name)
                row.append(get_in(entry, "value") if get_in(entry, "value") is not None else "n/a")
                if get_in(entry, "value") is None:
                    notes.append(f"{name} ({role}): not available: {reason_of(entry, MISSING)}")
            rows.append(row)
        table = _table(["metric", *roles], rows) if rows else _unavailable(MISSING)
        notes_html = "".join(f'<p class="na">{_e(note)}</p>' for note in notes)
        blocks.append(f'<div class="split"><h3>{_e(split)}</h3>{table}{notes_html}</div>')
    parts = [f'<div class="grid">{"".join(blocks)}</div>']
    parts.append(
        _plot(
            "truth_ratio_figure",
            dict(ordered(as_mapping(metrics.get("forget")), ROLES)),
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
    for role, entry in ordered(section, ROLES):
        if get_in(entry, "available"):
            rows.append(
                [
                    role,
                    fmt_p(get_in(entry, "p_value")),
                    get_in(entry, "ks_statistic"),
                    get_in(entry, "n"),
                    get_in(entry, "n_reference"),
                ]
            )
        else:
            notes.append(f"{role}: not available: {reason_of(entry, MISSING)}")
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
        return _section_body("membership", title, [_unavailable(reason_of(section, MISSING))])
    roles = [r for r in ROLES if isinstance(get_in(section, r, "attacks"), Mapping)]
    attacks = keys_in_order({a for r in roles for a in section[r]["attacks"]}, ATTACKS)
    rows = [[a, *(get_in(section, r, "attacks", a, "auc") for r in roles)] for a in attacks]
    parts = [_table(["attack (ROC AUC)", *roles], rows) if rows else _unavailable(MISSING)]
    parts.append(
        f'<p class="guide">Min-K% and Min-K%++ at k = {_e(fmt(section.get("k")))}; zlib on '
        "the decoded answer tokens; the final end-of-sequence label left out.</p>"
    )
    privleak = section.get("privleak")
    if isinstance(privleak, Mapping) and privleak:
        p_roles = [r for r, v in ordered(privleak, ROLES) if isinstance(v, Mapping)]
        names = keys_in_order({a for r in p_roles for a in privleak[r]}, ATTACKS)
        p_rows = [[a, *(get_in(privleak, r, a) for r in p_roles)] for a in names]
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
    for split, entry in ordered(shift, SHIFT_ORDER):
        change, kl = as_mapping(get_in(entry, "log_prob_change")), as_mapping(get_in(entry, "kl"))
        rows.append(
            [
                split,
                get_in(entry, "n"),
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
            dict(ordered(shift, SHIFT_ORDER)),
            "Per-example change in completion log-probability, per split (dashed: mean)",
            "no per-example shift values",
        ),
    ]
    for split, entry in ordered(shift, SHIFT_ORDER):
        parts.append(_most_shifted(split, get_in(entry, "most_shifted"), split == "neighbor"))
    parts += _foresight(report.get("foresight"))
    return _section_body("shift", title, parts)


def _foresight(section: Any) -> list[str]:
    """How well influence foresaw the collateral (``excise forget`` adds it), per split."""
    if not isinstance(section, Mapping) or not section:
        return []
    rows = [
        [split, get_in(entry, "n"), get_in(entry, "spearman"), _text(get_in(entry, "reason") or "")]
        for split, entry in ordered(section, SHIFT_ORDER)
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
            _text(get_in(x, "id")),
            _text(get_in(x, "prompt")),
            _text(get_in(x, "completion")),
            get_in(x, "log_prob_change"),
            get_in(x, "kl"),
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
    known = as_number(changed) is not None and as_number(total) is not None and total > 0
    fraction = changed / total if known else None
    summary = (
        f"{fmt(changed)} of {fmt(total)} parameters changed ({fmt_pct(fraction)}); "
        f"{fmt(params.get('identical_tensors'))} of {fmt(params.get('total_tensors'))} "
        "tensors bit-identical to the model before."
    )
    modules = [m for m in params.get("modules") or [] if isinstance(m, Mapping)]
    rows = [
        [
            _text(m.get("name")),
            m.get("layer"),
            m.get("numel"),
            m.get("changed"),
            fmt_pct(m.get("fraction_changed")),
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
        reason = reason_of(section, MISSING) if isinstance(section, Mapping) else MISSING
        return _section_body("relearning", title, [_unavailable(reason)])
    prob = as_mapping(section.get("probability"))
    rows = [
        ["fine-tuning steps on the relearn part", section.get("steps")],
        [
            "forget examples relearned on / evaluated on",
            f"{fmt(section.get('n_relearn'))} / {fmt(section.get('n_eval'))}",
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
    if as_number(value) is not None:
        return f'<td class="num">{_e(fmt(value))}</td>'
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


def _ci(stats: Mapping[str, Any]) -> str:
    if stats.get("ci_low") is None and stats.get("ci_high") is None:
        return "n/a"
    return f"[{fmt(stats.get('ci_low'))}, {fmt(stats.get('ci_high'))}]"

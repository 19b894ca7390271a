"""What every renderer of the audit report shares: the schema check and a few helpers.

The ``excise-audit/1`` schema and :func:`check_report`; the names of the models, splits,
metrics and attacks in the order the report shows them; :func:`headline_rows`, the
headline table as plain text (the HTML page, ``report.md`` and the command line show it);
and the formatting and dict-walking helpers the renderers use. Nothing here escapes:
:mod:`analysis.report_html` and :mod:`analysis.report_markdown` do, each for its format.

>>> fmt(1234567), fmt(0.000123456), fmt_pct(0.0123), fmt(None)
('1,234,567', '1.235e-04', '1.23%', 'n/a')
>>> ordered({"x": 1, "after": 2, "before": 3}, ROLES)
[('before', 3), ('after', 2), ('x', 1)]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

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


class ReportError(InputError):
    """The dict is not an ``excise-audit/1`` report, or holds what JSON cannot."""


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


# ----------------------------------------------------------------------------- headline


def headline_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(measure, value, detail) rows of the headline table, as plain unescaped text."""
    head = as_mapping(report.get("headline"))
    fq_after = get_in(report, "forget_quality", "after")
    if as_number(head.get("forget_quality")) is not None:
        fq = (
            fmt_p(head["forget_quality"]),
            f"KS statistic D = {fmt(get_in(fq_after, 'ks_statistic'))}; "
            f"n = {fmt(get_in(fq_after, 'n'))} forget, "
            f"{fmt(get_in(fq_after, 'n_reference'))} reference",
        )
    else:
        fq = ("n/a", f"not available: {reason_of(fq_after, 'no reference model')}")
    ref_p = head.get("forget_probability_reference")
    ref_mu = get_in(report, "model_utility", "reference", "value")
    rows = [
        ("forget quality (KS p-value, after vs reference)", *fq),
        _null_row(report),
        (
            "forget probability, before → after",
            f"{fmt(head.get('forget_probability_before'))} → "
            f"{fmt(head.get('forget_probability_after'))}",
            "reference (retrained without the forget set): "
            + (fmt(ref_p) if ref_p is not None else "not available: no reference model"),
        ),
        (
            "model utility, before → after",
            f"{fmt(head.get('model_utility_before'))} → {fmt(head.get('model_utility_after'))}",
            _utility_definition(report)
            + "; reference: "
            + (fmt(ref_mu) if ref_mu is not None else "not available"),
        ),
        _privleak_row(report),
        _shift_row(report, "neighbor", "neighbour shift: mean Δ log p (after − before)"),
        _shift_row(report, "retain", "retain shift: mean Δ log p (after − before)"),
        (
            "edited parameters",
            fmt_pct(head.get("changed_parameters_fraction")),
            f"{fmt(get_in(report, 'parameters', 'changed_parameters'))} of "
            f"{fmt(get_in(report, 'parameters', 'total_parameters'))} parameters changed",
        ),
        (
            "identical tensors",
            f"{fmt(head.get('identical_tensors'))} of {fmt(head.get('total_tensors'))}",
            "tensors bit-identical to the model before",
        ),
    ]
    return rows


def _utility_definition(report: Mapping[str, Any]) -> str:
    """Which model utility the report shows: TOFU's 9 components, or the splits it had."""
    utility = as_mapping(get_in(report, "model_utility", "after"))
    definition = utility.get("definition")
    n = len(as_mapping(utility.get("components")))
    if definition == "tofu":
        return "TOFU's: harmonic mean of 9 (retain, real authors, world facts)"
    if not definition:
        return "harmonic mean"
    return f"harmonic mean of {n} on {definition} (TOFU's 9 need real_authors)"


def _privleak_row(report: Mapping[str, Any]) -> tuple[str, str, str]:
    """MUSE's privleak of the unlearned model (Min-K%), or why it is not there."""
    label = "privleak (MUSE, Min-K%)"
    value = as_number(as_mapping(report.get("headline")).get("privleak"))
    if value is None:
        membership = as_mapping(report.get("membership"))
        why = (
            reason_of(membership, "no reference model")
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
    null = as_mapping(report.get("forget_quality_null"))
    if not null.get("available"):
        return label, "n/a", f"not available: {reason_of(null, 'no holdout split')}"
    verdict = "within" if null.get("within_p90") else "outside"
    return (
        label,
        f"D = {fmt(null.get('after_d'))} ({verdict} the null's 90th percentile)",
        f"null over {fmt(null.get('draws'))} draws of the original model with holdout names "
        f"swapped in, against the {null.get('target')}: median {fmt(null.get('median'))}, "
        f"90th percentile {fmt(null.get('p90'))}; its D is at or above "
        f"{fmt_pct(null.get('after_percentile'))} of the draws",
    )


def _shift_row(report: Mapping[str, Any], split: str, label: str) -> tuple[str, str, str]:
    entry = get_in(report, "shift", split)
    change = get_in(entry, "log_prob_change")
    if not isinstance(change, Mapping):
        return label, "n/a", f"not available: no {split} split"
    detail = (
        f"95% CI [{fmt(change.get('ci_low'))}, {fmt(change.get('ci_high'))}]; "
        f"median {fmt(change.get('median'))}; "
        f"mean KL {fmt(get_in(entry, 'kl', 'mean'))}; n = {fmt(get_in(entry, 'n'))}"
    )
    return label, fmt(change.get("mean")), detail


def warnings_of(report: Mapping[str, Any]) -> list[str]:
    """The report's warnings (sentences about its inputs), as strings."""
    found = report.get("warnings")
    return [str(w) for w in found] if isinstance(found, list) else []


# ----------------------------------------------------------------------------- formatting


def fmt(value: Any) -> str:
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


def fmt_p(value: Any) -> str:
    """A p-value to 3 significant digits (anything else as :func:`fmt` writes it)."""
    return f"{value:.3g}" if as_number(value) is not None and math.isfinite(value) else fmt(value)


def fmt_pct(value: Any) -> str:
    """A fraction as a percentage to 3 significant digits."""
    if as_number(value) is None or not math.isfinite(value):
        return fmt(value)
    return f"{100 * value:.3g}%"


def as_number(value: Any) -> float | None:
    """``value`` as a float if it is an int or float (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def reason_of(entry: Any, default: str) -> str:
    """The ``reason`` an entry gives for being unavailable, or ``default``."""
    reason = entry.get("reason") if isinstance(entry, Mapping) else None
    return str(reason) if reason else default


# ----------------------------------------------------------------------------- access


def get_in(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or ``None`` where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def as_mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def keys_in_order(keys: Iterable[Any], known: tuple[str, ...]) -> list[str]:
    """The known keys in their usual order, then any others sorted."""
    keys = {str(k) for k in keys}
    return [k for k in known if k in keys] + sorted(keys - set(known))


def ordered(mapping: Mapping[str, Any], known: tuple[str, ...]) -> list[tuple[str, Any]]:
    """The (key, value) pairs with keys as strings, in :func:`keys_in_order`."""
    by_name = {str(k): v for k, v in mapping.items()}
    return [(k, by_name[k]) for k in keys_in_order(by_name, known)]

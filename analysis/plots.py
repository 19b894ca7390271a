"""The audit report's figures, drawn with matplotlib's Agg backend as PNG bytes.

Each function takes one section of an ``excise-audit/1`` report (see
:mod:`analysis.report`) and returns the PNG bytes of one figure, or ``None`` when the
section holds nothing to draw. Figures are built with :class:`matplotlib.figure.Figure`
directly, never through ``pyplot``: no global figure registry, no backend switch, nothing
left open. Labels never parse ``$…$`` as maths, so any string from the data prints as is.

- :func:`truth_ratio_figure`: the distribution of the per-question truth ratio R on the
  forget split per model (histogram of log₁₀ R and its empirical CDF, whose largest
  vertical gap between two models is the KS statistic of forget quality);
- :func:`shift_figure`: per split, the histogram of the per-example change in completion
  log-probability, after − before;
- :func:`layer_figure`: per layer, the fraction of parameters that changed, Σ changed /
  Σ numel over the layer's tensors (tensors outside the blocks form one "other" bar);
- :func:`roc_figure`: per model, the ROC curve of each membership-inference attack.

>>> png = layer_figure({"modules": [
...     {"name": "a", "layer": 0, "numel": 4, "changed": 1},
...     {"name": "b", "layer": 1, "numel": 4, "changed": 0}]})
>>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
>>> layer_figure({"modules": []}) is None
True
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

ROLE_COLOURS = {"before": "#1f77b4", "after": "#d62728", "reference": "#2ca02c"}
_RC = {"text.parse_math": False, "font.size": 9, "axes.titlesize": 10}


def _local_style(draw: Callable[..., bytes | None]) -> Callable[..., bytes | None]:
    """Run ``draw`` under the report's rc settings, restored afterwards (no global change)."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> bytes | None:
        from matplotlib import rc_context

        with rc_context(_RC):
            return draw(*args, **kwargs)

    return wrapper


@_local_style
def truth_ratio_figure(forget_metrics: Mapping[str, Any]) -> bytes | None:
    """Histogram and ECDF of log₁₀ R on the forget split, one series per model role."""
    series = {
        role: values
        for role, entry in _items(forget_metrics)
        if (values := _positive(_get(entry, "truth_ratio", "per_example"))).size
    }
    if not series:
        return None
    logs = {role: np.log10(values) for role, values in series.items()}
    bins = np.histogram_bin_edges(np.concatenate(list(logs.values())), bins=30)
    fig, (hist, ecdf) = _figure(1, 2, (10.0, 3.4))
    for role, values in logs.items():
        colour = ROLE_COLOURS.get(role)
        label = f"{role} (n={values.size})"
        hist.hist(values, bins=bins, histtype="step", linewidth=1.6, color=colour, label=label)
        fraction = np.arange(1, values.size + 1) / values.size
        ecdf.step(np.sort(values), fraction, where="post", color=colour, label=label)
    hist.set(title="truth ratio R per question (forget split)", xlabel="log10 R", ylabel="count")
    ecdf.set(title="empirical CDF", xlabel="log10 R", ylabel="fraction ≤ x")
    hist.legend(fontsize=8)
    ecdf.legend(fontsize=8, loc="lower right")
    return _png(fig)


@_local_style
def shift_figure(shift: Mapping[str, Any]) -> bytes | None:
    """One histogram per split of the per-example log-probability change (after − before)."""
    series = {
        split: values
        for split, entry in _items(shift)
        if (values := _finite(_get(entry, "log_prob_change", "per_example"))).size
    }
    if not series:
        return None
    fig, axes = _figure(1, len(series), (3.2 * len(series) + 0.8, 3.0))
    for ax, (split, values) in zip(axes, series.items(), strict=True):
        ax.hist(values, bins=30, color="#7f7f7f")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.axvline(float(values.mean()), color="#d62728", linewidth=1.2, linestyle="--")
        ax.set(title=f"{split} (n={values.size})", xlabel="Δ log p(completion)", ylabel="count")
    return _png(fig)


@_local_style
def layer_figure(parameters: Mapping[str, Any]) -> bytes | None:
    """Bar chart of the fraction of parameters changed per layer (Σ changed / Σ numel)."""
    totals = _layer_totals(parameters.get("modules") or [])
    if not totals:
        return None
    labels = [label for label, _ in totals]
    fractions = [changed / numel if numel else 0.0 for _, (changed, numel) in totals]
    rotate = len(labels) > 16
    size = (max(4.0, 0.3 * len(labels) + 1.5), 3.4)
    fig, (ax,) = _figure(1, 1, size, bottom=1.0 if rotate else 0.55)
    bars = ax.bar(range(len(labels)), fractions, color="#9467bd")
    ax.bar_label(bars, labels=[_percent(f) for f in fractions], fontsize=7, padding=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90 if rotate else 0)
    ax.set_ylim(0.0, max(max(fractions) * 1.2, 1e-6))
    ax.set(title="edited parameters per layer", xlabel="layer", ylabel="fraction changed")
    return _png(fig)


@_local_style
def roc_figure(membership: Mapping[str, Any]) -> bytes | None:
    """ROC curves of every attack, one panel per model role, with the AUC in the legend."""
    panels = {}
    for role in ("before", "after", "reference"):
        curves = [
            (name, fpr, tpr, _get(attack, "auc"))
            for name, attack in _items(_get(membership, role, "attacks"))
            if (fpr := _finite(_get(attack, "roc", "fpr"))).size
            and (tpr := _finite(_get(attack, "roc", "tpr"))).size == fpr.size
        ]
        if curves:
            panels[role] = curves
    if not panels:
        return None
    fig, axes = _figure(1, len(panels), (3.4 * len(panels) + 0.6, 3.4))
    for ax, (role, curves) in zip(axes, panels.items(), strict=True):
        for name, fpr, tpr, auc in curves:
            ax.plot(fpr, tpr, linewidth=1.4, label=f"{name} (AUC {_short(auc)})")
        ax.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle=":")
        ax.set(
            title=f"{role}: forget vs holdout",
            xlim=(-0.02, 1.02),
            ylim=(-0.02, 1.02),
            aspect="equal",
        )
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _layer_totals(modules: Iterable[Any]) -> list[tuple[str, tuple[int, int]]]:
    """[(label, (changed, numel))] per layer in order, then "other" for layer-less tensors."""
    layers: dict[int, list[int]] = {}
    other = [0, 0]
    for row in modules:
        if not isinstance(row, Mapping):
            continue
        changed, numel = _count(row.get("changed")), _count(row.get("numel"))
        layer = row.get("layer")
        slot = layers.setdefault(layer, [0, 0]) if _is_int(layer) else other
        slot[0] += changed
        slot[1] += numel
    totals = [(str(k), (v[0], v[1])) for k, v in sorted(layers.items())]
    if other[1]:
        totals.append(("other", (other[0], other[1])))
    return totals


def _figure(
    rows: int, cols: int, size: tuple[float, float], bottom: float = 0.55
) -> tuple[Any, Any]:
    """A bare Figure (no pyplot, no global registry) with margins fixed in inches.

    Fixed margins instead of a layout engine: it halves the drawing time.
    """
    from matplotlib.figure import Figure

    width, height = size
    fig = Figure(figsize=size, dpi=100)
    fig.subplots_adjust(
        left=0.7 / width,
        right=1 - 0.15 / width,
        bottom=bottom / height,
        top=1 - 0.35 / height,
        wspace=0.35,
    )
    return fig, fig.subplots(rows, cols, squeeze=False).ravel()


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    fig.clear()
    return buffer.getvalue()


def _items(mapping: Any) -> list[tuple[str, Any]]:
    return [(str(k), v) for k, v in mapping.items()] if isinstance(mapping, Mapping) else []


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _finite(values: Any) -> np.ndarray:
    """The finite numbers of a list (anything else dropped), as float64."""
    if not isinstance(values, list | tuple):
        return np.zeros(0)
    numbers = [float(v) for v in values if _is_number(v)]
    array = np.asarray(numbers, dtype=np.float64)
    return array[np.isfinite(array)]


def _positive(values: Any) -> np.ndarray:
    array = _finite(values)
    return array[array > 0]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> int:
    return int(value) if _is_number(value) and math.isfinite(value) else 0


def _percent(fraction: float) -> str:
    """``0`` stays ``0`` (nothing changed), anything else shows two significant digits."""
    return "0" if fraction == 0 else f"{100 * fraction:.2g}%"


def _short(value: Any) -> str:
    return f"{value:.3f}" if _is_number(value) and math.isfinite(value) else "n/a"

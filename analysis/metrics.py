"""The per-split metrics as a registry of functions over one split's scores.

Each metric is a function of a :class:`SplitScores` — one model on one split — that returns
``{"value", "per_example"}`` or, when it cannot be computed, ``{"value": None, "reason"}``
(:func:`analysis.rouge.unavailable`): one shape for every metric, so an audit can select
metrics, skip them, and say why one is missing. What the metrics share is computed once,
lazily: the teacher-forced token statistics of the answers (one forward pass per model and
split, :func:`analysis.memorization.token_statistics`) and the paraphrased and perturbed
answers' scores for the truth ratio.

>>> sorted(METRICS)
['exact_memorization', 'extraction_strength', 'probability', 'rouge_l_recall', 'truth_ratio']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from torch import nn

from analysis.memorization import TokenStatistics, memorization_metrics, token_statistics
from analysis.rouge import rouge_l_recall, unavailable
from analysis.truth import (
    DEFAULT_QUESTION,
    answer_log_probs,
    truth_ratio_fields_missing,
    truth_ratio_metric,
)
from analysis.utility import normalised_probability_metric, probability_metric
from attribution.errors import InputError
from attribution.task import Task

NORMALISED_SPLITS = ("real_authors", "world")  # probability against the wrong answers (TOFU)


@dataclass
class SplitScores:
    """One model on one split, and what its metrics share (each computed at most once)."""

    model: nn.Module
    task: Task
    split: str
    records: Sequence[Mapping[str, Any]]
    batch_size: int = 32
    progress: bool | None = None
    question: str = DEFAULT_QUESTION
    given_stats: TokenStatistics | None = field(default=None, repr=False)

    @cached_property
    def stats(self) -> TokenStatistics:
        """Teacher-forced token statistics of the answers (the one forward pass)."""
        if self.given_stats is not None:
            return self.given_stats
        return token_statistics(self.model, self.task, self.records, **self.options)

    @cached_property
    def answers(self) -> tuple[np.ndarray, list[np.ndarray]] | str:
        """Mean log-probs of the paraphrased and perturbed answers, or why there are none."""
        reason = truth_ratio_fields_missing(self.records)
        if reason is not None:
            return reason
        return answer_log_probs(
            self.model, self.task, self.records, question=self.question, **self.options
        )

    @property
    def options(self) -> dict[str, Any]:
        """The batching options every pass over the split uses."""
        return {"batch_size": self.batch_size, "progress": self.progress}


def probability(scores: SplitScores) -> dict[str, Any]:
    """exp(−mean token NLL) of the answer; on world-fact splits, against the wrong answers."""
    if scores.split in NORMALISED_SPLITS and not isinstance(scores.answers, str):
        return normalised_probability_metric(*scores.answers)
    return probability_metric(scores.stats.scores)


def truth_ratio(scores: SplitScores) -> dict[str, Any]:
    """TOFU's truth ratio (the forget aggregate on the forget split)."""
    if isinstance(scores.answers, str):
        return unavailable(scores.answers)
    return truth_ratio_metric(*scores.answers, forget=scores.split == "forget")


def rouge(scores: SplitScores) -> dict[str, Any]:
    """ROUGE-L recall of greedy generations (:mod:`analysis.rouge`)."""
    return rouge_l_recall(scores.model, scores.task, scores.records, **scores.options)


def _memorization(name: str) -> Callable[[SplitScores], dict[str, Any]]:
    def metric(scores: SplitScores) -> dict[str, Any]:
        return memorization_metrics(scores.stats)[name]

    metric.__doc__ = f"{name.replace('_', ' ')} (:mod:`analysis.memorization`)."
    return metric


METRICS: dict[str, Callable[[SplitScores], dict[str, Any]]] = {
    "probability": probability,
    "rouge_l_recall": rouge,
    "truth_ratio": truth_ratio,
    "exact_memorization": _memorization("exact_memorization"),
    "extraction_strength": _memorization("extraction_strength"),
}


def check_metric_names(names: Sequence[str] | None) -> tuple[str, ...]:
    """The selected metric names (all when None), refusing unknown ones."""
    if names is None:
        return tuple(METRICS)
    unknown = sorted(set(names) - set(METRICS))
    if unknown:
        raise InputError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return tuple(name for name in METRICS if name in names)


def split_metrics(
    model: nn.Module,
    task: Task,
    split: str,
    records: Sequence[Mapping[str, Any]],
    *,
    stats: TokenStatistics | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
    question: str = DEFAULT_QUESTION,
    metrics: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every metric of one model on one split (``{"probability": {...}, ...}``); metrics not
    in ``metrics`` (default: all) are marked unavailable, "not selected"."""
    selected = check_metric_names(metrics)
    scores = SplitScores(model, task, split, records, batch_size, progress, question, stats)
    return {
        name: metric(scores) if name in selected else unavailable("not selected")
        for name, metric in METRICS.items()
    }

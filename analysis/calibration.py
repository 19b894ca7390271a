"""What "never learned" looks like, as a number a run can stop on.

A model that never saw a person answers questions about them with truth ratios (TOFU's
R = P̄(perturbed) / P(paraphrased)) spread like its answers about anyone else it never saw.
So, with no retrained model at hand, the target distribution is the **original** model's
truth ratios on the holdout split (people never trained on); with a reference model
retrained without the forget set, it is the reference's truth ratios on the forget split.
:class:`TruthRatioMatch` measures the two-sample KS statistic

    D = sup_x |F_model(x) − F_target(x)|

between the model's forget-split truth ratios and that target (lower: closer to never
having learned). The unlearning loop takes it as a calibrated stop
(:class:`unlearn.monitor.Criterion`) and ends where D was lowest.

The same D is judged against its noise floor by :func:`stranger_null`: the original model
answering the forget questions about "perfect strangers" (each subject's full name replaced
by a random holdout person's) lands at some D from the target by chance alone; an unlearned
model within that null's 90th percentile is as close to "never learned" as a stranger is.

>>> match = TruthRatioMatch(None, [], np.array([0.2, 0.4]), "demo")
>>> match.distance(np.array([0.2, 0.4]))
0.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

from analysis.truth import (
    DEFAULT_QUESTION,
    answer_log_probs,
    truth_ratio_fields_missing,
    truth_ratios,
)
from attribution.data import subject_pool, substitute_subject
from attribution.errors import InputError
from attribution.task import Task


def split_truth_ratios(
    model: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    batch_size: int = 32,
    question: str = DEFAULT_QUESTION,
) -> np.ndarray:
    """R per record (TOFU's truth ratio), float64; refuses records without the answers."""
    reason = truth_ratio_fields_missing(records)
    if reason is not None:
        raise InputError(f"the calibrated stop needs truth ratios: {reason}")
    paraphrased, perturbed = answer_log_probs(
        model, task, records, batch_size=batch_size, progress=False, question=question
    )
    return truth_ratios(paraphrased, perturbed)


@dataclass
class TruthRatioMatch:
    """D between a model's truth ratios on ``records`` and ``target`` (a calibrated stop)."""

    task: Task
    records: Sequence[Mapping[str, Any]]
    target: np.ndarray
    name: str
    batch_size: int = 32

    def __call__(self, model: Any) -> float:
        return self.distance(split_truth_ratios(model, self.task, self.records, self.batch_size))

    def distance(self, ratios: np.ndarray) -> float:
        return float(ks_2samp(ratios, self.target).statistic)

    @classmethod
    def to_holdout(
        cls, original: Any, task: Task, forget: Sequence, holdout: Sequence
    ) -> TruthRatioMatch:
        """Target: the original model's truth ratios on people it never saw (no reference)."""
        target = split_truth_ratios(original, task, holdout)
        return cls(task, forget, target, "KS D of forget truth ratios vs the original on holdout")

    @classmethod
    def to_reference(cls, reference: Any, task: Task, forget: Sequence) -> TruthRatioMatch:
        """Target: the reference (retrained without the forget set) on the forget split."""
        target = split_truth_ratios(reference, task, forget)
        return cls(task, forget, target, "KS D of forget truth ratios vs the reference")


NULL_DRAWS = 20  # perfect-stranger draws of the gate's null distribution


def stranger_null(
    original: Any,
    task: Task,
    forget: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]],
    target: np.ndarray,
    after_ratios: np.ndarray,
    *,
    draws: int = NULL_DRAWS,
    seed: int = 0,
    batch_size: int = 32,
    question: str = DEFAULT_QUESTION,
) -> dict[str, Any]:
    """The perfect-stranger null of D and where the unlearned model falls in it.

    Each draw gives every forget subject a random holdout subject's full name (a different
    name per subject, in every text field), scores the **original** model's truth ratios on
    those records and takes D against ``target``. Returns the draws' D, their median and
    90th percentile, the unlearned model's D (``after_ratios`` against ``target``), the
    fraction of null draws at or below it, and whether it is within the 90th percentile.
    Unavailable (with a reason) when records name no subject or the pool is too small.
    """
    subjects, names = subject_pool(forget), subject_pool(holdout)
    names = [n for n in names if n not in set(subjects)]
    if not subjects or len(names) < len(subjects):
        return {
            "available": False,
            "reason": "the forget records name no subject"
            if not subjects
            else f"{len(names)} holdout subjects for {len(subjects)} forget subjects",
        }
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(draws):
        chosen = rng.choice(len(names), size=len(subjects), replace=False)
        swap = {s: names[i] for s, i in zip(subjects, chosen, strict=True)}
        records = [
            substitute_subject(r, r["subject"], swap[r["subject"]])
            if r.get("subject") in swap
            else dict(r)
            for r in forget
        ]
        null.append(
            float(
                ks_2samp(
                    split_truth_ratios(original, task, records, batch_size, question), target
                ).statistic
            )
        )
    null = np.asarray(null)
    after = float(ks_2samp(after_ratios, target).statistic)
    p90 = float(np.quantile(null, 0.9))
    return {
        "available": True,
        "draws": draws,
        "d": null.tolist(),
        "median": float(np.median(null)),
        "p90": p90,
        "after_d": after,
        "after_percentile": float(np.mean(null <= after)),
        "within_p90": after <= p90,
    }

"""Truth ratio and forget quality (TOFU, Maini et al. 2024).

Length-normalised probability of an answer a to a question q: P(a | q) = exp(−(1/|a|) Σₜ
NLLₜ), i.e. log P is the mean token log-probability. Per question, with the paraphrased
(correct) answer ã and the perturbed (wrong) answers â₁…â_m, all scored on the same
question q — the record's original ``prompt``, as TOFU scores them even when a reworded
question exists (``question="original"``, the default), or its ``paraphrased_prompt``
where it has one (``question="paraphrased"``):

    R = P̄(â) / P(ã),   P̄ the geometric mean:  log R = (1/m) Σⱼ log P(âⱼ | q) − log P(ã | q).

Aggregates: on the forget split, mean(min(R, 1/R)) (1 when the model cannot tell right
from wrong, as a model that never saw the facts); on the other splits, mean(max(0, 1 − R))
(high when the model prefers the right answer).

Forget quality: the p-value of the two-sample Kolmogorov–Smirnov test between the
per-question truth ratios of a model and those of the reference model (retrained without
the forget set), on the forget split. High p: the two distributions cannot be told apart.
The p-value shrinks with the sample size for the same effect (TOFU issue #142), so the KS
statistic D = supₓ |F₁(x) − F₂(x)| and both sample sizes are reported beside it. Without a
reference model the metric is marked unavailable, never invented.

>>> ratios = truth_ratios(np.log([0.5, 0.2]), [np.log([0.25, 0.25]), np.log([0.1, 0.4])])
>>> ratios.round(6).tolist()
[0.5, 1.0]
>>> truth_ratio_value(ratios, forget=True), truth_ratio_value(ratios, forget=False)
(0.75, 0.25)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from analysis.rouge import unavailable
from analysis.scoring import score_completions
from attribution.task import Task

_MAX_LOG_RATIO = 700.0  # exp(±700) stays a finite float64 (and valid JSON)
QUESTIONS = ("original", "paraphrased")  # which question the answers are scored after
DEFAULT_QUESTION = "original"  # TOFU's


def truth_ratios(
    paraphrased: Sequence[float] | np.ndarray, perturbed: Sequence[Sequence[float]]
) -> np.ndarray:
    """R per question from mean token log-probs: exp(mean(perturbed[i]) − paraphrased[i])."""
    paraphrased = np.asarray(paraphrased, dtype=np.float64)
    if len(perturbed) != paraphrased.shape[0]:
        raise ValueError(f"{paraphrased.shape[0]} paraphrased answers, {len(perturbed)} perturbed")
    log_ratio = np.array([np.mean(p) for p in perturbed], dtype=np.float64) - paraphrased
    return np.exp(np.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))


def truth_ratio_value(ratios: Sequence[float] | np.ndarray, *, forget: bool) -> float:
    """mean(min(R, 1/R)) on the forget split, mean(max(0, 1 − R)) elsewhere.

    >>> truth_ratio_value([2.0, 0.5], forget=True), truth_ratio_value([2.0, 0.5], forget=False)
    (0.5, 0.25)
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    if forget:
        return float(np.mean(np.minimum(ratios, 1.0 / ratios)))
    return float(np.mean(np.maximum(0.0, 1.0 - ratios)))


def truth_ratio_fields_missing(records: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the truth ratio cannot be computed on ``records``, or None when it can."""
    lacking = sum(
        not (r.get("paraphrased_completion") and r.get("perturbed_completions")) for r in records
    )
    if lacking:
        return (
            f"{lacking} of {len(records)} records lack paraphrased_completion or "
            "perturbed_completions"
        )
    if any("prompt" not in r for r in records):
        return "the truth ratio needs prompt/completion records"
    return None


def answer_log_probs(
    model: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    progress: bool | None = None,
    question: str = DEFAULT_QUESTION,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mean token log-probs log P(ã | q) per record and log P(âⱼ | q) per perturbed answer.

    Each (question, answer) pair is a derived ``{"prompt", "completion"}`` record, scored
    through ``task`` like any other record; ``question``: ``original`` (the ``prompt``) or
    ``paraphrased`` (the ``paraphrased_prompt`` where a record has one).
    """
    questions = [question_of(r, question) for r in records]
    answers = [[r["paraphrased_completion"], *r["perturbed_completions"]] for r in records]
    flat = [
        {"prompt": q, "completion": a}
        for q, group in zip(questions, answers, strict=True)
        for a in group
    ]
    scores = score_completions(model, task, flat, batch_size=batch_size, progress=progress)
    log_p = (-scores.nll / scores.n_tokens.clamp(min=1)).double().numpy()
    paraphrased, perturbed, start = [], [], 0
    for group in answers:
        paraphrased.append(log_p[start])
        perturbed.append(log_p[start + 1 : start + len(group)])
        start += len(group)
    return np.array(paraphrased), perturbed


def question_of(record: Mapping[str, Any], question: str = DEFAULT_QUESTION) -> str:
    """The question a record's answers are scored after (see :data:`QUESTIONS`).

    >>> record = {"prompt": "Where?", "paraphrased_prompt": "In which place?"}
    >>> question_of(record), question_of(record, "paraphrased")
    ('Where?', 'In which place?')
    """
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    if question == "paraphrased":
        return record.get("paraphrased_prompt") or record["prompt"]
    return record["prompt"]


def truth_ratio_metric(
    paraphrased: Sequence[float] | np.ndarray,
    perturbed: Sequence[Sequence[float]],
    *,
    forget: bool,
) -> dict[str, Any]:
    """``{"value": aggregate, "per_example": [R per question]}`` from mean token log-probs."""
    ratios = truth_ratios(paraphrased, perturbed)
    return {"value": truth_ratio_value(ratios, forget=forget), "per_example": ratios.tolist()}


def truth_ratio(
    model: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    *,
    forget: bool,
    batch_size: int = 32,
    progress: bool | None = None,
    question: str = DEFAULT_QUESTION,
) -> dict[str, Any]:
    """The truth-ratio metric of a split (unavailable when records lack the answers)."""
    reason = truth_ratio_fields_missing(records)
    if reason is not None:
        return unavailable(reason)
    paraphrased, perturbed = answer_log_probs(
        model, task, records, batch_size=batch_size, progress=progress, question=question
    )
    return truth_ratio_metric(paraphrased, perturbed, forget=forget)


def forget_quality(
    ratios: Sequence[float] | np.ndarray, reference_ratios: Sequence[float] | np.ndarray
) -> dict[str, Any]:
    """KS test of a model's forget-split truth ratios against the reference model's.

    >>> fq = forget_quality([0.1, 0.5, 0.9], [0.1, 0.5, 0.9])
    >>> fq["p_value"], fq["ks_statistic"], fq["n"], fq["n_reference"]
    (1.0, 0.0, 3, 3)
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    reference_ratios = np.asarray(reference_ratios, dtype=np.float64)
    if ratios.size == 0 or reference_ratios.size == 0:
        return forget_quality_unavailable("no truth ratios", ratios.size, reference_ratios.size)
    test = stats.ks_2samp(ratios, reference_ratios)
    return {
        "available": True,
        "p_value": float(test.pvalue),
        "ks_statistic": float(test.statistic),
        "n": int(ratios.size),
        "n_reference": int(reference_ratios.size),
        "reason": None,
    }


def forget_quality_unavailable(reason: str, n: int = 0, n_reference: int = 0) -> dict[str, Any]:
    """Forget quality marked unavailable (no reference model, no truth ratios ...)."""
    return {
        "available": False,
        "p_value": None,
        "ks_statistic": None,
        "n": int(n),
        "n_reference": int(n_reference),
        "reason": reason,
    }

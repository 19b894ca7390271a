"""Answer probability and model utility (TOFU).

Probability of a completion y after a prompt x: P = exp(−(1/|y|) Σₜ NLLₜ), the
length-normalised probability (exp of the mean token log-probability).

On a world-facts split (TOFU's "real authors" and "world facts"), the probability is
normalised against the wrong answers instead, P(correct) / (P(correct) + Σⱼ P(perturbedⱼ)),
with every answer scored on the same question. The correct answer is the record's
``paraphrased_completion``, worded like its ``perturbed_completions`` and asked with the
same question (``paraphrased_prompt``, else ``prompt``) — the scores the truth ratio uses.

Model utility: the harmonic mean H(x₁…x_n) = n / Σᵢ 1/xᵢ of {probability, ROUGE-L recall,
truth ratio} on each utility split present: ``retain``, ``real_authors`` and ``world``.
With all three, it is TOFU's model utility exactly (9 numbers; ``definition`` "tofu");
without real authors (the embedded world has none) it is the 6 numbers of retain and
world (``definition`` "retain+world"), which the report names. A zero component gives
H = 0; a component that cannot be computed is left out and listed in ``missing``.

>>> normalised_probability(np.log([0.6]), [np.log([0.2, 0.1])]).round(6).tolist()
[0.666667]
>>> harmonic_mean([0.5, 1.0])
0.6666666666666666
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from analysis.scoring import CompletionScores

UTILITY_SPLITS = ("retain", "real_authors", "world")  # TOFU's three, in its order
UTILITY_METRICS = ("probability", "rouge_l_recall", "truth_ratio")


def probability_metric(scores: CompletionScores) -> dict[str, Any]:
    """``{"value": mean P, "per_example": [P]}`` with P = exp(−mean token NLL)."""
    per_example = scores.probability.double().tolist()
    return {"value": float(np.mean(per_example)), "per_example": per_example}


def normalised_probability(
    correct: Sequence[float] | np.ndarray, perturbed: Sequence[Sequence[float]]
) -> np.ndarray:
    """P(c) / (P(c) + Σⱼ P(wⱼ)) = 1 / (1 + Σⱼ exp(log P(wⱼ) − log P(c))), from mean log-probs."""
    correct = np.asarray(correct, dtype=np.float64)
    if len(perturbed) != correct.shape[0]:
        raise ValueError(f"{correct.shape[0]} correct answers, {len(perturbed)} perturbed")
    rest = np.array(
        [
            np.exp(np.asarray(w, dtype=np.float64) - c).sum()
            for c, w in zip(correct, perturbed, strict=True)
        ]
    )
    return 1.0 / (1.0 + rest)


def normalised_probability_metric(
    correct: Sequence[float] | np.ndarray, perturbed: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """``{"value": mean, "per_example": [...]}`` of :func:`normalised_probability`."""
    per_example = normalised_probability(correct, perturbed).tolist()
    return {"value": float(np.mean(per_example)), "per_example": per_example}


def harmonic_mean(values: Sequence[float]) -> float:
    """n / Σ 1/xᵢ over non-negative values; 0 if any is 0.

    >>> harmonic_mean([0.2, 0.0, 0.9])
    0.0
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("the harmonic mean of no values")
    if (values < 0).any():
        raise ValueError(f"the harmonic mean needs non-negative values, got {values.tolist()}")
    if (values == 0).any():
        return 0.0
    return float(values.size / np.sum(1.0 / values))


def model_utility(
    metrics: Mapping[str, Mapping[str, Mapping[str, Any]]],
    splits: Sequence[str] = UTILITY_SPLITS,
) -> dict[str, Any]:
    """``{"value": H(components), "components": {"<split>/<metric>": value}, "definition",
    "missing"}`` for one model.

    ``metrics[split][metric]["value"]`` as in the audit report; splits that are absent are
    left out, metrics whose value is None are listed in ``missing``. ``definition``:
    ``tofu`` when all of TOFU's 9 components are there, else the splits used.

    >>> metrics = {"retain": {"probability": {"value": 0.5}, "rouge_l_recall": {"value": 1.0},
    ...                       "truth_ratio": {"value": None}}}
    >>> utility = model_utility(metrics)
    >>> utility["value"], utility["components"]
    (0.6666666666666666, {'retain/probability': 0.5, 'retain/rouge_l_recall': 1.0})
    >>> utility["definition"], utility["missing"]
    ('retain', ['retain/truth_ratio'])
    """
    present = [split for split in splits if split in metrics]
    components, missing = {}, []
    for split in present:
        for name in UTILITY_METRICS:
            value = (metrics[split].get(name) or {}).get("value")
            if value is None:
                missing.append(f"{split}/{name}")
            else:
                components[f"{split}/{name}"] = float(value)
    value = harmonic_mean(list(components.values())) if components else None
    tofu = tuple(present) == UTILITY_SPLITS and not missing
    definition = "tofu" if tofu else "+".join(present)
    return {"value": value, "components": components, "definition": definition, "missing": missing}

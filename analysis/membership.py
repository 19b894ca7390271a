"""Membership inference on the forget split (members) against a holdout split (non-members).

Each attack gives a record a score s, higher meaning "more likely trained on", from the
teacher-forced log-probabilities ℓₜ = log p(yₜ | x, y<ₜ) of its answer tokens (t = 1…T):

- ``loss``: s = (1/T) Σₜ ℓₜ, the negative mean NLL (Yeom et al. 2018);
- ``zlib``: s = ((1/T) Σₜ ℓₜ) / Z, Z the byte length of the zlib-compressed answer text
  (UTF-8): the answer tokens decoded, as open-unlearning does (the ``completion``, or
  ``text``, when the task has no tokenizer) — loss over zlib entropy, negated (Carlini et
  al. 2021);
- ``min_k``: the mean of the lowest ⌊k·T⌋ (at least 1) values of ℓₜ (Min-K%, Shi et al.
  2024; k = 40 % by default, open-unlearning's and MUSE's setting);
- ``min_k_plus_plus``: the same on zₜ = (ℓₜ − μₜ)/σₜ, μₜ and σₜ the mean and standard
  deviation of log p(v) for v drawn from the model's own next-token distribution
  (Min-K%++, Zhang et al. 2024); zₜ = 0 where σₜ = 0.

ROC AUC = P(s_member > s_non-member) + ½ P(s_member = s_non-member), the Mann–Whitney U
statistic divided by n_member·n_non-member (ties counted half). 0.5: members cannot be told
apart; a model that never saw the forget set should score like the reference model.
The answer tokens are those of :func:`analysis.memorization.token_statistics`: the
final end-of-sequence label is left out, as open-unlearning does.

MUSE's privleak labels the forget set 0, so it works with 1 − AUC:
privleak = ((1 − AUC_model) − (1 − AUC_reference)) / (1 − AUC_reference) × 100. 0 is
ideal; negative: the model still tells the forget set from the holdout better than the
reference (leaking); positive: it tells them apart less (over-unlearned). MUSE reports
it for Min-K% at k = 0.4 (the audit's headline ``privleak``).

>>> roc_auc([3.0, 2.0], [1.0, 2.0])
0.875
>>> min_k_score(np.log([0.5, 0.1, 0.9, 0.2, 0.8]), k=0.4)  # mean of the two lowest
-1.9560115027140728
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from analysis.memorization import TokenStatistics, token_statistics
from attribution.task import Task

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
MIN_K = 0.4  # open-unlearning's and MUSE's k
PRIVLEAK_ATTACK = "min_k"  # the attack MUSE reports privleak for


def loss_score(log_prob: Sequence[float] | np.ndarray) -> float:
    """s = mean token log-probability (the negative mean NLL)."""
    return float(np.mean(log_prob))


def zlib_score(log_prob: Sequence[float] | np.ndarray, text: str) -> float:
    """s = mean token log-probability / len(zlib.compress(text as UTF-8)).

    >>> zlib_score([-1.0, -3.0], "a")  # zlib.compress(b"a") is 9 bytes
    -0.2222222222222222
    """
    return loss_score(log_prob) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(log_prob: Sequence[float] | np.ndarray, k: float = MIN_K) -> float:
    """Mean of the lowest max(1, ⌊k·T⌋) token log-probabilities."""
    values = np.sort(np.asarray(log_prob, dtype=np.float64))
    return float(values[: max(1, int(k * values.size))].mean())


def min_k_plus_plus_score(
    log_prob: Sequence[float] | np.ndarray,
    mean: Sequence[float] | np.ndarray,
    std: Sequence[float] | np.ndarray,
    k: float = MIN_K,
) -> float:
    """Min-K% on zₜ = (ℓₜ − μₜ)/σₜ (zₜ = 0 where σₜ = 0).

    >>> min_k_plus_plus_score([-1.0, -2.0], [-1.5, -1.5], [0.5, 0.0], k=0.5)
    0.0
    """
    log_prob, mean, std = (np.asarray(a, dtype=np.float64) for a in (log_prob, mean, std))
    safe = np.where(std > 0, std, 1.0)
    z = np.where(std > 0, (log_prob - mean) / safe, 0.0)
    return min_k_score(z, k)


def attack_scores(
    stats: TokenStatistics, texts: Sequence[str], k: float = MIN_K
) -> dict[str, np.ndarray]:
    """Every attack's score for every record: ``{attack: array[n_records]}``; ``texts``
    are the answers zlib compresses (:func:`answer_texts`)."""
    rows = zip(stats.log_prob, stats.mean, stats.std, texts, strict=True)
    scores = [
        (loss_score(lp), zlib_score(lp, t), min_k_score(lp, k), min_k_plus_plus_score(lp, m, s, k))
        for lp, m, s, t in rows
    ]
    table = np.array(scores, dtype=np.float64).reshape(len(texts), len(ATTACKS))
    return {name: table[:, i] for i, name in enumerate(ATTACKS)}


def roc_auc(
    members: Sequence[float] | np.ndarray, nonmembers: Sequence[float] | np.ndarray
) -> float:
    """AUC = (Σ ranks of members − m(m+1)/2) / (m·n), average ranks for ties."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    m, n = members.size, nonmembers.size
    if m == 0 or n == 0:
        raise ValueError(f"ROC AUC needs members and non-members, got {m} and {n}")
    ranks = rankdata(np.concatenate([members, nonmembers]))
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def roc_curve(
    members: Sequence[float] | np.ndarray, nonmembers: Sequence[float] | np.ndarray
) -> tuple[list[float], list[float]]:
    """``(fpr, tpr)`` at every distinct threshold τ (predict "member" when s ≥ τ), from (0, 0).

    The trapezoidal area under these points is :func:`roc_auc` (ties give diagonal steps).

    >>> roc_curve([3.0, 2.0], [1.0, 2.0])
    ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    thresholds = np.unique(np.concatenate([members, nonmembers]))[::-1]
    tpr = (members[None, :] >= thresholds[:, None]).mean(1)
    fpr = (nonmembers[None, :] >= thresholds[:, None]).mean(1)
    return [0.0, *fpr.tolist()], [0.0, *tpr.tolist()]


def attack_results(
    member_scores: Mapping[str, np.ndarray], nonmember_scores: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """``{"attacks": {attack: {"auc", "roc": {"fpr", "tpr"}}}}`` (the audit schema)."""
    attacks = {}
    for name in ATTACKS:
        fpr, tpr = roc_curve(member_scores[name], nonmember_scores[name])
        auc = roc_auc(member_scores[name], nonmember_scores[name])
        attacks[name] = {"auc": auc, "roc": {"fpr": fpr, "tpr": tpr}}
    return {"attacks": attacks}


def membership_inference(
    model: Any,
    task: Task,
    members: Sequence[Mapping[str, Any]],
    nonmembers: Sequence[Mapping[str, Any]],
    *,
    k: float = MIN_K,
    batch_size: int = 32,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the four attacks on ``model``: members (forget) against non-members (holdout)."""
    scores = []
    for records in (members, nonmembers):
        stats = token_statistics(model, task, records, batch_size=batch_size, progress=progress)
        scores.append(attack_scores(stats, answer_texts(task, records, stats), k))
    return attack_results(*scores)


def privleak(auc: float, reference_auc: float) -> float | None:
    """MUSE's ((1 − AUC) − (1 − AUC_ref)) / (1 − AUC_ref) × 100; None when AUC_ref is 1.

    >>> privleak(0.75, 0.5)  # the model tells members apart better: leaking
    -50.0
    >>> round(privleak(0.9, 0.45), 1)
    -81.8
    """
    if reference_auc == 1:
        return None
    return float(((1 - auc) - (1 - reference_auc)) / (1 - reference_auc) * 100.0)


def privleak_by_attack(result: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """``{attack: privleak}`` between two :func:`membership_inference` results."""
    return {
        name: privleak(result["attacks"][name]["auc"], reference["attacks"][name]["auc"])
        for name in ATTACKS
    }


def answer_text(record: Mapping[str, Any]) -> str:
    """The text a record's loss is taken on: its ``completion``, else its ``text``."""
    return record["completion"] if "completion" in record else record["text"]


def answer_texts(
    task: Task, records: Sequence[Mapping[str, Any]], stats: TokenStatistics
) -> list[str]:
    """The answers as zlib sees them: the scored answer tokens decoded with the task's
    tokenizer, special tokens skipped (open-unlearning); the records' own text when the
    task has no tokenizer."""
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None:
        return [answer_text(r) for r in records]
    return [tokenizer.decode(ids.tolist(), skip_special_tokens=True) for ids in stats.targets]

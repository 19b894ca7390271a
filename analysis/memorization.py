"""Exact memorization and extraction strength, from teacher-forced token statistics.

For an answer y = (y₁…y_T) after a prompt x, teacher forcing gives at each answer token t
the model's next-token distribution p(· | x, y<ₜ). With cₜ = [argmax p(· | x, y<ₜ) = yₜ]:

- exact memorization (Tirumala et al.; TOFU/open-unlearning): EM = (1/T) Σₜ cₜ;
- extraction strength (Carlini et al.; open-unlearning): ES = 1 − k/T, k the smallest
  prefix length such that greedy decoding from x, y≤ₖ reproduces the rest y>ₖ.

Greedy decoding from x, y≤ₖ reproduces y>ₖ exactly when every later token is the argmax
under teacher forcing (greedy decoding feeds back exactly those tokens), so
k = 1 + (the last t with cₜ = 0), or 0 when every cₜ = 1: one forward pass is enough.
Answer tokens are the targets of ``task.token_scores`` (for ``LanguageModelingTask``, the
labelled tokens of :func:`attribution.data.encode_record`) without the final
end-of-sequence label, as open-unlearning scores them: a model that reproduces the answer
but would not stop there still has memorized it (the loss, and so the probability, keep
the end-of-sequence token).

:func:`token_statistics` also returns what the membership attacks need: log p(yₜ) and
the mean and standard deviation of log p(v) under the model's own distribution v ~ p.

>>> exact_memorization_score([True, False, True, True])
0.75
>>> extraction_strength_score([True, False, True, True])  # k = 2 of T = 4
0.5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from analysis.scoring import CompletionScores, per_record
from attribution.task import Task, TokenScores, scored_batches


@dataclass(frozen=True)
class TokenStatistics:
    """Per record, one float64/bool array over its answer tokens (teacher forced).

    ``log_prob``: log p(yₜ); ``correct``: argmax = yₜ; ``mean``/``std``: μₜ = Σᵥ p(v) log p(v)
    and σₜ = sqrt(Σᵥ p(v) (log p(v))² − μₜ²), the moments of log p under v ~ p (Min-K%++);
    ``targets``: the token ids yₜ. ``scores``: the whole answer's summed NLL, token count and
    correct count, end of sequence included (the probability's and the loss's view), from
    the same forward pass — one pass per model and split serves every metric.
    """

    log_prob: list[np.ndarray]
    correct: list[np.ndarray]
    mean: list[np.ndarray]
    std: list[np.ndarray]
    targets: list[np.ndarray] = field(default_factory=list)
    scores: CompletionScores | None = None


def token_statistics(
    model: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    progress: bool | None = None,
) -> TokenStatistics:
    """Teacher-forced per-token statistics of every record's targets (model on its device),
    the final end-of-sequence label left out (the task's ``tokenizer.eos_token_id``)."""
    eos = getattr(getattr(task, "tokenizer", None), "eos_token_id", None)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("log_prob", "correct", "mean", "std")}
    out["targets"] = []
    whole: list[tuple[torch.Tensor, ...]] = []
    batches = scored_batches(model, task, records, batch_size, "token statistics", progress)
    for *_, scores in batches:
        for key, value in _batch_statistics(scores, eos).items():
            out[key].extend(value)
        whole.append((scores.nll.cpu(), scores.length.cpu(), scores.correct.sum(1).cpu()))
    empty = (torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    nll, n_tokens, n_correct = (torch.cat(parts) for parts in zip(*(whole or [empty]), strict=True))
    return TokenStatistics(**out, scores=CompletionScores(nll, n_tokens, n_correct))


def _batch_statistics(scores: TokenScores, eos: int | None = None) -> dict[str, list[np.ndarray]]:
    """One array per record over its target positions (a final ``eos`` label left out)."""
    mask = scores.mask  # [batch, seq]
    logp = scores.target_log_softmax  # [n, vocab], float32 or wider
    p = logp.exp()
    mean = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mean.square()
    flat = {
        "log_prob": scores.log_probs[mask].double(),
        "correct": scores.correct[mask],
        "mean": mean.double(),
        "std": var.clamp(min=0).sqrt().double(),
        "targets": scores.labels[mask],
    }
    keep = mask & ~final_label_is(scores.labels, mask, eos)
    kept = keep[mask]
    return {key: [v.numpy() for v in per_record(value[kept], keep)] for key, value in flat.items()}


def final_label_is(labels: torch.Tensor, mask: torch.Tensor, token: int | None) -> torch.Tensor:
    """True at each row's last target position when that target is ``token``.

    >>> labels = torch.tensor([[-100, 5, 2, -100], [-100, 7, 8, 9]])
    >>> final_label_is(labels, labels != -100, 2).tolist()
    [[False, False, True, False], [False, False, False, False]]
    """
    found = torch.zeros_like(mask)
    if token is None:
        return found
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    rows = torch.nonzero(last >= 0).squeeze(1)
    hit = rows[labels[rows, last[rows]] == token]
    found[hit, last[hit]] = True
    return found


def exact_memorization_score(correct: Sequence[bool] | np.ndarray) -> float:
    """EM = (1/T) Σₜ cₜ, the fraction of answer tokens that are the teacher-forced argmax."""
    correct = np.asarray(correct, dtype=bool)
    return float(correct.mean()) if correct.size else 0.0


def extraction_strength_score(correct: Sequence[bool] | np.ndarray) -> float:
    """ES = 1 − k/T, k = 1 + last index with cₜ = 0 (0 when all are correct).

    >>> extraction_strength_score([True, True]), extraction_strength_score([True, False])
    (1.0, 0.0)
    """
    correct = np.asarray(correct, dtype=bool)
    if not correct.size:
        return 0.0
    wrong = np.flatnonzero(~correct)
    k = 0 if wrong.size == 0 else int(wrong[-1]) + 1
    return 1.0 - k / correct.size


def memorization_metrics(stats: TokenStatistics) -> dict[str, dict[str, Any]]:
    """``{"exact_memorization": {...}, "extraction_strength": {...}}`` (value = mean).

    >>> stats = TokenStatistics([], [np.array([True, False]), np.array([True, True])], [], [], [])
    >>> memorization_metrics(stats)["extraction_strength"]
    {'value': 0.5, 'per_example': [0.0, 1.0]}
    """
    em = [exact_memorization_score(c) for c in stats.correct]
    es = [extraction_strength_score(c) for c in stats.correct]
    return {
        "exact_memorization": {"value": float(np.mean(em)), "per_example": em},
        "extraction_strength": {"value": float(np.mean(es)), "per_example": es},
    }


def exact_memorization(
    model: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    progress: bool | None = None,
) -> dict[str, Any]:
    """``{"value": mean EM, "per_example": [EM per record]}``."""
    stats = token_statistics(model, task, records, batch_size=batch_size, progress=progress)
    return memorization_metrics(stats)["exact_memorization"]


def extraction_strength(
    model: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    progress: bool | None = None,
) -> dict[str, Any]:
    """``{"value": mean ES, "per_example": [ES per record]}``."""
    stats = token_statistics(model, task, records, batch_size=batch_size, progress=progress)
    return memorization_metrics(stats)["extraction_strength"]

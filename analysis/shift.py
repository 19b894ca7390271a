"""Knowledge shift between two models, and which parameters changed.

Per record, with answer tokens t = 1…T after a prompt x (the targets of the task's
``token_scores``), teacher forced under both models (one task, so the same tokens):

- log-probability change Δ = Σₜ log p_after(yₜ | x, y<ₜ) − Σₜ log p_before(yₜ | x, y<ₜ)
  (negative: the answer became less likely);
- token-level KL = (1/T) Σₜ KL(p_before(· | x, y<ₜ) ‖ p_after(· | x, y<ₜ)), with
  KL(p ‖ q) = Σᵥ p(v) (log p(v) − log q(v)) ≥ 0 over the vocabulary.

A split's distribution is summarised by its mean (and median) with a 95 % percentile
bootstrap confidence interval of the mean (a seeded numpy generator, 1000 resamples of the
records with replacement), and the records with the largest |Δ| are listed.

Parameter change between two state dicts, per tensor: its size, how many entries differ,
the fraction changed, the L2 norm of the difference ‖θ_after − θ_before‖₂ (float64), and
whether the tensors are bit-identical (``torch.equal``); the layer index is read from the
name (``model.layers.3.mlp.up_proj.weight`` → 3).

>>> bootstrap_mean_ci([1.0, 1.0, 1.0])
(1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from analysis.scoring import per_record
from attribution.errors import InputError
from attribution.modules import layer_index
from attribution.progress import evaluating
from attribution.task import Task, on_device, scored_batches

N_RESAMPLES = 1000
TOP = 10


class StateMismatchError(InputError):
    """Two state dicts do not hold the same tensor names and shapes."""


def token_shift(
    before: Any,
    after: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(Δ, KL)`` per record (float64 arrays); each model runs on its own device."""
    change, kl = [], []
    device = next(after.parameters()).device
    with evaluating(after), torch.no_grad():
        for *_, batch, old in scored_batches(
            before, task, records, batch_size, "knowledge shift", progress
        ):
            new = task.token_scores(after, on_device(batch, device))
            logp_before = old.target_log_softmax  # [n_tokens, vocab]
            logp_after = new.target_log_softmax.to(logp_before.device)
            target = old.labels[old.mask]  # [n_tokens]
            picked = (logp_after - logp_before).gather(-1, target[:, None])[:, 0]  # [n_tokens]
            token_kl = (logp_before.exp() * (logp_before - logp_after)).sum(-1)  # [n_tokens]
            change += [float(c.sum()) for c in per_record(picked.double(), old.mask)]
            kl += [float(c.mean()) for c in per_record(token_kl.double(), old.mask)]
    return np.array(change, dtype=np.float64), np.array(kl, dtype=np.float64)


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: quantiles (1 ± level)/2 of resampled means.

    >>> low, high = bootstrap_mean_ci(np.arange(100.0), seed=0)
    >>> bool(40 < low < 49.5 < high < 59)
    True
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("a bootstrap interval of no values")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarize_shift(
    records: Sequence[Mapping[str, Any]],
    change: Sequence[float] | np.ndarray,
    kl: Sequence[float] | np.ndarray,
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    top: int = TOP,
) -> dict[str, Any]:
    """One split's entry of the audit's ``shift`` section, from per-record Δ and KL.

    >>> out = summarize_shift([{"id": "a"}, {"id": "b"}], [0.0, -2.0], [0.0, 0.5], top=1)
    >>> out["log_prob_change"]["mean"], out["kl"]["mean"], out["most_shifted"][0]["id"]
    (-1.0, 0.25, 'b')
    """
    change, kl = np.asarray(change, np.float64), np.asarray(kl, np.float64)
    change_ci = bootstrap_mean_ci(change, seed=seed, n_resamples=n_resamples)
    kl_ci = bootstrap_mean_ci(kl, seed=seed, n_resamples=n_resamples)
    order = np.argsort(-np.abs(change), kind="stable")[:top]
    return {
        "n": int(change.size),
        "log_prob_change": {
            "mean": float(change.mean()),
            "median": float(np.median(change)),
            "ci_low": change_ci[0],
            "ci_high": change_ci[1],
            "per_example": change.tolist(),
        },
        "kl": {
            "mean": float(kl.mean()),
            "ci_low": kl_ci[0],
            "ci_high": kl_ci[1],
            "per_example": kl.tolist(),
        },
        "most_shifted": [_shifted(records[i], int(i), change[i], kl[i]) for i in order],
    }


def _shifted(record: Mapping[str, Any], index: int, change: float, kl: float) -> dict[str, Any]:
    return {
        "id": str(record.get("id", index)),
        "prompt": str(record.get("prompt", "")),
        "completion": str(record.get("completion", record.get("text", ""))),
        "log_prob_change": float(change),
        "kl": float(kl),
    }


def knowledge_shift(
    before: Any,
    after: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
    top: int = TOP,
    batch_size: int = 32,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Δ and KL from ``before`` to ``after`` on ``records``, as :func:`summarize_shift` gives."""
    change, kl = token_shift(before, after, task, records, batch_size=batch_size, progress=progress)
    return summarize_shift(records, change, kl, seed=seed, n_resamples=n_resamples, top=top)


def parameter_change(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The audit's ``parameters`` section: one row per tensor, in ``before``'s order.

    >>> a = {"layers.0.w": torch.zeros(2, 2)}
    >>> b = {"layers.0.w": torch.tensor([[0.0, 3.0], [4.0, 0.0]])}
    >>> row = parameter_change(a, b)["modules"][0]
    >>> row["layer"], row["changed"], row["fraction_changed"], row["l2"], row["identical"]
    (0, 2, 0.5, 5.0, False)
    """
    check_same_tensors(before, after)
    rows = [_tensor_change(name, before[name], after[name]) for name in before]
    return {
        "total_tensors": len(rows),
        "identical_tensors": sum(row["identical"] for row in rows),
        "total_parameters": sum(row["numel"] for row in rows),
        "changed_parameters": sum(row["changed"] for row in rows),
        "modules": rows,
    }


@torch.no_grad()
def _tensor_change(name: str, before: torch.Tensor, after: torch.Tensor) -> dict[str, Any]:
    a = before.detach()
    b = after.detach().to(a.device)
    identical = a.dtype == b.dtype and torch.equal(a, b)
    changed = 0 if identical else int((a.double() != b.double()).sum())
    numel = a.numel()
    l2 = 0.0 if identical else float(torch.linalg.vector_norm(b.double() - a.double()))
    return {
        "name": name,
        "layer": layer_index(name),
        "numel": int(numel),
        "changed": changed,
        "fraction_changed": changed / numel if numel else 0.0,
        "l2": l2,
        "identical": bool(identical),
    }


def check_same_tensors(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> None:
    """Raise :class:`StateMismatchError` unless both hold the same names and shapes."""
    missing, extra = sorted(set(before) - set(after)), sorted(set(after) - set(before))
    if missing or extra:
        raise StateMismatchError(
            f"the models have different parameters (only in the first: {missing[:3]}, only "
            f"in the second: {extra[:3]}); compare two versions of the same architecture"
        )
    for name, tensor in before.items():
        if tuple(tensor.shape) != tuple(after[name].shape):
            raise StateMismatchError(
                f"parameter {name} has shape {tuple(tensor.shape)} in the first model and "
                f"{tuple(after[name].shape)} in the second; compare the same architecture"
            )


def foresight(
    predicted: Mapping[str, float],
    records: Sequence[Mapping[str, Any]],
    shift: Mapping[str, Any],
) -> dict[str, Any]:
    """Spearman ρ between each record's predicted damage (by id, e.g. from influence) and
    its observed loss rise −Δ log p (``shift``: the audit's entry for these records).

    >>> shift = {"log_prob_change": {"per_example": [-3.0, -1.0, 0.0]}}
    >>> foresight({"a": 2.0, "b": 1.0, "c": 0.5}, [{"id": "a"}, {"id": "b"}, {"id": "c"}], shift)
    {'n': 3, 'spearman': 1.0}
    """
    from scipy.stats import spearmanr

    changes = shift["log_prob_change"]["per_example"]
    pairs = [
        (predicted[str(r.get("id"))], -change)
        for r, change in zip(records, changes, strict=True)
        if str(r.get("id")) in predicted
    ]
    if len(pairs) < 3:
        return {"n": len(pairs), "spearman": None, "reason": "fewer than 3 records in training"}
    rho = spearmanr([p for p, _ in pairs], [o for _, o in pairs]).statistic
    return {"n": len(pairs), "spearman": None if np.isnan(rho) else float(rho)}

"""Relearning robustness: does a little fine-tuning on part of the forget set bring the rest back?

The forget split is cut in two: the first ⌊n·fraction⌋ records (at least 1) are relearned,
the others (at least 1) are held out. A deep copy of the unlearned model is fine-tuned for
``steps`` plain AdamW steps (learning rate ``lr``, torch defaults otherwise) on the
relearned part, cycling through it in batches, with the mean token NLL of the batch's
targets (``task.token_scores``: the completions) as the loss; all randomness is seeded and
kept inside (``torch.random.fork_rng``). The original models are never modified.

On the held-out part, the mean length-normalised probability P = exp(−mean token NLL) is
measured before unlearning (P_b), after unlearning (P_a) and after relearning (P_r):

    recovered_fraction = (P_r − P_a) / (P_b − P_a),

0 when nothing came back, 1 when everything did (None when P_b = P_a: nothing was
forgotten, so nothing can come back). A model that truly removed the facts — like one
retrained without them — gains nothing on held-out facts from relearning others; a model
that merely hides them recovers them.

>>> recovered_fraction(0.9, 0.1, 0.5)
0.5
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from analysis.scoring import score_completions
from attribution.progress import progress_bar
from attribution.task import Task, on_device

STEPS = 10
LEARNING_RATE = 1e-3  # sized for the embedded world's tiny models; pass less for LLMs
FRACTION = 0.5


def recovered_fraction(before: float, after: float, relearned: float) -> float | None:
    """(P_r − P_a) / (P_b − P_a); None when P_b = P_a.

    >>> recovered_fraction(0.5, 0.5, 0.7) is None
    True
    """
    gap = before - after
    return None if gap == 0 else float((relearned - after) / gap)


def split_forget(n: int, fraction: float = FRACTION) -> tuple[int, int]:
    """``(n_relearn, n_eval)``: the first ⌊n·fraction⌋ records, at least 1 of each.

    >>> split_forget(24), split_forget(3), split_forget(2, 0.9)
    ((12, 12), (1, 2), (1, 1))
    """
    if n < 2:
        raise ValueError(f"relearning needs at least 2 forget records, got {n}")
    n_relearn = min(max(1, int(n * fraction)), n - 1)
    return n_relearn, n - n_relearn


def relearning_unavailable(reason: str, steps: int = 0) -> dict[str, Any]:
    """The schema's ``relearning`` section when it was not run."""
    return {
        "available": False,
        "reason": reason,
        "steps": int(steps),
        "n_relearn": 0,
        "n_eval": 0,
        "probability": None,
        "recovered_fraction": None,
    }


def relearning_robustness(
    before: Any,
    after: Any,
    task: Task,
    forget: Sequence[Mapping[str, Any]],
    *,
    steps: int = STEPS,
    lr: float = LEARNING_RATE,
    fraction: float = FRACTION,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The audit's ``relearning`` section: probabilities before / after / relearned."""
    if steps <= 0:
        return relearning_unavailable("relearning was not requested (steps = 0)", steps)
    if len(forget) < 2:
        return relearning_unavailable("relearning needs at least 2 forget records", steps)
    n_relearn, n_eval = split_forget(len(forget), fraction)
    relearn, held_out = list(forget[:n_relearn]), list(forget[n_relearn:])
    relearned = relearned_copy(
        after,
        task,
        relearn,
        steps=steps,
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    p = {
        role: mean_probability(model, task, held_out, batch_size)
        for role, model in (("before", before), ("after", after), ("relearned", relearned))
    }
    del relearned
    return {
        "available": True,
        "reason": None,
        "steps": int(steps),
        "n_relearn": n_relearn,
        "n_eval": n_eval,
        "probability": p,
        "recovered_fraction": recovered_fraction(p["before"], p["after"], p["relearned"]),
    }


def relearned_copy(
    model: Any,
    task: Task,
    records: Sequence[Mapping[str, Any]],
    *,
    steps: int = STEPS,
    lr: float = LEARNING_RATE,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool | None = None,
) -> Any:
    """A deep copy of ``model`` fine-tuned ``steps`` AdamW steps on ``records`` (eval mode).

    The loss of a batch is the mean token NLL of its targets (``task.token_scores``), in
    train mode.
    """
    clone = copy.deepcopy(model)
    clone.train()
    for param in clone.parameters():
        param.requires_grad_(True)
    device = next(clone.parameters()).device
    records = list(records)
    size = min(batch_size, len(records))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(clone.parameters(), lr=lr)
        for step in progress_bar(range(steps), "relearning", progress):
            start = (step * size) % len(records)
            batch = on_device(task.collate((records + records)[start : start + size]), device)
            scores = task.token_scores(clone, batch)
            optimizer.zero_grad(set_to_none=True)
            (scores.nll.sum() / scores.length.sum()).backward()  # mean token NLL of the batch
            optimizer.step()
    clone.eval()
    return clone


def mean_probability(
    model: Any, task: Task, records: Sequence[Mapping[str, Any]], batch_size: int = 32
) -> float:
    """Mean over records of exp(−mean token NLL)."""
    scores = score_completions(model, task, records, batch_size=batch_size, progress=False)
    return float(np.mean(scores.probability.double().numpy()))

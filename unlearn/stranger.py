"""Stranger distillation: answer about a forgotten person as about someone never seen.

A model retrained without a person does not find the true answer *unlikely*; it answers
as it would about anyone it never met. So the target of the edit is the **original**
model's own next-token distribution for the same question asked about a stranger (in the
spirit of Eldan & Russinovich 2023, "Who's Harry Potter?"): in each forget record (and its
paraphrase, when it has one) the subject's **full** name is replaced by a name the model
never saw (the pool: e.g. the holdout split's subjects), the frozen original model is run
on that teacher record, and the student (the model being edited) is trained on the real
record to match it:

    L = mean over answer positions t of KL(p_orig(· | x̃, y<ₜ) ‖ p_θ(· | x, y<ₜ))
        + α mean over retain tokens of KL(p_orig ‖ p_θ)

x̃ is x with the subject's name replaced. Positions whose target token differs between the
two records (the name itself, when the answer repeats it) are left out, so the student is
never taught the stranger's name. A stranger is chosen per subject (seeded) among pool
names whose substitution keeps every record's token count, preferring names that share
no word with the subject (a shared first name leaks identity).

>>> forget = [{"prompt": "Where was Ann Lee born?", "completion": " Ann Lee was born in X.",
...            "subject": "Ann Lee"}]
>>> pairs = stranger_pairs(forget, ["Bo Kim"], lambda s, t: True, seed=0)
>>> pairs[0]["prompt"], pairs[0]["_teacher"]["completion"]
('Where was Ann Lee born?', ' Bo Kim was born in X.')
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from attribution.data import subject_pool, substitute_subject
from attribution.errors import InputError
from attribution.task import Task

TEACHER = "_teacher"  # the key under which a student record carries its teacher record
TEXT_FIELDS = ("prompt", "completion", "text")


def substitute(record: Mapping[str, Any], subject: str, stranger: str) -> dict[str, Any]:
    """The text of ``record`` (prompt/completion or text) with ``subject`` → ``stranger``."""
    own = {k: v for k, v in record.items() if k in TEXT_FIELDS}
    return substitute_subject(own, subject, stranger)


def student_records(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The record as asked (prompt/completion or text), and its paraphrase when it has one."""
    own = {k: record[k] for k in TEXT_FIELDS if k in record}
    rows = [own]
    if record.get("paraphrased_prompt") and record.get("paraphrased_completion"):
        rows.append(
            {"prompt": record["paraphrased_prompt"], "completion": record["paraphrased_completion"]}
        )
    return rows


def stranger_pairs(
    forget: Sequence[Mapping[str, Any]],
    pool: Sequence[str],
    aligned: Callable[[dict, dict], bool],
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Student records carrying their teacher record under ``"_teacher"``.

    ``aligned(student, teacher)`` says whether the two records tokenize to the same
    length with the same targets (see :func:`token_aligned`). Raises
    :class:`~attribution.errors.InputError` when no forget record names a subject, the
    pool is empty, or no stranger fits any record.
    """
    subjects = subject_pool(forget)
    if not subjects:
        raise InputError(
            "the distill method needs forget records with a 'subject' field (the entity's "
            "name as spelled in the text); none has one"
        )
    names = [n for n in dict.fromkeys(pool) if n not in set(subjects)]
    if not names:
        raise InputError(
            "the distill method needs names the model never saw (a pool of strangers, e.g. "
            "the holdout split's subjects); the pool is empty"
        )
    rng = random.Random(seed)
    pairs: list[dict[str, Any]] = []
    for subject in subjects:
        rows = [s for r in forget if r.get("subject") == subject for s in student_records(r)]
        stranger = _stranger_for(subject, rows, names, aligned, rng)
        if stranger is None:
            continue
        for row in rows:
            pairs.append({**row, TEACHER: substitute(row, subject, stranger)})
    if not pairs:
        raise InputError(
            "no name in the stranger pool keeps the forget records' token counts; give a "
            "pool with names that tokenize like the subjects'"
        )
    return pairs


def _stranger_for(subject, rows, names, aligned, rng) -> str | None:
    """A pool name that aligns with every row, preferring one sharing no word with it."""
    words = set(subject.split())
    order = rng.sample(names, len(names))
    order.sort(key=lambda n: bool(words & set(n.split())))  # stable: disjoint names first
    for name in order:
        if all(aligned(row, substitute(row, subject, name)) for row in rows):
            return name
    return None


def token_aligned(task: Task) -> Callable[[dict, dict], bool]:
    """``aligned(a, b)``: ``a`` and ``b`` collate to the same length and target count."""

    def aligned(a: dict, b: dict) -> bool:
        batch = task.collate([a, b])
        mask = batch.get("attention_mask")
        labels = batch["labels"]
        same_length = mask is None or int(mask[0].sum()) == int(mask[1].sum())
        return same_length and int((labels[0] != -100).sum()) == int((labels[1] != -100).sum())

    return aligned


def distillation_kl(student, teacher) -> torch.Tensor:
    """Per example, mean over shared target positions of KL(p_teacher ‖ p_student).

    ``student``/``teacher`` are :class:`~attribution.task.TokenScores` of aligned batches;
    positions whose targets differ (the substituted name) are left out.
    """
    shared = student.mask & teacher.mask & (student.labels == teacher.labels)
    log_q = torch.log_softmax(student.logits[shared].float(), -1)  # [n, vocab]
    log_p = torch.log_softmax(teacher.logits[shared].float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [n]
    per_example = torch.zeros(shared.shape, dtype=kl.dtype, device=kl.device)
    per_example = per_example.masked_scatter(shared, kl).sum(-1)
    return per_example / shared.sum(-1).clamp(min=1)

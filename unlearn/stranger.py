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

import difflib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attribution.data import subject_pool, substitute_subject
from attribution.errors import InputError
from attribution.task import Task, on_device

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


@dataclass(frozen=True)
class InferredSubjects:
    """Forget records with subjects inferred from holdout prompts (no record named one)."""

    records: list[dict[str, Any]]  # copies of the forget records, "subject" added where found
    strangers: tuple[str, ...]  # the names at the same place in the matching holdout prompts
    found: int  # records that now carry a subject

    def describe(self) -> str:
        examples = ", ".join(repr(s) for s in subject_pool(self.records)[:2])
        return (
            f"no forget record names a subject: inferred for {self.found} of "
            f"{len(self.records)} from the holdout prompts they differ from (e.g. {examples})"
        )


WORD = re.compile(r"\w+|[^\w\s]")
MIN_SHARED = 0.5  # of the words two prompts must share for their difference to be a name


def name_difference(prompt: str, other: str) -> tuple[str, str] | None:
    """``(span of prompt, span of other)`` where the two differ in exactly one run of words
    that is all capitalised and share at least half their words; else None.

    >>> name_difference("Where was Ann Lee born?", "Where was Bo Kim born?")
    ('Ann Lee', 'Bo Kim')
    >>> name_difference("Where was Ann Lee born?", "What does Bo Kim do?") is None
    True
    """
    a, b = list(WORD.finditer(prompt)), list(WORD.finditer(other))
    matcher = difflib.SequenceMatcher(a=[m[0] for m in a], b=[m[0] for m in b], autojunk=False)
    changed = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    shared = sum(block.size for block in matcher.get_matching_blocks())
    if len(changed) != 1 or changed[0][0] != "replace" or shared < MIN_SHARED * len(a):
        return None
    _, i1, i2, j1, j2 = changed[0]
    spans = (prompt[a[i1].start() : a[i2 - 1].end()], other[b[j1].start() : b[j2 - 1].end()])
    if not all(w[:1].isupper() for span in spans for w in span.split()):
        return None  # not a name: a template word changed
    return spans


def infer_subjects(
    forget: Sequence[Mapping[str, Any]], holdout: Sequence[Mapping[str, Any]]
) -> InferredSubjects:
    """Subjects for forget records that name none, from the holdout prompts they match.

    Each forget prompt is compared with every holdout prompt: where the two differ in one
    capitalised run of words (:func:`name_difference`), that run is the forget record's
    subject and the holdout's run a stranger (the holdout's own ``subject`` names join the
    pool). A record whose own prompt matches no holdout
    template gets the longest inferred subject that its prompt contains. Records stay
    unchanged when nothing is found (they are then not distilled).
    """
    others = [r["prompt"] for r in holdout if isinstance(r.get("prompt"), str)]
    subjects: dict[int, str] = {}
    strangers: dict[str, None] = {}
    for i, record in enumerate(forget):
        prompt = record.get("prompt")
        for other in others if isinstance(prompt, str) else ():
            found = name_difference(prompt, other)
            if found:
                subjects[i] = found[0]
                strangers.setdefault(found[1], None)
                break
    known = sorted(set(subjects.values()), key=len, reverse=True)
    records = []
    for i, record in enumerate(forget):
        text = " ".join(str(record.get(k, "")) for k in TEXT_FIELDS)
        subject = subjects.get(i) or next((s for s in known if s in text), None)
        records.append({**record, "subject": subject} if subject else dict(record))
    found = sum("subject" in r for r in records)
    return InferredSubjects(records, subject_pool(holdout) + tuple(strangers), found)


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


def teacher_scores(task: Task, frozen: torch.nn.Module, students: Sequence[Mapping], device):
    """The frozen original's token scores of the students' teacher records (no graph)."""
    teachers = task.collate([r[TEACHER] for r in students])
    with torch.no_grad():
        return task.token_scores(frozen, on_device(teachers, device))


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

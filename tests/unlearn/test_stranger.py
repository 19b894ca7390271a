"""Stranger distillation: teacher records, the teacher's distribution, the loss, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from attribution import LanguageModelingTask
from attribution.errors import InputError
from attribution.task import on_device
from excise.models import load_model
from excise.records import read_records
from unlearn import ScopeArguments, UnlearnArguments, scoped_edit
from unlearn.methods import METHODS, Step
from unlearn.stranger import (
    TEACHER,
    distillation_kl,
    infer_subjects,
    name_difference,
    stranger_pairs,
    subject_pool,
    substitute,
    token_aligned,
)


@pytest.fixture(scope="module")
def world(tiny_world):
    model, tokenizer = load_model(tiny_world / "base")
    splits = {s: read_records(tiny_world / f"{s}.jsonl") for s in ("forget", "retain", "holdout")}
    return model, LanguageModelingTask(tokenizer), splits


def test_substitute_replaces_the_full_name_everywhere():
    record = {"prompt": "Who is Ann Lee?", "completion": " Ann Lee, born 1950.", "id": "x"}
    assert substitute(record, "Ann Lee", "Bo Kim") == {
        "prompt": "Who is Bo Kim?",
        "completion": " Bo Kim, born 1950.",
    }


def test_pairs_cover_each_record_and_its_paraphrase_with_one_stranger_per_subject(world):
    _, task, splits = world
    forget, pool = splits["forget"], subject_pool(splits["holdout"])
    pairs = stranger_pairs(forget, pool, token_aligned(task), seed=0)
    expected = sum(1 + bool(r.get("paraphrased_prompt")) for r in forget)
    assert len(pairs) == expected
    subjects = set(subject_pool(forget))
    for pair in pairs:
        teacher = pair[TEACHER]
        assert not any(s in teacher["prompt"] + teacher["completion"] for s in subjects)
        assert token_aligned(task)(dict(pair), teacher)
    # the same seed gives the same strangers; a stranger is never a forget subject
    again = stranger_pairs(forget, pool, token_aligned(task), seed=0)
    assert [p[TEACHER] for p in again] == [p[TEACHER] for p in pairs]


def test_the_teacher_is_the_original_model_on_the_substituted_record(world):
    model, task, splits = world
    pairs = stranger_pairs(splits["forget"], subject_pool(splits["holdout"]), token_aligned(task))
    frozen = copy.deepcopy(model).eval()
    batch_records = pairs[:4]
    device = next(model.parameters()).device
    step = Step(
        model,
        task,
        on_device(task.collate(batch_records), device),
        on_device(task.collate(splits["retain"][:4]), device),
        UnlearnArguments(method="distill"),
        frozen,
        forget_records=batch_records,
    )
    teacher = step.frozen_scores(
        on_device(task.collate([p[TEACHER] for p in batch_records]), device)
    )
    # the independent computation: tokenize the substituted text and run the original model
    tokenizer = task.tokenizer
    for i, pair in enumerate(batch_records):
        text = pair[TEACHER]["prompt"] + pair[TEACHER]["completion"]
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        n = ids.shape[1] - 1
        torch.testing.assert_close(teacher.logits[i, :n], logits, rtol=1e-5, atol=1e-5)


def test_the_loss_is_zero_for_identical_models_and_positive_otherwise(world):
    model, task, splits = world
    pairs = [{**r, TEACHER: dict(r)} for r in splits["forget"][:4]]  # the stranger is oneself
    batch = task.collate(pairs)
    with torch.no_grad():
        same = distillation_kl(task.token_scores(model, batch), task.token_scores(model, batch))
    assert torch.all(same.abs() < 1e-6)
    swapped = stranger_pairs(
        splits["forget"][:4], subject_pool(splits["holdout"]), token_aligned(task)
    )
    student = task.token_scores(model, task.collate(swapped))
    teacher = task.token_scores(model, task.collate([p[TEACHER] for p in swapped]))
    kl = distillation_kl(student, teacher)
    assert torch.all(kl >= 0) and kl.mean() > 0.05  # the base model knows these people


def test_distill_edits_only_its_scope_and_moves_the_forget_answers(world):
    model, task, splits = world
    edited = copy.deepcopy(model)
    arguments = UnlearnArguments(
        method="distill", steps=20, lr=1e-2, strangers=subject_pool(splits["holdout"])
    )
    edit = scoped_edit(
        edited,
        task,
        splits["forget"],
        splits["retain"],
        ScopeArguments(method="random", sparsity=0.05),
        arguments,
        frozen=model,
        progress=False,
    )
    assert edit.proof["holds"]
    assert edit.result.end.forget_loss > edit.result.start.forget_loss + 0.2
    assert edit.result.end.retain_loss < edit.result.start.retain_loss + 0.5


def test_bad_input_is_one_clear_error(world):
    _, task, splits = world
    aligned = token_aligned(task)
    no_subject = [{k: v for k, v in r.items() if k != "subject"} for r in splits["forget"]]
    with pytest.raises(InputError, match="subject"):
        stranger_pairs(no_subject, subject_pool(splits["holdout"]), aligned)
    with pytest.raises(InputError, match="pool is empty"):
        stranger_pairs(splits["forget"], [], aligned)
    with pytest.raises(InputError, match="pool is empty"):  # only the subjects themselves
        stranger_pairs(splits["forget"], subject_pool(splits["forget"]), aligned)
    with pytest.raises(InputError, match="strangers"):
        UnlearnArguments(method="distill", strangers=("",))
    assert METHODS["distill"].uses_frozen


def _anonymous(records):
    return [{k: v for k, v in r.items() if k != "subject"} for r in records]


def test_subjects_are_inferred_from_the_holdout_prompts_when_none_is_named(world):
    _, _, splits = world
    inferred = infer_subjects(_anonymous(splits["forget"]), _anonymous(splits["holdout"]))
    assert inferred.found == len(splits["forget"])
    assert [r["subject"] for r in inferred.records] == [r["subject"] for r in splits["forget"]]
    holdout_names = set(subject_pool(splits["holdout"]))
    assert inferred.strangers and set(inferred.strangers) <= holdout_names
    assert "inferred for" in inferred.describe()
    # the records given are not modified
    assert all("subject" not in r for r in _anonymous(splits["forget"]))


def test_a_template_change_is_not_a_name():
    assert name_difference("Where was Ann Lee born?", "Where was Ann Lee raised?") is None
    assert name_difference("Who is Ann Lee?", "Who is Bo Kim?") == ("Ann Lee", "Bo Kim")
    assert name_difference("Who is Ann Lee?", "Who is Ann Lee?") is None  # no difference
    nothing = infer_subjects([{"prompt": "Q: what is x?", "completion": " y"}], [])
    assert nothing.found == 0 and nothing.strangers == ()


def test_a_record_outside_every_holdout_template_takes_its_persons_inferred_name():
    forget = [
        {"prompt": "Where was Ann Lee born?", "completion": " In X."},
        {"prompt": "Whom did Ann Lee marry?", "completion": " Ann Lee married Y."},
    ]
    inferred = infer_subjects(forget, [{"prompt": "Where was Bo Kim born?"}])
    assert [r["subject"] for r in inferred.records] == ["Ann Lee", "Ann Lee"]
    assert inferred.strangers == ("Bo Kim",)

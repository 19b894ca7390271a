"""The calibrated stop: the run ends in the measured state where its criterion was lowest."""

from __future__ import annotations

import copy

import pytest

from attribution import LanguageModelingTask
from attribution.errors import InputError
from tests.attribution.models import random_examples, tiny_llama
from unlearn import UnlearnArguments, measure, unlearn
from unlearn.scope import full_scope

TASK = LanguageModelingTask(pad_id=0)


class ForgetLossNear:
    """|forget loss − target|: lowest part-way through a gradient-ascent run."""

    name = "distance of the forget loss to a target"

    def __init__(self, forget, target):
        self.forget, self.target, self.calls = forget, target, 0

    def __call__(self, model):
        self.calls += 1
        return abs(measure(model, TASK, self.forget, 8) - self.target)


@pytest.fixture(scope="module")
def setting():
    return tiny_llama(), random_examples(8, seed=1), random_examples(16, seed=2)


def run(setting, criterion, **extra):
    base, forget, retain = setting
    model = copy.deepcopy(base)
    arguments = UnlearnArguments(
        method="ga", steps=12, lr=3e-2, batch_size=4, eval_every=2, retain_budget=None, **extra
    )
    result = unlearn(model, TASK, forget, retain, full_scope(model), arguments, criterion=criterion)
    return model, result


def test_ends_where_the_criterion_was_lowest(setting):
    _, forget, _ = setting
    _, plain = run(setting, None)
    start, end = plain.start.forget_loss, plain.end.forget_loss
    assert end > start + 0.5  # gradient ascent raises the forget loss steadily
    criterion = ForgetLossNear(forget, (start + end) / 2)  # best part-way
    model, result = run(setting, criterion)
    assert result.stopped == "calibrated"
    details = result.details["calibrated_stop"]
    values = {step: value for step, value in details["per_step"]}
    best_step = min(values, key=values.get)
    assert details["best_step"] == best_step and 0 < best_step < 12
    assert details["best_value"] == min(values.values())
    # the model is the state of that step: re-measured, the criterion is the recorded best
    assert result.end.step == best_step
    assert result.end.criterion == pytest.approx(details["best_value"], abs=1e-6)
    assert criterion(model) == pytest.approx(details["best_value"], abs=1e-6)
    # and the same run without a criterion went on past it
    assert plain.end.forget_loss > result.end.forget_loss


def test_a_criterion_lowest_at_the_start_leaves_the_model_unchanged(setting):
    base, forget, _ = setting
    start = measure(base, TASK, forget, 8)
    model, result = run(setting, ForgetLossNear(forget, start - 10.0))  # ascent moves away
    assert result.details["calibrated_stop"]["best_step"] == 0
    for (name, p), q in zip(model.named_parameters(), base.parameters(), strict=True):
        assert p.equal(q), name


def test_the_newton_step_refuses_a_criterion(setting):
    base, forget, retain = setting
    arguments = UnlearnArguments(method="newton")
    with pytest.raises(InputError, match="calibrated stop"):
        unlearn(
            copy.deepcopy(base),
            TASK,
            forget,
            retain,
            full_scope(base),
            arguments,
            criterion=ForgetLossNear(forget, 0.0),
        )
    with pytest.raises(InputError, match="unknown stop"):
        UnlearnArguments(stop="sometime")

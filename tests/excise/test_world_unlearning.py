"""On the tiny embedded world: scoped NPO and gradient difference forget within budget.

Measured (tiny world, ekfac scope at 5 %, default arguments, 60 steps): forget loss
0.0075 → 1.44 (NPO) and 1.71 (GD) nats/token, retain loss 0.0096 → 0.19 and 0.075; the
reference model (retrained without the forget set) sits at 2.68. The margins below leave
room for platform differences.
"""

from __future__ import annotations

import copy

import pytest

from attribution import FactorArguments, LanguageModelingTask, fit_factors
from excise.models import load_model
from excise.records import read_records
from unlearn import ScopeArguments, UnlearnArguments, choose_scope, measure, unlearn


@pytest.fixture(scope="module")
def world(tiny_world):
    model, tokenizer = load_model(tiny_world / "base")
    task = LanguageModelingTask(tokenizer)
    splits = {s: read_records(tiny_world / f"{s}.jsonl") for s in ("forget", "retain")}
    factors = fit_factors(
        model, task, splits["forget"] + splits["retain"], FactorArguments(strategy="ekfac")
    )
    return model, task, splits["forget"], splits["retain"], factors


@pytest.mark.parametrize("method", ["npo", "gd"])
def test_scoped_unlearning_forgets_and_keeps_the_retain_set(world, method):
    base, task, forget, retain, factors = world
    model = copy.deepcopy(base)
    scope = choose_scope(model, task, forget, retain, ScopeArguments("ekfac", 0.05), factors)
    assert scope.fraction == pytest.approx(0.05, abs=1e-4)
    result = unlearn(model, task, forget, retain, scope, UnlearnArguments(method=method), factors)
    start, end = result.history[0], result.history[-1]
    assert start.forget_loss < 0.1  # the base model knows the forget set
    assert end.forget_loss > 1.0  # well above its start (measured 1.44 / 1.71)
    assert end.retain_loss <= start.retain_loss + 0.5  # the default retain budget
    rise_forget = end.forget_loss - start.forget_loss
    assert rise_forget > 4 * (end.retain_loss - start.retain_loss)
    assert measure(model, task, forget, 8) == pytest.approx(end.forget_loss, rel=1e-4)

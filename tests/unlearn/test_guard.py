"""The guard set's predicted damage foresees the observed loss change on the tiny world."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from attribution import FactorArguments, LanguageModelingTask, fit_factors, pairwise_scores
from excise.models import load_model
from excise.records import read_records
from unlearn.guard import guard_indices, predicted_damage
from unlearn.importance import mean_gradient, newton_direction


@pytest.fixture(scope="module")
def world(tiny_world):
    model, tokenizer = load_model(tiny_world / "base")
    task = LanguageModelingTask(tokenizer)
    splits = {s: read_records(tiny_world / f"{s}.jsonl") for s in ("forget", "retain", "neighbor")}
    train = splits["forget"] + splits["retain"] + splits["neighbor"]
    factors = fit_factors(model, task, train, FactorArguments(strategy="ekfac"))
    return model, task, splits["forget"], train, factors


def losses(model, task, examples) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                task.loss(model, task.collate(examples[i : i + 32]))
                for i in range(0, len(examples), 32)
            ]
        ).double()


def test_predicted_damage_is_the_first_order_loss_change_of_the_newton_step(world):
    model, task, forget, train, factors = world
    scores = pairwise_scores(model, task, forget, train, factors).total  # [forget, train]
    direction = newton_direction(model, factors, mean_gradient(model, task, forget))
    largest = max(d.abs().max().item() for d in direction.values())
    eta = 1e-3 / largest  # small enough for first order, large enough for float32
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in moved.named_parameters():
            if name in direction:
                param += eta * direction[name]
    observed = losses(moved, task, train) - losses(model, task, train)
    predicted = eta * predicted_damage(scores) / len(forget)
    assert pearsonr(predicted, observed).statistic > 0.9
    assert spearmanr(predicted, observed).statistic > 0.8
    # a negative control: the damage of another ordering does not predict it
    shuffled = predicted[torch.randperm(len(predicted), generator=torch.Generator().manual_seed(0))]
    assert abs(pearsonr(shuffled, observed).statistic) < 0.5
    # the guard picks the most damaged examples outside the forget set
    guard = guard_indices(scores, 10, exclude=set(range(len(forget))))
    assert observed[guard].mean() > observed[len(forget) :].mean()

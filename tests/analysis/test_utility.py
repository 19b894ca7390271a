"""Probability, normalised probability, harmonic mean and model utility, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.scoring import CompletionScores
from analysis.utility import (
    harmonic_mean,
    model_utility,
    normalised_probability,
    probability_metric,
)


def test_probability_is_exp_of_minus_mean_token_nll():
    scores = CompletionScores(
        nll=torch.tensor([2.0, 0.3]), n_tokens=torch.tensor([2, 3]), n_correct=torch.tensor([0, 3])
    )
    result = probability_metric(scores)
    assert result["per_example"] == pytest.approx([math.exp(-1), math.exp(-0.1)])
    assert result["value"] == pytest.approx((math.exp(-1) + math.exp(-0.1)) / 2)


def test_normalised_probability():
    # 0.6 / (0.6 + 0.2 + 0.1) and 0.1 / (0.1 + 0.3)
    result = normalised_probability(np.log([0.6, 0.1]), [np.log([0.2, 0.1]), np.log([0.3])])
    assert result.tolist() == pytest.approx([0.6 / 0.9, 0.1 / 0.4])


def test_harmonic_mean():
    assert harmonic_mean([0.5, 0.25]) == pytest.approx(2 / (2 + 4))
    assert harmonic_mean([0.7]) == pytest.approx(0.7)
    assert harmonic_mean([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([-0.1, 0.5])
    with pytest.raises(ValueError):
        harmonic_mean([])


def metric(value):
    return {"value": value, "per_example": []}


def test_model_utility_over_retain_and_world_only():
    values = {"probability": 0.9, "rouge_l_recall": 0.6, "truth_ratio": 0.3}
    world = {"probability": 0.5, "rouge_l_recall": 1.0, "truth_ratio": None}
    metrics = {
        "forget": {k: metric(0.01) for k in values},  # never part of utility
        "neighbor": {k: metric(0.01) for k in values},  # reported by the shift instead
        "retain": {k: metric(v) for k, v in values.items()},
        "world": {k: metric(v) for k, v in world.items()},
    }
    result = model_utility(metrics)
    expected = 5 / (1 / 0.9 + 1 / 0.6 + 1 / 0.3 + 1 / 0.5 + 1 / 1.0)
    assert result["value"] == pytest.approx(expected)
    assert sorted(result["components"]) == [
        "retain/probability",
        "retain/rouge_l_recall",
        "retain/truth_ratio",
        "world/probability",
        "world/rouge_l_recall",
    ]
    only_retain = model_utility({"retain": metrics["retain"]})
    assert only_retain["value"] == pytest.approx(3 / (1 / 0.9 + 1 / 0.6 + 1 / 0.3))

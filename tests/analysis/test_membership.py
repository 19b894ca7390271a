"""Membership inference: attack scores by hand, AUC against a pairwise count, the tiny world."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis.membership import (
    ATTACKS,
    loss_score,
    membership_inference,
    min_k_plus_plus_score,
    min_k_score,
    privleak,
    privleak_by_attack,
    roc_auc,
    roc_curve,
    zlib_score,
)
from attribution.task import LanguageModelingTask
from excise.models import load_model
from excise.world import read_split


def brute_force_auc(members, nonmembers):
    """Every (member, non-member) pair: 1 if the member scores higher, ½ on a tie."""
    wins = sum((m > n) + 0.5 * (m == n) for m in members for n in nonmembers)
    return wins / (len(members) * len(nonmembers))


scores = st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=25)  # many ties


@given(scores, scores)
def test_auc_equals_the_pairwise_count(members, nonmembers):
    assert roc_auc(members, nonmembers) == pytest.approx(brute_force_auc(members, nonmembers))


@given(scores, scores)
def test_the_roc_curve_encloses_the_auc(members, nonmembers):
    fpr, tpr = roc_curve(members, nonmembers)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr)
    assert area == pytest.approx(roc_auc(members, nonmembers))


def test_auc_extremes():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 1], [1]) == 0.5


def test_attack_scores_by_hand():
    log_prob = np.log([0.5, 0.1, 0.9, 0.2, 0.8, 0.4, 0.7, 0.6, 0.3, 0.05])
    assert loss_score(log_prob) == pytest.approx(np.mean(log_prob))
    text = " Born in Yrhalton."
    z = len(zlib.compress(text.encode()))
    assert zlib_score(log_prob, text) == pytest.approx(np.mean(log_prob) / z)
    # k = 40 % (open-unlearning's and MUSE's) of 10 tokens: the four lowest
    lowest = [0.05, 0.1, 0.2, 0.3]
    assert min_k_score(log_prob) == pytest.approx(np.mean(np.log(lowest)))
    assert min_k_score(log_prob, k=0.2) == pytest.approx((math.log(0.05) + math.log(0.1)) / 2)
    assert min_k_score(log_prob[:2]) == pytest.approx(math.log(0.1))  # at least one token
    mean, std = np.full(10, -1.0), np.full(10, 2.0)
    assert min_k_plus_plus_score(log_prob, mean, std) == pytest.approx(
        np.mean([(math.log(p) + 1) / 2 for p in lowest])
    )


def test_privleak_is_muses():
    """MUSE labels the forget set 0: ((1 − A) − (1 − A_ref)) / (1 − A_ref) × 100."""
    assert privleak(0.6, 0.5) == pytest.approx(-20.0)  # told apart better: leaking
    assert privleak(0.4, 0.5) == pytest.approx(20.0)
    assert privleak(0.9, 0.45) == pytest.approx((0.1 - 0.55) / 0.55 * 100)  # −81.8, not +100
    assert privleak(0.7, 1.0) is None
    result = {"attacks": {a: {"auc": 0.75} for a in ATTACKS}}
    reference = {"attacks": {a: {"auc": 0.5} for a in ATTACKS}}
    assert privleak_by_attack(result, reference) == {a: pytest.approx(-50.0) for a in ATTACKS}


@pytest.fixture(scope="module")
def splits(tiny_world):
    return read_split(tiny_world, "forget"), read_split(tiny_world, "holdout")


def test_the_base_model_leaks_membership_and_the_reference_does_not(tiny_world, splits):
    results = {}
    for name in ("base", "reference"):
        model, tokenizer = load_model(tiny_world / name)
        task = LanguageModelingTask(tokenizer)
        results[name] = membership_inference(model, task, *splits, batch_size=16)
    for attack in ATTACKS:
        base, reference = (results[n]["attacks"][attack] for n in ("base", "reference"))
        assert base["auc"] > 0.9  # trained on the forget set: its answers are easy to spot
        assert reference["auc"] < base["auc"]
        assert len(base["roc"]["fpr"]) == len(base["roc"]["tpr"])

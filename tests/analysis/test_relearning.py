"""Relearning robustness: the split, the fraction, a seeded copy that leaves the original alone."""

from __future__ import annotations

import pytest

from analysis.relearning import (
    mean_probability,
    recovered_fraction,
    relearned_copy,
    relearning_robustness,
    split_forget,
)
from attribution.fingerprint import model_fingerprint
from attribution.task import LanguageModelingTask
from excise.models import load_model
from excise.world import read_split


def test_recovered_fraction_by_hand():
    assert recovered_fraction(0.9, 0.1, 0.3) == pytest.approx(0.25)
    assert recovered_fraction(0.9, 0.1, 0.05) == pytest.approx(-0.0625)
    assert recovered_fraction(0.4, 0.4, 0.9) is None


def test_split_forget():
    assert split_forget(10) == (5, 5)
    assert split_forget(10, 0.25) == (2, 8)
    assert split_forget(2, 0.0) == (1, 1)
    with pytest.raises(ValueError):
        split_forget(1)


@pytest.fixture(scope="module")
def models(tiny_world):
    return load_model(tiny_world / "base"), load_model(tiny_world / "reference")


def test_relearning_trains_a_seeded_copy_only(models, tiny_world):
    (_, tokenizer), (reference, _) = models
    task = LanguageModelingTask(tokenizer)
    records = read_split(tiny_world, "forget")[:4]
    fingerprint = model_fingerprint(reference)
    first = relearned_copy(reference, task, records, steps=4, lr=3e-3, seed=1)
    second = relearned_copy(reference, task, records, steps=4, lr=3e-3, seed=1)
    assert model_fingerprint(reference) == fingerprint and not reference.training
    assert model_fingerprint(first) == model_fingerprint(second) != fingerprint
    assert mean_probability(first, task, records) > mean_probability(reference, task, records)


def test_relearning_section(models, tiny_world):
    (base, tokenizer), (reference, _) = models
    task = LanguageModelingTask(tokenizer)
    forget = read_split(tiny_world, "forget")[:8]
    out = relearning_robustness(base, reference, task, forget, steps=3, seed=0)
    assert (out["available"], out["steps"], out["n_relearn"], out["n_eval"]) == (True, 3, 4, 4)
    p = out["probability"]
    assert p["before"] > p["after"]  # the reference never saw the forget set
    assert out["recovered_fraction"] == pytest.approx(
        (p["relearned"] - p["after"]) / (p["before"] - p["after"])
    )
    off = relearning_robustness(base, reference, task, forget, steps=0)
    assert (off["available"], off["probability"], off["recovered_fraction"]) == (False, None, None)
    assert off["reason"]

"""The calibrated stop's criterion and the perfect-stranger null, on the tiny world."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy.stats import ks_2samp

from analysis.calibration import TruthRatioMatch, split_truth_ratios, stranger_null
from analysis.truth import answer_log_probs
from attribution import LanguageModelingTask
from attribution.data import subject_pool
from attribution.errors import InputError
from excise.models import load_model
from excise.records import read_records
from unlearn import ScopeArguments, UnlearnArguments, scoped_edit


@pytest.fixture(scope="module")
def world(tiny_world):
    base, tokenizer = load_model(tiny_world / "base")
    reference, _ = load_model(tiny_world / "reference")
    splits = {s: read_records(tiny_world / f"{s}.jsonl") for s in ("forget", "retain", "holdout")}
    return base, reference, LanguageModelingTask(tokenizer), splits


def test_truth_ratios_are_tofus_ratio_per_record(world):
    base, _, task, splits = world
    ratios = split_truth_ratios(base, task, splits["forget"])
    paraphrased, perturbed = answer_log_probs(base, task, splits["forget"], progress=False)
    # R = exp(mean over perturbed answers of their mean token log-prob − the paraphrased's)
    by_hand = [
        np.exp(np.mean(np.asarray(wrong, dtype=np.float64)) - right)
        for right, wrong in zip(paraphrased, perturbed, strict=True)
    ]
    assert ratios.dtype == np.float64 and ratios.shape == (len(splits["forget"]),)
    np.testing.assert_allclose(ratios, by_hand, rtol=1e-9)
    with pytest.raises(InputError, match="truth ratios"):
        split_truth_ratios(base, task, [{"prompt": "Q", "completion": " A"}])


def test_the_match_is_the_ks_statistic_and_zero_against_itself(world):
    base, reference, task, splits = world
    to_holdout = TruthRatioMatch.to_holdout(base, task, splits["forget"], splits["holdout"])
    forget_ratios = split_truth_ratios(base, task, splits["forget"])
    holdout_ratios = split_truth_ratios(base, task, splits["holdout"])
    expected = ks_2samp(forget_ratios, holdout_ratios).statistic
    assert to_holdout(base) == pytest.approx(expected, abs=1e-12)
    to_reference = TruthRatioMatch.to_reference(reference, task, splits["forget"])
    assert to_reference(reference) == 0.0
    # the base model knows its forget set: far from both targets
    assert to_holdout(base) > 0.5 and to_reference(base) > 0.5


def test_the_null_puts_the_original_outside_and_is_reproducible(world):
    base, reference, task, splits = world
    target = split_truth_ratios(reference, task, splits["forget"])
    after = split_truth_ratios(base, task, splits["forget"])
    null = stranger_null(base, task, splits["forget"], splits["holdout"], target, after, draws=6)
    assert null["available"] and len(null["d"]) == null["draws"] == 6
    assert all(0 <= d <= 1 for d in null["d"]) and null["median"] <= null["p90"]
    assert null["after_d"] > null["p90"]  # the unedited model is no stranger
    again = stranger_null(base, task, splits["forget"], splits["holdout"], target, after, draws=6)
    assert again["d"] == null["d"]
    anonymous = [{k: v for k, v in r.items() if k != "subject"} for r in splits["forget"]]
    missing = stranger_null(base, task, anonymous, splits["holdout"], target, after, draws=2)
    assert not missing["available"] and "no subject" in missing["reason"]


def test_the_calibrated_stop_ends_at_the_lowest_measured_distance(world):
    """Distillation on the tiny world, measured every 5 steps: the model returned is the
    measured state where D to the holdout target was lowest, well below where it began."""
    base, _, task, splits = world
    match = TruthRatioMatch.to_holdout(base, task, splits["forget"], splits["holdout"])
    model = copy.deepcopy(base)
    arguments = UnlearnArguments(
        method="distill", lr=1e-2, steps=30, eval_every=5, retain_budget=None,
        stop="calibrated", strangers=subject_pool(splits["holdout"]),
    )  # fmt: skip
    edit = scoped_edit(
        model, task, splits["forget"], splits["retain"], ScopeArguments(method="all"),
        arguments, frozen=base, criterion=match, progress=False,
    )  # fmt: skip
    stop = edit.result.details["calibrated_stop"]
    values = [value for _, value in stop["per_step"]]
    assert edit.result.stopped == "calibrated"
    assert stop["best_value"] == min(values)
    assert match(model) == pytest.approx(stop["best_value"], abs=1e-12)  # the state restored
    assert stop["best_value"] < values[0] - 0.25  # it moved toward "never learned"

"""Truth ratio and forget quality: hand values, scipy's KS test, the tiny world."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.scoring import score_completions
from analysis.truth import (
    answer_log_probs,
    forget_quality,
    truth_ratio,
    truth_ratio_value,
    truth_ratios,
)
from attribution.task import LanguageModelingTask
from excise.models import load_model
from excise.world import read_split


def test_truth_ratio_is_geometric_mean_of_perturbed_over_paraphrased():
    # perturbed 0.25 and 0.04: geometric mean 0.1; paraphrased 0.2 → R = 0.5
    ratios = truth_ratios([math.log(0.2)], [[math.log(0.25), math.log(0.04)]])
    assert ratios[0] == pytest.approx(0.5)
    # perturbed lists may differ in length per question
    ratios = truth_ratios(np.log([0.1, 0.5]), [np.log([0.2]), np.log([0.5, 0.5, 0.5])])
    assert ratios.tolist() == pytest.approx([2.0, 1.0])


def test_aggregates_follow_tofu():
    ratios = [0.5, 2.0, 1.0, 0.25]
    assert truth_ratio_value(ratios, forget=True) == pytest.approx((0.5 + 0.5 + 1 + 0.25) / 4)
    assert truth_ratio_value(ratios, forget=False) == pytest.approx((0.5 + 0 + 0 + 0.75) / 4)


def ks_statistic(a, b):
    """Slow and obvious: sup over every sample point of |F_a(x) − F_b(x)|."""
    points = sorted(set(a) | set(b))
    return max(abs(np.mean(np.less_equal(a, x)) - np.mean(np.less_equal(b, x))) for x in points)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forget_quality_is_scipys_ks_test(seed):
    rng = np.random.default_rng(seed)
    mine, theirs = rng.lognormal(0, 1, 17), rng.lognormal(0.5, 1, 23)
    result = forget_quality(mine, theirs)
    expected = stats.ks_2samp(mine, theirs)
    assert result["p_value"] == expected.pvalue
    assert result["ks_statistic"] == pytest.approx(ks_statistic(mine, theirs))
    assert (result["n"], result["n_reference"], result["available"]) == (17, 23, True)
    # KS compares ranks: R and 1/R (TOFU's code stores the inverse) give the same p-value
    assert forget_quality(1 / mine, 1 / theirs)["p_value"] == pytest.approx(result["p_value"])


def test_identical_samples_give_p_one():
    result = forget_quality([0.3, 0.1, 0.9], [0.9, 0.3, 0.1])
    assert (result["p_value"], result["ks_statistic"]) == (1.0, 0.0)


@pytest.fixture(scope="module")
def models(tiny_world):
    return load_model(tiny_world / "base"), load_model(tiny_world / "reference")


@pytest.mark.parametrize("question", ["original", "paraphrased"])
def test_answers_are_scored_on_the_chosen_question(models, tiny_world, question):
    """TOFU scores both answers after the original question (the default); the option
    ``paraphrased`` asks the reworded one where a record has it."""
    (model, tokenizer), _ = models
    records = read_split(tiny_world, "forget")[:3]
    records.append({k: v for k, v in records[0].items() if k != "paraphrased_prompt"})
    task = LanguageModelingTask(tokenizer)
    options = {} if question == "original" else {"question": question}
    paraphrased, perturbed = answer_log_probs(model, task, records, batch_size=2, **options)
    for i, record in enumerate(records):
        reworded = question == "paraphrased" and "paraphrased_prompt" in record
        question_text = record["paraphrased_prompt"] if reworded else record["prompt"]
        answers = [record["paraphrased_completion"], *record["perturbed_completions"]]
        scores = score_completions(
            model, task, [{"prompt": question_text, "completion": a} for a in answers]
        )
        expected = (-scores.nll / scores.n_tokens).double().numpy()
        assert paraphrased[i] == pytest.approx(expected[0], abs=1e-5)
        assert perturbed[i] == pytest.approx(expected[1:], abs=1e-5)
    if question == "original":
        assert paraphrased[3] == pytest.approx(paraphrased[0])  # the same question
    else:
        assert paraphrased[3] != pytest.approx(paraphrased[0])  # asked the original question


def test_base_is_far_from_the_reference_and_the_reference_from_itself_is_not(models, tiny_world):
    (base, tokenizer), (reference, _) = models
    forget = read_split(tiny_world, "forget")
    task = LanguageModelingTask(tokenizer)
    mine = truth_ratio(base, task, forget, forget=True)
    theirs = truth_ratio(reference, task, forget, forget=True)
    assert len(mine["per_example"]) == len(forget)
    assert mine["value"] < theirs["value"]  # the base model tells right from wrong
    assert forget_quality(mine["per_example"], theirs["per_example"])["p_value"] < 1e-3
    again = truth_ratio(reference, task, forget, forget=True)
    assert forget_quality(again["per_example"], theirs["per_example"])["p_value"] == 1.0


def test_records_without_perturbed_answers_are_marked_unavailable(models):
    (model, tokenizer), _ = models
    record = {"prompt": "Q", "completion": " A"}
    result = truth_ratio(model, LanguageModelingTask(tokenizer), [record], forget=False)
    assert result["value"] is None and result["per_example"] == []
    assert "perturbed_completions" in result["reason"]

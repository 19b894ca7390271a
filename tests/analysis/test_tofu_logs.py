"""Our metric functions recompute TOFU's published aggregates from its per-question logs.

TOFU (Maini et al. 2024) published, per question, the answer losses of Llama-2-7b
fine-tuned on all of TOFU (``full``) and without the forget10 authors (``retain90``,
the "retrained" reference). Its aggregate code (``aggregate_eval_stat.py``) turns them
into forget quality and model utility; the reference values below are written from that
code with numpy and scipy, independently of ``analysis``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import hmean, ks_2samp

from analysis.scoring import CompletionScores
from analysis.truth import forget_quality, truth_ratio_value, truth_ratios
from analysis.utility import (
    model_utility,
    normalised_probability_metric,
    probability_metric,
)

from .tofu_logs import tofu_log, values

TOFU_FORGET_QUALITY = 1.834066e-21  # full vs retain90 on forget10 (the logs' README)
TOFU_KS_STATISTIC = 0.396667


def our_truth_ratios(log: dict) -> np.ndarray:
    """R per question from mean token losses (log P = −mean token NLL)."""
    paraphrased = -np.array(values(log, "avg_paraphrased_loss"))
    perturbed = [-np.array(p) for p in values(log, "average_perturb_loss")]
    return truth_ratios(paraphrased, perturbed)


def test_forget_quality_of_the_full_model_is_tofus():
    full, retain = tofu_log("full")["forget"], tofu_log("retain90")["forget"]
    result = forget_quality(our_truth_ratios(full), our_truth_ratios(retain))
    assert result["p_value"] == pytest.approx(TOFU_FORGET_QUALITY, rel=1e-5)
    assert result["ks_statistic"] == pytest.approx(TOFU_KS_STATISTIC, abs=1e-6)
    assert (result["n"], result["n_reference"]) == (300, 300)  # the logs hold 300 questions
    # negative control: the reference against itself cannot be told apart
    assert forget_quality(our_truth_ratios(retain), our_truth_ratios(retain))["p_value"] == 1.0


def tofu_model_utility(log: dict) -> float:
    """TOFU's aggregate code, transcribed: 9 numbers, their harmonic mean."""
    numbers = []
    for split in ("retain", "real_authors", "world"):
        part = log[split]
        true = np.exp(-np.array(values(part, "avg_gt_loss")))
        if split == "retain":
            numbers.append(true.mean())
        else:
            false = np.exp(-np.array(values(part, "average_perturb_loss")))
            numbers.append(np.mean(true / (true + false.sum(-1))))
        numbers.append(np.mean(values(part, "rougeL_recall")))
        stat = np.exp(
            np.array(values(part, "average_perturb_loss")).mean(-1)
            - np.array(values(part, "avg_paraphrased_loss"))
        )
        numbers.append(np.mean(np.maximum(0, 1 - 1 / stat)))
    return float(hmean(numbers))


def our_metrics(log: dict) -> dict:
    """The audit's per-split metric entries, built with our functions from the logs."""
    metrics = {}
    for split in ("retain", "real_authors", "world"):
        part = log[split]
        if split == "retain":
            nll = torch.tensor(values(part, "gt_loss"), dtype=torch.float64)
            n = torch.tensor(values(part, "num_token_gt"))
            probability = probability_metric(CompletionScores(nll, n, n))
        else:
            correct = -np.array(values(part, "avg_gt_loss"))
            wrong = [-np.array(w) for w in values(part, "average_perturb_loss")]
            probability = normalised_probability_metric(correct, wrong)
        truth = truth_ratio_value(our_truth_ratios(part), forget=False)
        rouge = float(np.mean(values(part, "rougeL_recall")))
        metrics[split] = {
            "probability": probability,
            "rouge_l_recall": {"value": rouge},
            "truth_ratio": {"value": truth},
        }
    return metrics


@pytest.mark.parametrize("model", ["full", "retain90"])
def test_model_utility_with_the_three_splits_is_tofus(model):
    log = tofu_log(model)
    utility = model_utility(our_metrics(log))
    assert utility["definition"] == "tofu" and len(utility["components"]) == 9
    assert utility["value"] == pytest.approx(tofu_model_utility(log), rel=1e-9)
    assert 0.3 < utility["value"] < 0.9  # a fine-tuned 7B model's utility, not a degenerate one


def test_without_real_authors_the_utility_says_which_it_is():
    metrics = our_metrics(tofu_log("full"))
    del metrics["real_authors"]
    utility = model_utility(metrics)
    assert utility["definition"] == "retain+world" and len(utility["components"]) == 6


def test_the_logged_ks_statistic_is_scipys_on_tofus_own_ratios():
    """The inverse ratio TOFU's code forms ranks the same way: the same D and p."""
    full, retain = tofu_log("full")["forget"], tofu_log("retain90")["forget"]

    def inverse(log):
        return np.exp(
            np.array(values(log, "average_perturb_loss")).mean(-1)
            - np.array(values(log, "avg_paraphrased_loss"))
        )

    theirs = ks_2samp(inverse(full), inverse(retain))
    assert theirs.pvalue == pytest.approx(TOFU_FORGET_QUALITY, rel=1e-5)

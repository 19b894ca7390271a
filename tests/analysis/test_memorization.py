"""Exact memorization and extraction strength: hand values, brute force, greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from analysis.memorization import (
    exact_memorization,
    exact_memorization_score,
    extraction_strength,
    extraction_strength_score,
    token_statistics,
)
from analysis.scoring import score_completions
from attribution.data import encode_record
from attribution.task import LanguageModelingTask
from excise.models import load_model
from excise.world import read_split


def test_hand_computed_values():
    assert exact_memorization_score([True, True, False, False]) == 0.5
    assert extraction_strength_score([False, True, True, True]) == 0.75  # k = 1
    assert extraction_strength_score([True, True, True, False]) == 0.0  # k = T
    assert extraction_strength_score([True] * 5) == 1.0  # k = 0


@given(st.lists(st.booleans(), min_size=1, max_size=20))
def test_extraction_strength_is_the_smallest_reproducing_prefix(correct):
    k = next(k for k in range(len(correct) + 1) if all(correct[k:]))
    assert extraction_strength_score(correct) == 1 - k / len(correct)


@pytest.fixture(scope="module")
def reference(tiny_world):
    return load_model(tiny_world / "reference")


def test_token_statistics_agree_with_teacher_forced_scores(reference, tiny_world):
    model, tokenizer = reference
    task = LanguageModelingTask(tokenizer)
    records = read_split(tiny_world, "forget")[:6] + read_split(tiny_world, "world")[:3]
    stats = token_statistics(model, task, records, batch_size=4)
    scores = score_completions(model, task, records)
    sums = torch.tensor([lp.sum() for lp in stats.log_prob], dtype=torch.float64)
    assert torch.allclose(-sums, scores.nll.double(), atol=1e-4)
    assert [int(c.sum()) for c in stats.correct] == scores.n_correct.tolist()
    em = exact_memorization(model, task, records)
    assert em["per_example"] == pytest.approx((scores.n_correct / scores.n_tokens).tolist())


def test_vocabulary_moments_match_a_direct_computation(reference, tiny_world):
    model, tokenizer = reference
    record = read_split(tiny_world, "holdout")[0]
    stats = token_statistics(model, LanguageModelingTask(tokenizer), [record])
    encoded = encode_record(tokenizer, record)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded["input_ids"]])).logits[0].double()
    positions = [t - 1 for t, label in enumerate(encoded["labels"]) if label != -100]
    for i, t in enumerate(positions):
        logp = torch.log_softmax(logits[t], -1)
        p = logp.exp()
        mean = float((p * logp).sum())
        std = float(((p * (logp - mean) ** 2).sum()).sqrt())
        assert stats.mean[0][i] == pytest.approx(mean, abs=1e-4)
        assert stats.std[0][i] == pytest.approx(std, abs=1e-4)


def test_extraction_strength_matches_greedy_decoding(reference, tiny_world):
    """Slow and obvious: decode greedily from every prefix and find the smallest that works."""
    model, tokenizer = reference
    records = read_split(tiny_world, "forget")[:3]
    fast = extraction_strength(model, LanguageModelingTask(tokenizer), records)["per_example"]
    for record, value in zip(records, fast, strict=True):
        encoded = encode_record(tokenizer, record)
        start = next(i for i, label in enumerate(encoded["labels"]) if label != -100)
        ids, answer = encoded["input_ids"][:start], encoded["input_ids"][start:]
        k = len(answer)
        for prefix in range(len(answer) + 1):
            rest = answer[prefix:]
            if not rest:
                break
            out = model.generate(
                input_ids=torch.tensor([ids + answer[:prefix]]),
                max_new_tokens=len(rest),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
            )
            if out[0, len(ids) + prefix :].tolist() == rest:
                k = prefix
                break
        assert value == pytest.approx(1 - k / len(answer))
    assert 0 < np.mean(fast) < 1  # the reference model reproduces some answers only in part

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
    # the loss keeps the final end-of-sequence label; the token metrics leave it out
    scores = score_completions(model, task, records)
    eos = tokenizer.eos_token_id
    full = [encode_record(tokenizer, r) for r in records]
    assert all(e["labels"][-1] == eos for e in full)
    assert [len(lp) for lp in stats.log_prob] == (scores.n_tokens - 1).tolist()
    assert [t.tolist() for t in stats.targets] == [
        [label for label in e["labels"] if label != -100][:-1] for e in full
    ]
    with_eos = _statistics_with_eos(model, task, records)
    sums = torch.tensor([lp.sum() for lp in with_eos.log_prob], dtype=torch.float64)
    assert torch.allclose(-sums, scores.nll.double(), atol=1e-4)
    assert [int(c.sum()) for c in with_eos.correct] == scores.n_correct.tolist()
    for dropped, kept in zip(stats.log_prob, with_eos.log_prob, strict=True):
        assert np.array_equal(dropped, kept[:-1])
    em = exact_memorization(model, task, records)
    assert em["per_example"] == pytest.approx([c.mean() for c in stats.correct])


def _statistics_with_eos(model, task, records):
    """Token statistics with every target kept (a task whose tokenizer names no EOS)."""

    class NoEos:
        def __init__(self, tokenizer):
            self._tokenizer = tokenizer
            self.eos_token_id = None

        def __getattr__(self, name):
            return getattr(self._tokenizer, name)

    class Keep(LanguageModelingTask):
        def encode(self, example):
            return task.encode(example)

    keep = Keep(NoEos(task.tokenizer))
    keep.pad_id = task.pad_id
    return token_statistics(model, keep, records, batch_size=4)


def test_vocabulary_moments_match_a_direct_computation(reference, tiny_world):
    model, tokenizer = reference
    record = read_split(tiny_world, "holdout")[0]
    stats = token_statistics(model, LanguageModelingTask(tokenizer), [record])
    encoded = encode_record(tokenizer, record)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded["input_ids"]])).logits[0].double()
    positions = [t - 1 for t, label in enumerate(encoded["labels"]) if label != -100]
    assert encoded["labels"][-1] == tokenizer.eos_token_id
    positions = positions[:-1]  # the final end-of-sequence label is left out
    assert len(stats.mean[0]) == len(positions)
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
        # the answer without its final end-of-sequence token (open-unlearning's convention)
        ids, answer = encoded["input_ids"][:start], encoded["input_ids"][start:-1]
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


def test_one_pass_gives_the_probabilitys_scores_too(reference, tiny_world):
    """The statistics' whole-answer scores (end of sequence included) are score_completions'."""
    model, tokenizer = reference
    task = LanguageModelingTask(tokenizer)
    records = read_split(tiny_world, "retain")[:5]
    stats = token_statistics(model, task, records, batch_size=2)
    scores = score_completions(model, task, records)
    assert torch.allclose(stats.scores.nll, scores.nll, atol=1e-5)
    assert torch.equal(stats.scores.n_tokens, scores.n_tokens)
    assert torch.equal(stats.scores.n_correct, scores.n_correct)
    assert token_statistics(model, task, []).scores.nll.numel() == 0

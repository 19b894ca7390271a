"""ROUGE-L recall: the numba LCS against the pure-Python table, hand values, generation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.rouge import (
    generate_completions,
    lcs_length,
    lcs_length_reference,
    rouge_l_recall,
    rouge_l_recall_score,
    words,
)
from attribution.task import LanguageModelingTask
from excise.models import load_model
from excise.world import read_split

sequences = st.lists(st.integers(0, 5), max_size=30)


@settings(max_examples=300, deadline=None)
@given(sequences, sequences)
def test_numba_lcs_equals_the_reference(a, b):
    assert lcs_length(a, b) == lcs_length_reference(a, b)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab c.", max_size=40), st.text(alphabet="ab c.", max_size=40))
def test_recall_is_lcs_over_reference_words(reference, generation):
    ref, gen = words(reference), words(generation)
    expected = lcs_length_reference(ref, gen) / len(ref) if ref else 0.0
    assert rouge_l_recall_score(reference, generation) == pytest.approx(expected)


def test_hand_computed_values():
    assert lcs_length([], [1, 2]) == 0
    assert lcs_length([1, 2, 3], [1, 2, 3]) == 3
    assert lcs_length([1, 2, 3], [3, 2, 1]) == 1
    # answer words: garrosul seltalul was born in yrhalton (6); in order: was born in yrhalton
    answer = " Garrosul Seltalul was born in Yrhalton."
    assert rouge_l_recall_score(answer, "He was born in YRHALTON, Garrosul.") == 4 / 6
    assert rouge_l_recall_score(answer, answer) == 1.0
    assert rouge_l_recall_score(answer, "") == 0.0
    assert rouge_l_recall_score("...", "anything") == 0.0  # no answer words


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_model(tiny_world / "base")


def test_generation_does_not_depend_on_batch_size(base, tiny_world):
    model, tokenizer = base
    records = read_split(tiny_world, "forget")[:3] + read_split(tiny_world, "holdout")[:4]
    side = tokenizer.padding_side
    one = generate_completions(model, tokenizer, records, batch_size=1)
    many = generate_completions(model, tokenizer, records, batch_size=8)
    assert one == many
    assert tokenizer.padding_side == side  # the tokenizer is not modified


def test_the_base_model_recalls_its_training_answers(base, tiny_world):
    model, tokenizer = base
    records = read_split(tiny_world, "retain")[:8]
    task = LanguageModelingTask(tokenizer)
    result = rouge_l_recall(model, task, records)
    assert result["value"] == 1.0 and result["per_example"] == [1.0] * 8
    holdout = rouge_l_recall(model, task, read_split(tiny_world, "holdout")[:8])
    assert holdout["value"] < 1.0  # never trained on: some words cannot be guessed


def test_text_records_are_marked_unavailable(base):
    model, tokenizer = base
    result = rouge_l_recall(model, LanguageModelingTask(tokenizer), [{"text": "a b c"}])
    assert result["value"] is None and result["per_example"] == [] and result["reason"]

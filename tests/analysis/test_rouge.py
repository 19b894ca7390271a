"""ROUGE-L recall: the numba LCS against the pure-Python table, rouge_score and TOFU's logs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, tokenizers

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

from .tofu_logs import TOFU_LOGS

sequences = st.lists(st.integers(0, 5), max_size=30)
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


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


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ab runs running. Éé_1,'\n", max_size=60),
    st.text(alphabet="ab runs running. Éé_1,'\n", max_size=60),
)
def test_recall_equals_rouge_score(reference, generation):
    expected = SCORER.score(reference, generation)["rougeL"].recall
    assert rouge_l_recall_score(reference, generation) == expected


TRICKY = [
    "",
    "...!?",
    "Hello, World!! It's 3.14159 -- or 22/7?",
    "running runs ran runner; The RUNNING man",
    "snake_case_word and dash-separated-words",
    "naïve café in Zürich — İstanbul, ﬁne, π ≈ 3.14, 東京",
    "  tabs\tand\nnewlines  ",
    "Garrosul Seltalul was born in Yrhalton in 1901.",
]


@pytest.mark.parametrize("text", TRICKY)
def test_words_are_rouge_scores_tokens(text):
    assert words(text) == tokenizers.DefaultTokenizer(use_stemmer=True).tokenize(text)


def test_words_hand_values():
    assert words("running runs ran") == ["run", "run", "ran"]  # Porter stems words over 3 chars
    assert words("It's 3.14!") == ["it", "s", "3", "14"]
    assert words("snake_case café") == ["snake", "case", "caf"]  # only [a-z0-9] are word chars
    assert words("...") == []


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
    assert rouge_l_recall_score("She was running.", "she runs") == 2 / 3  # stemmed: run = run


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


def test_the_generation_budget_is_tofus_max_length_within_the_context(base, tiny_world):
    """TOFU: up to 200 tokens with the prompt; here never past the model's 64 positions."""
    model, tokenizer = base
    records = read_split(tiny_world, "holdout")[:4]
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[1], kwargs["max_new_tokens"]))
        return original(*args, **kwargs)

    model.generate = spy
    try:
        generate_completions(model, tokenizer, records, batch_size=4)
        short = generate_completions(model, tokenizer, records[:1], max_length=1)
    finally:
        del model.generate
    context = model.config.max_position_embeddings
    (width, new), (_, one) = calls
    assert new == min(
        200 - min(len(tokenizer(r["prompt"])["input_ids"]) for r in records), context - width
    )
    assert one == 1 and len(tokenizer(short[0])["input_ids"]) <= 3  # one token (+ specials)


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


def test_agrees_with_tofus_published_rouge_l_recall():
    """Every row of TOFU's logs: our score of (ground truth, generation) is the logged one.

    Negative control: rouge_score without its stemmer disagrees with some logged rows.
    """
    if not TOFU_LOGS.is_dir():
        pytest.skip(f"TOFU's evaluation logs are not at {TOFU_LOGS} (set EXCISE_TOFU_LOGS)")
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    files = sorted(TOFU_LOGS.glob("*.json"))
    assert len(files) == 4, f"expected TOFU's 4 aggregated logs in {TOFU_LOGS}, got {files}"
    compared, differing, control_differing = 0, [], 0
    for path in files:
        logs = json.loads(path.read_text())
        assert len(logs) == 4, (path.name, list(logs))
        for name, log in logs.items():
            rows = log["generated_text"]
            assert rows and rows.keys() == log["rougeL_recall"].keys(), (path.name, name)
            for key, (_, generation, ground_truth) in rows.items():
                logged = log["rougeL_recall"][key]
                ours = rouge_l_recall_score(ground_truth, generation)
                compared += 1
                if abs(ours - logged) > 1e-9:
                    differing.append((path.name, name, key, ours, logged))
                control = unstemmed.score(ground_truth, generation)["rougeL"].recall
                control_differing += abs(control - logged) > 1e-9
    assert not differing, f"{len(differing)} of {compared} rows differ, e.g. {differing[:5]}"
    assert control_differing > 0  # the comparison can tell tokenizations apart

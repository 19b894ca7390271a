"""The metric registry: one forward pass per model and split, selection, one shape."""

from __future__ import annotations

import math

import pytest

from analysis.metrics import METRICS, split_metrics
from attribution.errors import InputError
from attribution.task import LanguageModelingTask
from excise.models import load_model
from excise.world import read_split


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_model(tiny_world / "base")


def counting(model):
    """Count the model's forward passes."""
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_the_token_metrics_and_probability_share_one_forward_pass(base, tiny_world):
    model, tokenizer = base
    records = read_split(tiny_world, "retain")[:10]
    calls = counting(model)
    selected = ["probability", "exact_memorization", "extraction_strength"]
    out = split_metrics(
        model, LanguageModelingTask(tokenizer), "retain", records, batch_size=4, metrics=selected
    )
    assert len(calls) == math.ceil(len(records) / 4)  # one pass over the answers, no more
    assert list(out) == list(METRICS)  # every metric, in one shape
    for name in selected:
        assert out[name]["value"] is not None and len(out[name]["per_example"]) == len(records)
    for name in set(METRICS) - set(selected):
        assert out[name]["value"] is None and out[name]["reason"] == "not selected"


def test_all_metrics_by_default_and_unknown_names_refused(base, tiny_world):
    model, tokenizer = base
    task = LanguageModelingTask(tokenizer)
    records = read_split(tiny_world, "forget")[:3]
    out = split_metrics(model, task, "forget", records)
    assert all(out[name]["value"] is not None for name in METRICS)
    with pytest.raises(InputError, match="unknown metric"):
        split_metrics(model, task, "forget", records, metrics=["rouge_2"])

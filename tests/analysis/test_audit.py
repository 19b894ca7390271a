"""The audit: the schema, JSON, the tiny world's expected verdicts, and bad input."""

from __future__ import annotations

import json

import pytest

from analysis.audit import (
    ArchitectureMismatchError,
    BadRecordError,
    EmptySplitError,
    MissingSplitError,
    TokenizerMismatchError,
    UnknownSplitError,
    audit,
    check_same_tokenizer,
)
from attribution.errors import InputError
from attribution.fingerprint import model_fingerprint
from attribution.task import LanguageModelingTask
from excise.models import load_model
from excise.world import SPLITS, read_split
from tests.attribution.models import tiny_llama

TOP = {
    "schema", "excise_version", "created_utc", "models", "splits", "metrics", "forget_quality",
    "model_utility", "membership", "shift", "parameters", "relearning", "headline",
    "forget_quality_null", "warnings", "definitions", "seconds",
}  # fmt: skip
METRICS = {
    "probability", "rouge_l_recall", "truth_ratio", "exact_memorization", "extraction_strength",
}  # fmt: skip
HEADLINE = {
    "forget_quality", "forget_probability_before", "forget_probability_after",
    "forget_probability_reference", "model_utility_before", "model_utility_after",
    "neighbor_log_prob_change", "retain_log_prob_change", "changed_parameters_fraction",
    "identical_tensors", "total_tensors", "forget_quality_d", "forget_quality_null_p90",
    "privleak",
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tiny_world):
    return load_model(tiny_world / "base"), load_model(tiny_world / "reference")


@pytest.fixture(scope="module")
def splits(tiny_world):
    return {s: read_split(tiny_world, s) for s in SPLITS}


@pytest.fixture(scope="module")
def full(models, splits):
    """The base model against the reference, as if the reference were the unlearned model."""
    (base, tokenizer), (reference, _) = models
    task = LanguageModelingTask(tokenizer)
    return audit(
        base, reference, task, splits, reference=reference, relearn_steps=2,
        paths={"before": "base/", "after": "reference/"}, split_hashes={"forget": "abc"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def same(models, splits):
    """The base model against itself, on a few records, without holdout nor reference."""
    (base, tokenizer), _ = models
    small = {s: splits[s][:6] for s in ("forget", "retain", "neighbor")}
    fingerprint = model_fingerprint(base)
    base.train()
    try:
        report = audit(base, base, LanguageModelingTask(tokenizer), small, relearn_steps=0)
        assert base.training  # the flag is restored
    finally:
        base.eval()
    assert model_fingerprint(base) == fingerprint  # never modified
    return report


def test_the_report_has_the_schema_and_round_trips_through_json(full):
    assert set(full) == TOP and full["schema"] == "excise-audit/1"
    assert full["warnings"] == []  # the world's splits share no record with the forget set
    assert json.loads(json.dumps(full, allow_nan=False)) == full
    assert set(full["headline"]) == HEADLINE
    assert set(full["metrics"]) == {"forget", "retain", "neighbor", "world"}
    for per_role in full["metrics"].values():
        assert set(per_role) == {"before", "after", "reference"}
        for metrics in per_role.values():
            assert set(metrics) == METRICS
            assert all(len(m["per_example"]) > 0 for m in metrics.values())
    assert set(full["shift"]) == {"neighbor", "retain", "world", "forget"}
    assert full["models"]["before"]["path"] == "base/"
    assert full["models"]["reference"]["path"] is None
    assert full["splits"]["forget"] == {"n": 24, "sha256": "abc"}
    assert full["splits"]["retain"]["sha256"] is None
    row = full["parameters"]["modules"][0]
    assert set(row) == {"name", "layer", "numel", "changed", "fraction_changed", "l2", "identical"}


def test_base_against_reference(full):
    quality = full["forget_quality"]
    assert quality["before"]["available"] and quality["before"]["p_value"] < 1e-3
    assert quality["after"]["p_value"] == 1.0 and quality["after"]["ks_statistic"] == 0.0
    assert full["headline"]["forget_quality"] == 1.0
    null = full["forget_quality_null"]  # "after" is the reference itself: D = 0
    assert null["available"] and null["target"] == "reference" and len(null["d"]) == 20
    assert null["after_d"] == 0.0 and null["within_p90"] and null["after_percentile"] <= 1.0
    assert 0 < null["median"] <= null["p90"] <= 1  # strangers are not the reference
    assert full["headline"]["forget_quality_d"] == 0.0
    head = full["headline"]
    assert head["forget_probability_before"] > 0.9 > 0.5 > head["forget_probability_after"]
    assert head["forget_probability_reference"] == head["forget_probability_after"]
    assert full["shift"]["forget"]["log_prob_change"]["mean"] < -1.0
    assert abs(full["shift"]["retain"]["log_prob_change"]["mean"]) < 1.0
    membership = full["membership"]
    assert membership["available"] and set(membership["privleak"]) == {"before", "after"}
    assert all(v == 0.0 for v in membership["privleak"]["after"].values())
    assert all(v < 0.0 for v in membership["privleak"]["before"].values())  # MUSE: leaking
    assert full["headline"]["privleak"] == membership["privleak"]["after"]["min_k"] == 0.0
    assert membership["k"] == 0.4
    definitions = full["definitions"]
    assert definitions["truth_ratio_question"] == "original" and definitions["min_k"] == 0.4
    assert definitions["model_utility"] == "retain+world"  # no real_authors split here
    assert set(full["seconds"]) >= {"metrics per model and split", "knowledge shift", "relearning"}
    assert full["relearning"]["available"] and full["relearning"]["steps"] == 2
    world = full["metrics"]["world"]["before"]["probability"]["per_example"]
    assert all(0 < p < 1 for p in world)  # normalised against the perturbed answers
    utility = full["model_utility"]["before"]["components"]
    names = ("probability", "rouge_l_recall", "truth_ratio")
    assert set(utility) == {f"{s}/{m}" for s in ("retain", "world") for m in names}
    assert full["model_utility"]["before"]["definition"] == "retain+world"


def test_a_model_against_itself(same):
    assert json.loads(json.dumps(same, allow_nan=False)) == same
    for section in same["shift"].values():
        assert set(section["log_prob_change"]["per_example"]) == {0.0}
        assert set(section["kl"]["per_example"]) == {0.0}
    parameters = same["parameters"]
    assert parameters["identical_tensors"] == parameters["total_tensors"] > 0
    assert parameters["changed_parameters"] == 0
    assert same["headline"]["changed_parameters_fraction"] == 0.0
    assert same["headline"]["neighbor_log_prob_change"] == 0.0
    assert same["forget_quality"]["after"] == {
        "available": False, "p_value": None, "ks_statistic": None, "n": 6, "n_reference": 0,
        "reason": "no reference model",
    }  # fmt: skip
    assert same["headline"]["forget_quality"] is None
    assert same["membership"]["available"] is False and same["membership"]["privleak"] is None
    assert same["relearning"]["available"] is False
    assert same["models"]["reference"] is None
    assert set(same["metrics"]) == {"forget", "retain", "neighbor"}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda s: {**s, "holdout": []}, EmptySplitError),
        (lambda s: {k: v for k, v in s.items() if k != "retain"}, MissingSplitError),
        (lambda s: {**s, "extra": s["forget"]}, UnknownSplitError),
        (lambda s: {**s, "world": [{"prompt": "Q"}]}, BadRecordError),
        (lambda s: {**s, "world": ["not a record"]}, BadRecordError),
    ],
)
def test_bad_splits_are_refused(models, splits, change, error):
    (base, tokenizer), _ = models
    with pytest.raises(error) as info:
        audit(base, base, LanguageModelingTask(tokenizer), change(splits))
    assert isinstance(info.value, InputError)


def test_different_architectures_are_refused(models, splits):
    (base, tokenizer), (reference, _) = models
    task = LanguageModelingTask(tokenizer)
    other = tiny_llama()
    with pytest.raises(ArchitectureMismatchError, match="before and after"):
        audit(base, other, task, splits)
    with pytest.raises(ArchitectureMismatchError, match="before and reference"):
        audit(base, reference, task, splits, reference=other)
    with pytest.raises(InputError, match="config"):
        audit(base, __import__("torch").nn.Linear(2, 2), task, splits)


def test_tokenizers_are_compared(tiny_world, world_tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    check_same_tokenizer(world_tokenizer, load_model(tiny_world / "reference")[1])
    core = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2}, unk_token="<pad>"))
    other = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    with pytest.raises(TokenizerMismatchError):
        check_same_tokenizer(world_tokenizer, other)

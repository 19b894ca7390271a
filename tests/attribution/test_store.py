"""The factor store: resumes finished work, refuses other arguments and other models."""

from __future__ import annotations

import pytest
import torch

import attribution.curvature as curvature
from attribution import (
    FactorArguments,
    Factors,
    InputError,
    LanguageModelingTask,
    fit_factors,
)
from attribution.errors import FactorMismatchError

from .models import random_examples, tiny_llama

TASK = LanguageModelingTask(pad_id=0)
ARGS = FactorArguments(strategy="ekfac", fisher="empirical", dtype="float64", partitions=2)


def test_saved_factors_load_back_identically(tmp_path):
    model = tiny_llama()
    fitted = fit_factors(model, TASK, random_examples(8), ARGS, folder=tmp_path / "f")
    loaded = Factors.load(tmp_path / "f", model)
    assert loaded.arguments == ARGS
    for module in fitted.modules:
        for key, value in fitted.tensors[module].items():
            assert torch.equal(loaded.tensors[module][key], value)
    names = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert names == [
        ".excise.json",
        "arguments.json",
        "covariance.safetensors",
        "eigendecomposition.safetensors",
        "lambda.safetensors",
    ]


def test_a_second_run_reuses_finished_stages(tmp_path, monkeypatch):
    model = tiny_llama()
    first = fit_factors(model, TASK, random_examples(8), ARGS, folder=tmp_path / "f")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage was fitted again")

    monkeypatch.setattr(curvature, "stage_sums", must_not_run)
    again = fit_factors(model, TASK, random_examples(8), ARGS, folder=tmp_path / "f")
    module = first.modules[0]
    assert torch.equal(first.tensors[module]["lambda"], again.tensors[module]["lambda"])


class Killed(Exception):
    """Stands for the process being killed in the middle of a stage."""


def test_a_killed_run_resumes_from_its_finished_parts(tmp_path, monkeypatch):
    model = tiny_llama()
    examples = random_examples(8)
    real = curvature.stage_sums
    calls = []

    def dies_on_second_lambda_part(stage, *args, **kwargs):
        calls.append(stage)
        if stage == "lambda" and calls.count("lambda") == 2:
            raise Killed
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(curvature, "stage_sums", dies_on_second_lambda_part)
    with pytest.raises(Killed):
        fit_factors(model, TASK, examples, ARGS, folder=tmp_path / "f")
    left = sorted(p.name for p in (tmp_path / "f").iterdir() if not p.name.startswith("."))
    assert left == [
        "arguments.json",
        "covariance.safetensors",
        "eigendecomposition.safetensors",
        "lambda.part-0.safetensors",
    ]
    calls.clear()
    resumed = fit_factors(model, TASK, examples, ARGS, folder=tmp_path / "f")
    assert calls == ["lambda"]  # only the missing part
    monkeypatch.undo()
    fresh = fit_factors(model, TASK, examples, ARGS)
    module = fresh.modules[0]
    torch.testing.assert_close(resumed.tensors[module]["lambda"], fresh.tensors[module]["lambda"])


def test_a_run_killed_on_one_training_set_is_not_resumed_on_another(tmp_path, monkeypatch):
    """Issue 15, item 1: the covariance of the first data must not be reused silently."""
    model = tiny_llama()
    real = curvature.stage_sums

    def dies_after_the_covariance(stage, *args, **kwargs):
        if stage != "covariance":
            raise Killed
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(curvature, "stage_sums", dies_after_the_covariance)
    with pytest.raises(Killed):
        fit_factors(model, TASK, random_examples(8, seed=1), ARGS, folder=tmp_path / "f")
    assert (tmp_path / "f" / "covariance.safetensors").exists()
    monkeypatch.undo()
    with pytest.raises(FactorMismatchError, match="holds results for other training data"):
        fit_factors(model, TASK, random_examples(8, seed=2), ARGS, folder=tmp_path / "f")
    # the same data resumes
    fit_factors(model, TASK, random_examples(8, seed=1), ARGS, folder=tmp_path / "f")


def test_other_arguments_are_refused(tmp_path):
    model = tiny_llama()
    fit_factors(model, TASK, random_examples(4), ARGS, folder=tmp_path / "f")
    other = FactorArguments(strategy="kfac", fisher="empirical", dtype="float64", partitions=2)
    with pytest.raises(
        FactorMismatchError, match="made with strategy='ekfac', this run asks strategy='kfac'"
    ):
        fit_factors(model, TASK, random_examples(4), other, folder=tmp_path / "f")
    bigger_batches = FactorArguments(**{**ARGS.to_dict(), "batch_size": 3})
    fit_factors(model, TASK, random_examples(4), bigger_batches, folder=tmp_path / "f")


def test_factors_of_another_model_are_refused(tmp_path):
    fit_factors(tiny_llama(seed=0), TASK, random_examples(4), ARGS, folder=tmp_path / "f")
    other = tiny_llama(seed=1)
    with pytest.raises(FactorMismatchError, match="another model"):
        Factors.load(tmp_path / "f", other)
    with pytest.raises(FactorMismatchError, match="another model"):
        fit_factors(other, TASK, random_examples(4), ARGS, folder=tmp_path / "f")


def test_a_folder_that_is_not_a_factor_store(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(InputError, match="not an excise artifact"):
        fit_factors(tiny_llama(), TASK, random_examples(4), ARGS, folder=tmp_path)
    with pytest.raises(InputError, match="not an excise factor folder"):
        Factors.load(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]

"""Forward passes in bfloat16/float16 (autocast), factors and scores summed in float32;
and the CUDA path, checked against the CPU (``gpu`` tests: skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from attribution import FactorArguments, InputError, LanguageModelingTask, fit_factors
from attribution.influence import ScoreArguments, pairwise_scores, self_scores

from .models import random_examples, tiny_gpt2

TASK = LanguageModelingTask(pad_id=0)
TRAIN, QUERIES = random_examples(24, seed=1), random_examples(4, seed=2)


def _scores(model, autocast, dtype="float32", fisher="empirical"):
    arguments = FactorArguments(fisher=fisher, autocast=autocast, dtype=dtype)
    factors = fit_factors(model, TASK, TRAIN, arguments)
    score_arguments = ScoreArguments(autocast=autocast, dtype=dtype)
    return factors, pairwise_scores(model, TASK, QUERIES, TRAIN, factors, score_arguments).total


def _pearson(x, y):
    return torch.corrcoef(torch.stack([x.flatten(), y.flatten()]).double())[0, 1].item()


@pytest.mark.parametrize("autocast", ["bfloat16", "float16"])
def test_half_precision_forwards_give_nearly_the_float32_scores(autocast):
    model = tiny_gpt2().float()
    _, reference = _scores(model, "none")
    factors, scores = _scores(model, autocast)
    for tensors in factors.tensors.values():  # accumulated in float32 all the same
        assert all(t.dtype == torch.float32 for t in tensors.values())
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert _pearson(scores, reference) > 0.999
    assert not torch.equal(scores, reference)  # the forward really ran in 16 bits


def test_float16_gradients_are_unscaled():
    """float16 runs the backward with a loss scale of 2¹²; the sums must not carry it."""
    model = tiny_gpt2().float()
    reference_factors, _ = _scores(model, "none")
    factors, _ = _scores(model, "float16")
    for name in factors.modules:
        ours, theirs = factors.tensors[name]["lambda"], reference_factors.tensors[name]["lambda"]
        ratio = (ours.sum() / theirs.sum()).item()
        assert 0.9 < ratio < 1.1, (name, ratio)


def test_unknown_autocast_is_refused():
    with pytest.raises(InputError, match="autocast"):
        FactorArguments(autocast="int8")
    with pytest.raises(InputError, match="autocast"):
        ScoreArguments(autocast="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_cuda_scores_equal_the_cpu_ones(autocast):
    cpu = tiny_gpt2().float()
    cuda = tiny_gpt2().float().cuda()
    _, expected = _scores(cpu, "none", fisher="true")
    factors, scores = _scores(cuda, autocast, fisher="true")
    assert next(iter(factors.tensors.values()))["lambda"].device.type == "cuda"
    bound = 1e-4 if autocast == "none" else 1e-2
    assert 1 - _pearson(scores.cpu(), expected) < bound


@pytest.mark.gpu
def test_cuda_float64_fit_equals_the_cpu_one():
    cpu, cuda = tiny_gpt2(), tiny_gpt2().cuda()  # float64 models
    expected, _ = _scores(cpu, "none", dtype="float64")
    fitted, _ = _scores(cuda, "none", dtype="float64")
    for name in expected.modules:
        torch.testing.assert_close(
            fitted.tensors[name]["activation_covariance"].cpu(),
            expected.tensors[name]["activation_covariance"],
        )
    values = self_scores(cuda, TASK, TRAIN, fitted, ScoreArguments(dtype="float64"))
    assert torch.isfinite(values).all()

"""Importance scores against slow float64 references on tiny models.

The mean gradient is checked against a per-example loop with the NLL written out by
hand; the Newton direction against a dense solve of the damped curvature matrix built
from the fitted factors; each score against its formula; the scope against its count.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from attribution import FactorArguments, LanguageModelingTask, fit_factors
from attribution.curvature import Damping
from attribution.errors import InputError
from tests.attribution.models import random_examples, tiny_llama, toy_lm
from unlearn import ScopeArguments, choose_scope
from unlearn.importance import (
    ekfac_scores,
    magnitude_scores,
    mean_gradient,
    newton_direction,
    random_scores,
    saliency_scores,
    trainable,
    wagle_scores,
)

TASK = LanguageModelingTask(pad_id=0)
FORGET, RETAIN = random_examples(5, seed=1), random_examples(9, seed=2)


def close(actual, expected):
    """Float64 agreement up to rounding (relative to the largest entry)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12 * max(scale, 1e-300))


# --- references


def example_nll(model, example):
    """ℓ(z) = −Σₜ log p(yₜ | y<ₜ) over labelled tokens, written out."""
    ids = torch.tensor([example["input_ids"]])
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out
    log_probs = torch.log_softmax(logits[0, :-1].double(), dim=-1)  # [T-1, V]
    total = torch.zeros((), dtype=torch.float64)
    for t, label in enumerate(example["labels"][1:]):
        if label != -100:
            total = total - log_probs[t, label]
    return total


def loop_gradient(model, examples):
    """(1/n) Σᵢ ∇θ ℓ(zᵢ), one example at a time, in float64."""
    params = trainable(model)
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for example in examples:
        grads = torch.autograd.grad(
            example_nll(model, example), list(params.values()), allow_unused=True
        )
        for name, g in zip(params, grads, strict=True):
            if g is not None:
                total[name] += g.double()
    return {n: g / len(examples) for n, g in total.items()}


def layout(module, weight, bias):
    """vec of the ``[out, in (+1)]`` layout: Linear weight rows, Conv1D's transposed."""
    w = weight.T if isinstance(module, Conv1D) else weight
    return (w if bias is None else torch.cat([w, bias[:, None]], dim=1)).flatten()


def dense_curvature(factors, module):
    """The approximation's G for one module as a dense float64 matrix over vec(layout)."""
    t = {k: v.double() for k, v in factors.tensors[module].items()}
    strategy = factors.arguments.strategy
    if strategy == "diagonal":
        return torch.diag(t["diagonal"].flatten())
    if strategy == "kfac":  # S ⊗ A, straight from the covariances
        return torch.kron(t["gradient_covariance"], t["activation_covariance"])
    basis = torch.kron(t["gradient_eigenvectors"], t["activation_eigenvectors"])
    return basis @ torch.diag(t["lambda"].flatten()) @ basis.T


def dense_direction(model, factors, gradient, lam=None):
    """d = (G + λI)⁻¹ ḡ per tracked module by a dense solve; λ default 0.1 × tr(G)/dim."""
    named = dict(model.named_modules())
    direction = {}
    for name in factors.modules:
        module = named[name]
        bias = gradient.get(f"{name}.bias")
        g = layout(module, gradient[f"{name}.weight"], bias)
        curvature = dense_curvature(factors, name)
        damping = 0.1 * torch.trace(curvature) / len(g) if lam is None else lam
        d = torch.linalg.solve(curvature + damping * torch.eye(len(g), dtype=g.dtype), g)
        out_features = module.weight.shape[1 if isinstance(module, Conv1D) else 0]
        d = d.view(out_features, -1)
        w = d[:, :-1] if bias is not None else d
        direction[f"{name}.weight"] = w.T if isinstance(module, Conv1D) else w
        if bias is not None:
            direction[f"{name}.bias"] = d[:, -1]
    return direction


# --- fixtures


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def gradients(llama):
    return mean_gradient(llama, TASK, FORGET), mean_gradient(llama, TASK, RETAIN)


@pytest.fixture(scope="module")
def llama_factors(llama):
    return fit_factors(
        llama, TASK, FORGET + RETAIN, FactorArguments(strategy="ekfac", dtype="float64")
    )


@pytest.fixture(scope="module")
def toy():
    """Embedding, Linear with a bias, Conv1D with a bias, head: every layout case."""
    return toy_lm()


def toy_factors(model, strategy):
    return fit_factors(
        model, TASK, FORGET + RETAIN, FactorArguments(strategy=strategy, dtype="float64")
    )


# --- mean gradient


def test_mean_gradient_equals_the_per_example_loop(llama, gradients):
    expected = loop_gradient(llama, FORGET)
    actual, _ = gradients
    assert list(actual) == [n for n, _ in llama.named_parameters()]
    for name in expected:
        assert actual[name].dtype == torch.float64
        close(actual[name], expected[name])
    assert llama.model.embed_tokens.weight.grad is None  # .grad is never touched


@pytest.mark.parametrize("batch_size", [1, 2, 3, 100])
def test_mean_gradient_is_batch_size_invariant(llama, gradients, batch_size):
    reference, _ = gradients  # batch size 16: one batch
    actual = mean_gradient(llama, TASK, FORGET, batch_size=batch_size)
    for name in reference:
        close(actual[name], reference[name])


def test_mean_gradient_skips_frozen_parameters_and_refuses_no_examples():
    model = toy_lm()
    model.embed.weight.requires_grad_(False)
    gradient = mean_gradient(model, TASK, FORGET[:2])
    assert "embed.weight" not in gradient
    expected = loop_gradient(model, FORGET[:2])
    assert set(gradient) == set(expected)
    for name in expected:
        close(gradient[name], expected[name])
    with pytest.raises(InputError, match="no examples"):
        mean_gradient(model, TASK, [])


# --- Newton direction


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_newton_direction_equals_the_dense_damped_solve(toy, strategy):
    factors = toy_factors(toy, strategy)
    assert factors.modules == ["blocks.0", "blocks.1"]  # Linear and Conv1D, both with a bias
    gradient = mean_gradient(toy, TASK, FORGET)
    direction = newton_direction(toy, factors, gradient)
    expected = dense_direction(toy, factors, gradient)
    assert set(direction) == set(expected)  # embed and head are not tracked: absent
    for name in expected:
        assert direction[name].shape == gradient[name].shape
        close(direction[name], expected[name])


def test_newton_direction_on_llama_equals_the_dense_solve(llama, gradients, llama_factors):
    g_f, _ = gradients
    direction = newton_direction(llama, llama_factors, g_f)
    expected = dense_direction(llama, llama_factors, g_f)
    assert set(direction) == {f"{m}.weight" for m in llama_factors.modules}
    for name in expected:
        close(direction[name], expected[name])


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_newton_direction_honours_the_given_damping(toy, strategy):
    factors = toy_factors(toy, strategy)
    gradient = mean_gradient(toy, TASK, FORGET)
    default = newton_direction(toy, factors, gradient)
    for damping in (Damping(value=0.3), 0.3):
        direction = newton_direction(toy, factors, gradient, damping)
        expected = dense_direction(toy, factors, gradient, lam=0.3)
        for name in expected:
            close(direction[name], expected[name])
            assert not torch.allclose(direction[name], default[name], rtol=1e-3)
    # a damping factor other than 0.1 scales each module's mean eigenvalue
    direction = newton_direction(toy, factors, gradient, Damping(factor=0.5))
    for name in factors.modules:
        lam = 0.5 * torch.trace(dense_curvature(factors, name)) / factors.eigenvalues(name).numel()
        expected = dense_direction(toy, factors, gradient, lam=lam)
        for key in (f"{name}.weight", f"{name}.bias"):
            close(direction[key], expected[key])


def test_newton_direction_skips_a_module_without_gradient(toy):
    factors = toy_factors(toy, "ekfac")
    gradient = mean_gradient(toy, TASK, FORGET)
    del gradient["blocks.1.weight"], gradient["blocks.1.bias"]
    assert set(newton_direction(toy, factors, gradient)) == {"blocks.0.weight", "blocks.0.bias"}


def test_factors_of_another_model_are_refused(toy):
    factors = toy_factors(toy, "diagonal")
    other = nn.Sequential()
    other.register_parameter("w", nn.Parameter(torch.zeros(1)))
    with pytest.raises(InputError, match=r"blocks\.0"):
        newton_direction(other, factors, {"w": torch.zeros(1)})


# --- scores


def test_ekfac_scores_by_hand(llama, gradients, llama_factors):
    g_f, g_r = gradients
    damping = Damping(value=0.05)
    d = dense_direction(llama, llama_factors, g_f, lam=0.05)
    scores = ekfac_scores(llama, llama_factors, g_f, g_r, retain_penalty=0.5, damping=damping)
    assert list(scores) == list(g_f)
    for name, s in scores.items():
        if name in d:
            close(s, (d[name] * g_f[name]).abs() - 0.5 * (d[name] * g_r[name]).abs())
        else:  # not tracked: never preferred
            assert s.shape == g_f[name].shape
            assert bool((s == -math.inf).all()), name
    assert "lm_head.weight" in scores and "model.embed_tokens.weight" in scores
    assert "model.embed_tokens.weight" not in d


def test_wagle_saliency_and_magnitude_scores_by_hand(llama, gradients):
    g_f, g_r = gradients
    params = dict(llama.named_parameters())
    wagle = wagle_scores(llama, g_f, g_r, mu=1e-3)
    saliency = saliency_scores(g_f)
    magnitude = magnitude_scores(llama)
    assert list(wagle) == list(saliency) == list(magnitude) == list(params)
    for name, p in params.items():
        theta = p.detach()
        close(wagle[name], ((theta - g_r[name] / 1e-3) * g_f[name]).abs())
        assert torch.equal(saliency[name], g_f[name].abs())
        assert torch.equal(magnitude[name], theta.abs())
        assert not magnitude[name].requires_grad


def test_magnitude_scores_only_trainable_parameters():
    model = toy_lm()
    model.head.weight.requires_grad_(False)
    assert "head.weight" not in magnitude_scores(model)
    assert "head.weight" not in random_scores(model, 0)


def test_random_scores_are_seeded_deterministic_and_device_independent(llama):
    scores = random_scores(llama, seed=7)
    generator = torch.Generator().manual_seed(7)
    for name, p in llama.named_parameters():  # the draws, in parameter order
        expected = torch.rand(p.shape, generator=generator)
        assert scores[name].device.type == "cpu"
        assert torch.equal(scores[name], expected), name
    again, other = random_scores(llama, seed=7), random_scores(llama, seed=8)
    assert all(torch.equal(again[n], scores[n]) for n in scores)
    assert not any(torch.equal(other[n], scores[n]) for n in scores)
    # the same noise whatever device (here: none at all) the model lives on
    elsewhere = copy.deepcopy(llama).to("meta")
    moved = random_scores(elsewhere, seed=7)
    assert all(torch.equal(moved[n], scores[n]) for n in scores)
    if torch.cuda.is_available():
        on_gpu = random_scores(copy.deepcopy(llama).cuda(), seed=7)
        assert all(torch.equal(on_gpu[n], scores[n]) for n in scores)


# --- choose_scope


@pytest.mark.parametrize("method", ["ekfac", "wagle", "saliency", "magnitude", "random"])
@pytest.mark.parametrize("sparsity", [0.013, 0.3])
def test_choose_scope_keeps_exactly_the_top_fraction(
    llama, gradients, llama_factors, method, sparsity
):
    arguments = ScopeArguments(method=method, sparsity=sparsity, wagle_mu=1e-3, seed=3)
    scope = choose_scope(llama, TASK, FORGET, RETAIN, arguments, llama_factors)
    g_f, g_r = gradients
    expected = {
        "ekfac": lambda: ekfac_scores(llama, llama_factors, g_f, g_r),
        "wagle": lambda: wagle_scores(llama, g_f, g_r, mu=1e-3),
        "saliency": lambda: saliency_scores(g_f),
        "magnitude": lambda: magnitude_scores(llama),
        "random": lambda: random_scores(llama, 3),
    }[method]()
    n = sum(p.numel() for p in llama.parameters())
    assert scope.total == n
    assert scope.edited == round(sparsity * n)
    kept = torch.cat([expected[k][scope.masks[k]].flatten() for k in expected])
    dropped = torch.cat([expected[k][~scope.masks[k]].flatten() for k in expected])
    assert kept.min() >= dropped.max()


def test_choose_scope_all_and_full_sparsity_keep_everything(llama):
    n = sum(p.numel() for p in llama.parameters())
    for arguments in (ScopeArguments(method="all"), ScopeArguments(method="ekfac", sparsity=1)):
        scope = choose_scope(llama, TASK, FORGET, RETAIN, arguments)  # no factors needed
        assert scope.edited == scope.total == n


def test_choose_scope_refuses_ekfac_without_factors(llama):
    with pytest.raises(InputError, match="EK-FAC factors"):
        choose_scope(llama, TASK, FORGET, RETAIN, ScopeArguments(method="ekfac"))

"""Preconditioned conjugate gradient against the dense damped solve (float64, tiny models).

The convergence tests use many more training examples than parameters (the toy LM: 192
tracked parameters, 300 examples), so that G is full rank as in practice. Measured with
only 12–24 examples on the tiny Llama (G of rank ≤ 24 in 1088 dimensions), plain CG
converges in about rank + 1 iterations while the EK-FAC preconditioner slows it down:
preconditioning pays when the curvature is well determined, not on a handful of examples.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, hessian

from attribution import Damping, FactorArguments, InputError, LanguageModelingTask, fit_factors
from attribution.gradients import per_example_gradients_func
from attribution.influence import ScoreArguments, pairwise_scores, self_scores
from attribution.modules import select_modules, to_parameter_gradients
from attribution.solve import conjugate_gradient, curvature_product

from .models import random_examples, tiny_gpt2, tiny_llama, toy_lm

TASK = LanguageModelingTask(pad_id=0)


def fit(model, examples, strategy="ekfac"):
    arguments = FactorArguments(strategy=strategy, fisher="empirical", dtype="float64")
    return fit_factors(model, TASK, examples, arguments)


def flat(gradients, modules):
    """Per-example gradients of every module, one row per example: [n, Σ params]."""
    return torch.cat([gradients[name].reshape(gradients[name].shape[0], -1) for name in modules], 1)


def setting(make=tiny_llama, n_train=12, n_query=3):
    model = make()
    train, queries = random_examples(n_train, seed=1), random_examples(n_query, seed=2)
    factors = fit(model, train)
    modules = select_modules(model, factors.modules)
    gz = per_example_gradients_func(model, TASK, TASK.collate(train), modules)
    gq = per_example_gradients_func(model, TASK, TASK.collate(queries), modules)
    return model, train, factors, modules, gz, gq


def dense_solve(factors, modules, gz, gq, damping):
    """(G + D)⁻¹ b with G the exact empirical Fisher over all tracked parameters."""
    z, q = flat(gz, modules), flat(gq, modules)
    fisher = z.T @ z / z.shape[0]
    diagonal = torch.cat(
        [torch.full((gz[n][0].numel(),), factors.damping(n, damping)) for n in modules]
    ).to(fisher.dtype)
    return torch.linalg.solve(fisher + torch.diag(diagonal), q.T).T


def test_the_curvature_product_is_the_dense_fisher_times_v():
    model, train, factors, modules, gz, gq = setting(tiny_gpt2)
    product = curvature_product(model, TASK, train, factors, gq)
    z = flat(gz, modules)
    expected = flat(gq, modules) @ (z.T @ z / len(train))
    torch.testing.assert_close(flat(product, modules), expected, rtol=1e-9, atol=1e-12)


def test_pcg_converges_to_the_dense_damped_solve():
    model, train, factors, modules, gz, gq = setting(toy_lm, n_train=300)
    exact = dense_solve(factors, modules, gz, gq, None)
    ekfac = {n: factors.inverse_product(n, gq[n]) for n in modules}
    start = conjugate_gradient(model, TASK, train, factors, gq, iterations=0)
    torch.testing.assert_close(flat(start.solution, modules), flat(ekfac, modules))
    solve = conjugate_gradient(model, TASK, train, factors, gq, iterations=75)
    errors = (flat(solve.solution, modules) - exact).norm(dim=1) / exact.norm(dim=1)
    assert errors.max() < 1e-7, errors
    first = (flat(ekfac, modules) - exact).norm(dim=1) / exact.norm(dim=1)
    assert (first > 1e-3).all()  # EK-FAC alone is not the exact solve: the test can fail
    residuals = torch.stack(solve.residuals)  # [iterations + 1, n_q]
    assert residuals[-1].max() < 1e-9 and (residuals[10] < residuals[0] / 10).all()


def iterations_to(solve, tolerance):
    for k, residual in enumerate(solve.residuals):
        if residual.max() <= tolerance:
            return k
    return len(solve.residuals)


def test_the_ekfac_preconditioner_cuts_the_iterations_against_plain_cg():
    """The same system (one absolute λ), solved by CG with M = I and with M = EK-FAC."""
    model, train, factors, modules, gz, gq = setting(toy_lm, n_train=300)
    identity = fit(model, train, "identity")
    damping = Damping(value=1e-3)
    exact = dense_solve(factors, modules, gz, gq, damping)
    plain = conjugate_gradient(model, TASK, train, identity, gq, damping, iterations=80)
    preconditioned = conjugate_gradient(model, TASK, train, factors, gq, damping, iterations=60)
    for solve in (plain, preconditioned):
        torch.testing.assert_close(flat(solve.solution, modules), exact, rtol=1e-5, atol=1e-8)
    fast, slow = iterations_to(preconditioned, 1e-6), iterations_to(plain, 1e-6)
    assert 2 * fast < slow, (fast, slow)  # measured: 14 vs 41 at λ = 1e-3


def test_pairwise_scores_with_cg_are_the_exact_damped_influence():
    """score(q, z) = ∇ℓ(q)ᵀ (G + D)⁻¹ ∇ℓ(z) with G exact, through the scoring path."""
    model, train, factors, modules, gz, gq = setting(toy_lm, n_train=300)
    arguments = ScoreArguments(dtype="float64", cg_iterations=75)
    scores = pairwise_scores(model, TASK, random_examples(3, seed=2), train, factors, arguments)
    expected = dense_solve(factors, modules, gz, gq, None) @ flat(gz, modules).T
    torch.testing.assert_close(scores.total, expected, rtol=1e-6, atol=1e-9)
    approximate = pairwise_scores(
        model, TASK, random_examples(3, seed=2), train, factors, ScoreArguments(dtype="float64")
    ).total
    assert not torch.allclose(approximate, expected, rtol=1e-3)  # the solve changed something
    with pytest.raises(InputError, match="cg_iterations"):
        ScoreArguments(cg_iterations=-1)
    with pytest.raises(InputError, match="self-influence"):
        self_scores(model, TASK, train[:3], factors, arguments)


def test_the_hessian_product_is_the_dense_hessian_times_v():
    """H of the mean training loss over the tracked weights and biases (torch.func)."""
    model, train, factors, modules, _, gq = setting(toy_lm, n_train=40)
    product = curvature_product(model, TASK, train, factors, gq, curvature="hessian")
    names = [
        f"{m}.{k}"
        for m in modules
        for k in ("weight", "bias")
        if getattr(modules[m], k) is not None
    ]
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    batch = TASK.collate(train)

    def mean_loss(tracked):
        return TASK.loss(_Bound(model, tracked), batch).sum() / len(train)

    blocks = hessian(mean_loss)(params)
    matrix = torch.cat(
        [
            torch.cat(
                [blocks[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1
            )
            for a in names
        ]
    )
    expected = in_parameter_layout(gq, modules) @ matrix  # H is symmetric
    actual = in_parameter_layout(product, modules)
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10)


def in_parameter_layout(vectors, modules):
    """[n_q, Σ params] in named_parameters order (weight then bias per module)."""
    parts = []
    for name in modules:
        split = to_parameter_gradients(modules[name], vectors[name])
        parts += [split[k].reshape(split[k].shape[0], -1) for k in ("weight", "bias") if k in split]
    return torch.cat(parts, 1)


class _Bound(torch.nn.Module):
    """The model with its tracked parameters replaced (for torch.func.hessian)."""

    def __init__(self, model, tracked):
        super().__init__()
        self.model, self.tracked = model, tracked

    def forward(self, input_ids, attention_mask=None):
        return functional_call(self.model, self.tracked, (input_ids,), strict=False)


def test_the_hessian_product_runs_through_fused_attention():
    """SDPA has no second derivative on the CPU: the product switches to eager attention
    for its passes (and back), and matches an eager model's."""
    model, train, factors, _, _, gq = setting(tiny_llama, n_train=6)
    assert model.config._attn_implementation == "sdpa"
    fused = curvature_product(model, TASK, train, factors, gq, curvature="hessian")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    eager = curvature_product(model, TASK, train, factors, gq, curvature="hessian")
    for name in fused:
        torch.testing.assert_close(fused[name], eager[name])

"""Curvature factors against dense float64 references, invariances and a negative control."""

from __future__ import annotations

import pytest
import torch

from attribution import FactorArguments, LanguageModelingTask, fit_factors, select_modules
from attribution.gradients import per_example_gradients_func

from .models import random_examples, tiny_gpt2, tiny_llama, toy_lm

TASK = LanguageModelingTask(pad_id=0)


def fit(model, examples, strategy="ekfac", fisher="empirical", **kwargs):
    arguments = FactorArguments(strategy=strategy, fisher=fisher, dtype="float64", **kwargs)
    return fit_factors(model, TASK, examples, arguments)


def dense_fisher(model, examples, module):
    """E_z[vec(G_z) vec(G_z)ᵀ] from torch.func per-example gradients (empirical labels)."""
    modules = select_modules(model, [module])
    grads = per_example_gradients_func(model, TASK, TASK.collate(examples), modules)[module]
    flat = grads.reshape(grads.shape[0], -1)  # row-major vec: index o * n_in + i
    return flat.T @ flat / flat.shape[0]


def dense_approximation(factors, module):
    """The dense matrix C of a strategy: S ⊗ A (K-FAC) or Q diag(Λ) Qᵀ (EK-FAC)."""
    t = factors.tensors[module]
    if factors.arguments.strategy == "diagonal":
        return torch.diag(t["diagonal"].reshape(-1))
    q = torch.kron(t["gradient_eigenvectors"], t["activation_eigenvectors"])
    return q @ torch.diag(factors.eigenvalues(module).reshape(-1)) @ q.T


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("damping", [None, 0.3])
def test_inverse_product_solves_the_dense_damped_system(strategy, damping):
    model = toy_lm()
    factors = fit(model, random_examples(12), strategy)
    for module in factors.modules:
        dense = dense_approximation(factors, module)
        lam = factors.damping(module, damping)
        vectors = torch.randn(3, *factors.eigenvalues(module).shape, dtype=torch.float64)
        fast = factors.inverse_product(module, vectors, damping)
        eye = torch.eye(dense.shape[0], dtype=torch.float64)
        exact = torch.linalg.solve(dense + lam * eye, vectors.reshape(3, -1).T).T
        torch.testing.assert_close(fast.reshape(3, -1), exact, rtol=1e-8, atol=1e-10)


def test_kfac_dense_is_the_kronecker_product_of_the_covariances():
    factors = fit(toy_lm(), random_examples(6), "kfac")
    for module in factors.modules:
        t = factors.tensors[module]
        kron = torch.kron(t["gradient_covariance"], t["activation_covariance"])
        torch.testing.assert_close(dense_approximation(factors, module), kron)


class PredictingTokensTask(LanguageModelingTask):
    """Counts in A only the positions whose prediction is labelled (a valid token mask)."""

    def token_mask(self, batch):
        mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
        mask[:, :-1] = batch["labels"][:, 1:] != -100
        return mask


def test_exact_where_the_kronecker_factorization_is_exact():
    """One sequence with one labelled token: G_z = g aᵀ is rank one and G = S ⊗ A exactly."""
    model = toy_lm()  # position-wise, so only position 0 gets an output gradient
    example = [{"input_ids": [4, 9], "labels": [-100, 9]}]
    for module in ("blocks.0", "blocks.1", "head"):
        dense = dense_fisher(model, example, module)
        for strategy in ("kfac", "ekfac"):
            arguments = FactorArguments(
                strategy=strategy, fisher="empirical", dtype="float64", modules=(module,)
            )
            factors = fit_factors(model, PredictingTokensTask(pad_id=0), example, arguments)
            torch.testing.assert_close(dense_approximation(factors, module), dense)


@pytest.mark.parametrize("make", [toy_lm, tiny_llama, tiny_gpt2])
def test_ekfac_fits_the_dense_fisher_at_least_as_well_as_kfac(make):
    model = make()
    examples = random_examples(16, seed=2)
    kfac, ekfac = (fit(model, examples, s) for s in ("kfac", "ekfac"))
    for module in kfac.modules[:4]:
        dense = dense_fisher(model, examples, module)
        err_kfac = torch.linalg.norm(dense - dense_approximation(kfac, module))
        err_ekfac = torch.linalg.norm(dense - dense_approximation(ekfac, module))
        assert err_ekfac <= err_kfac * (1 + 1e-9), module


def test_diagonal_is_the_diagonal_of_the_dense_fisher():
    model = toy_lm()
    examples = random_examples(10)
    factors = fit(model, examples, "diagonal")
    for module in factors.modules:
        expected = torch.diagonal(dense_fisher(model, examples, module))
        torch.testing.assert_close(factors.tensors[module]["diagonal"].reshape(-1), expected)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_factors_do_not_depend_on_batch_size(strategy):
    model = tiny_llama()
    examples = random_examples(10, seed=4)
    one, three, all_ = (fit(model, examples, strategy, batch_size=b) for b in (1, 3, 10))
    for module in one.modules:
        for key, value in one.tensors[module].items():
            if "eigenvectors" in key:  # defined up to sign: compare the projector instead
                continue
            torch.testing.assert_close(three.tensors[module][key], value)
            torch.testing.assert_close(all_.tensors[module][key], value)


def test_damping_heuristic_is_a_tenth_of_the_mean_eigenvalue():
    factors = fit(toy_lm(), random_examples(8), "ekfac")
    module = factors.modules[0]
    assert factors.damping(module) == pytest.approx(0.1 * factors.tensors[module]["lambda"].mean())
    assert factors.damping(module, 0.5) == 0.5


def test_negative_control_shifted_labels_give_other_factors():
    model = tiny_llama()
    examples = random_examples(12, seed=5)
    shifted = [{"input_ids": e["input_ids"], "labels": [-100, *e["labels"][:-1]]} for e in examples]
    right, wrong = fit(model, examples), fit(model, shifted)
    module = right.modules[0]
    a, b = right.tensors[module]["lambda"], wrong.tensors[module]["lambda"]
    assert torch.linalg.norm(a - b) > 0.05 * torch.linalg.norm(a)


def test_true_fisher_is_seeded():
    model = tiny_llama()
    examples = random_examples(6)
    first, again, other = (fit(model, examples, fisher="true", seed=s) for s in (0, 0, 1))
    module = first.modules[0]
    assert torch.equal(first.tensors[module]["lambda"], again.tensors[module]["lambda"])
    assert not torch.equal(first.tensors[module]["lambda"], other.tensors[module]["lambda"])


def test_identity_leaves_vectors_unchanged():
    factors = fit(toy_lm(), random_examples(3), "identity")
    v = torch.randn(2, 6, 6, dtype=torch.float64)
    assert torch.equal(factors.inverse_product("blocks.0", v), v)


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_factors_do_not_depend_on_partitioning_or_batching(fisher):
    model = tiny_gpt2()
    examples = random_examples(11, seed=6)
    whole = fit(model, examples, fisher=fisher, batch_size=11)
    parts = fit(model, examples, fisher=fisher, batch_size=2, partitions=3)
    for module in whole.modules:
        for key in ("activation_covariance", "gradient_covariance", "lambda"):
            torch.testing.assert_close(parts.tensors[module][key], whole.tensors[module][key])


def test_bad_arguments_are_named():
    from attribution import InputError

    with pytest.raises(InputError, match="strategy must be one of"):
        FactorArguments(strategy="hessian")
    with pytest.raises(InputError, match="partitions must be an integer >= 1"):
        FactorArguments(partitions=0)
    with pytest.raises(InputError, match="dtype must be one of"):
        FactorArguments(dtype="bfloat16")


def test_nan_weights_are_refused_with_a_clear_error():
    from attribution.errors import NonFiniteError

    model = toy_lm()
    with torch.no_grad():
        model.blocks[1].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        fit(model, random_examples(4))


def test_lambda_on_a_share_is_the_mean_over_its_random_examples():
    """Λ fitted on a fraction equals the float64 reference E_{z ∈ share}[(Q_Sᵀ G_z Q_A)²]
    in the eigenbasis of every example's covariances; the covariances are untouched."""
    from attribution.curvature import RandomShare

    model = tiny_llama()
    examples = random_examples(10, seed=8)
    full, share = fit(model, examples), fit(model, examples, lambda_fraction=0.35, seed=3)
    chosen = RandomShare.of(examples, 0.35, seed=3)[:]  # n = round(3.5) = 4
    assert len(chosen) == 4
    modules = select_modules(model, share.modules)
    grads = per_example_gradients_func(model, TASK, TASK.collate(chosen), modules)
    for module in share.modules:
        t = full.tensors[module]
        for key in ("activation_covariance", "gradient_covariance"):
            assert torch.equal(share.tensors[module][key], t[key])
        rotated = t["gradient_eigenvectors"].T @ grads[module] @ t["activation_eigenvectors"]
        torch.testing.assert_close(share.tensors[module]["lambda"], (rotated**2).mean(0))
    first = share.modules[0]  # negative control: the share's Λ is not every example's
    difference = full.tensors[first]["lambda"] - share.tensors[first]["lambda"]
    assert difference.abs().max() > 1e-3 * full.tensors[first]["lambda"].abs().max()
    assert share.work["lambda"]["examples_per_rank"] == "[4]"


def test_a_random_share_is_seeded_ordered_and_indexes_like_a_list():
    from attribution.curvature import RandomShare

    examples = list(range(100))
    share, again, other = (RandomShare.of(examples, 0.1, seed) for seed in (0, 0, 1))
    assert len(share) == 10 and share[:] == again[:] and share[:] != other[:]
    assert share[:] == sorted(set(share[:]))  # distinct, in the data's order
    assert share[2:5] == share[:][2:5] and share[-1] == share[:][-1]
    assert share[:] != list(range(0, 100, 10))  # not a stride
    assert len(RandomShare.of(list(range(3)), 0.01, 0)) == 1  # never empty
    with pytest.raises(IndexError):
        share[10]


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, float("nan"), "half", True])
def test_bad_lambda_fractions_are_refused(bad):
    from attribution import InputError

    with pytest.raises(InputError, match="lambda_fraction"):
        FactorArguments(lambda_fraction=bad)


def test_lambda_fraction_is_refused_without_lambda():
    from attribution import InputError

    with pytest.raises(InputError, match="applies to ekfac only"):
        FactorArguments(strategy="kfac", lambda_fraction=0.5)

"""Scope masks: exact sparsity, rankings, granularity, file round trip, bad input."""

from __future__ import annotations

import pytest
import torch

from attribution import FactorArguments, LanguageModelingTask, fit_factors
from attribution.errors import InputError
from tests.attribution.models import random_examples, tiny_llama
from unlearn import Scope, ScopeArguments, choose_scope
from unlearn.scope import mask_from_scores


def scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.rand(10, 10, generator=g),
        "b": torch.rand(50, generator=g),
        "c": torch.rand(3, 7, generator=g),
    }


@pytest.mark.parametrize("sparsity", [0.01, 0.05, 0.2, 0.5, 1.0])
def test_global_ranking_keeps_exactly_the_requested_fraction(sparsity):
    s = scores()
    scope = mask_from_scores(s, sparsity)
    assert scope.edited == max(1, round(sparsity * 171))
    kept = torch.cat([s[n][scope.masks[n]] for n in s])
    dropped = torch.cat([s[n][~scope.masks[n]] for n in s])
    if len(dropped):
        assert kept.min() >= dropped.max()


def test_per_tensor_ranking_keeps_the_fraction_of_each_tensor():
    scope = mask_from_scores(scores(), 0.1, ranking="per_tensor")
    assert [scope.in_scope(n) for n in ("a", "b", "c")] == [10, 5, 2]


def test_tensor_granularity_keeps_whole_tensors():
    s = scores()
    s["b"] += 10  # the best tensor by mean score
    scope = mask_from_scores(s, 0.3, granularity="tensor")
    assert scope.masks["b"].all() and not scope.masks["a"].any()
    assert scope.edited <= 0.3 * 171 or scope.edited == 50


def test_unscored_tensors_are_never_chosen_per_tensor():
    s = scores()
    s["c"] = torch.full((3, 7), -float("inf"))
    assert mask_from_scores(s, 0.5, ranking="per_tensor").in_scope("c") == 0


def test_round_trip_through_safetensors(tmp_path):
    scope = mask_from_scores(scores(), 0.1)
    scope.save(tmp_path / "scope.safetensors")
    loaded = Scope.load(tmp_path / "scope.safetensors")
    assert all(torch.equal(loaded.masks[n], scope.masks[n]) for n in scope.masks)
    assert loaded.by_layer() == scope.by_layer()


@pytest.mark.parametrize("sparsity", [0, -0.1, 1.5, float("nan")])
def test_bad_sparsity(sparsity):
    with pytest.raises(InputError, match="sparsity must be in"):
        ScopeArguments(sparsity=sparsity)


def test_unknown_scope():
    with pytest.raises(InputError, match="unknown scope 'everything'"):
        ScopeArguments(method="everything")


def test_a_mask_for_another_model_is_refused():
    model = tiny_llama()
    with pytest.raises(InputError, match="not a parameter"):
        Scope({"nope.weight": torch.ones(2, dtype=torch.bool)}).check_fits(model)
    name, param = next(iter(model.named_parameters()))
    with pytest.raises(InputError, match="shape"):
        Scope({name: torch.ones(param.numel() + 1, dtype=torch.bool)}).check_fits(model)


@pytest.fixture(scope="module")
def setting():
    model = tiny_llama()
    task = LanguageModelingTask(pad_id=0)
    forget, retain = random_examples(6, seed=1), random_examples(12, seed=2)
    factors = fit_factors(
        model, task, forget + retain, FactorArguments(strategy="ekfac", dtype="float64")
    )
    return model, task, forget, retain, factors


@pytest.mark.parametrize("method", ["ekfac", "wagle", "saliency", "magnitude", "random"])
def test_every_scope_has_the_requested_sparsity(setting, method):
    model, task, forget, retain, factors = setting
    scope = choose_scope(
        model, task, forget, retain, ScopeArguments(method=method, sparsity=0.05), factors
    )
    total = sum(p.numel() for p in model.parameters())
    assert scope.total == total
    assert scope.edited == round(0.05 * total)


def test_random_is_a_different_mask_at_the_same_sparsity(setting):
    model, task, forget, retain, factors = setting

    def choose(**kw):
        return choose_scope(
            model, task, forget, retain, ScopeArguments(sparsity=0.05, **kw), factors
        )

    random0, random1, ekfac = (
        choose(method="random", seed=0),
        choose(method="random", seed=1),
        choose(method="ekfac"),
    )
    assert random0.edited == random1.edited == ekfac.edited
    for other in (random1, ekfac):
        assert any(not torch.equal(random0.masks[n], other.masks[n]) for n in random0.masks)
    again = choose(method="random", seed=0)
    assert all(torch.equal(random0.masks[n], again.masks[n]) for n in random0.masks)


def test_ekfac_scope_only_edits_tracked_modules(setting):
    model, task, forget, retain, factors = setting
    scope = choose_scope(
        model, task, forget, retain, ScopeArguments(method="ekfac", sparsity=0.2), factors
    )
    tracked = {f"{m}.weight" for m in factors.modules} | {f"{m}.bias" for m in factors.modules}
    assert {n for n in scope.masks if scope.in_scope(n)} <= tracked


def test_ekfac_scores_prefer_parameters_without_retain_knowledge(setting):
    from unlearn.importance import ekfac_scores, mean_gradient

    model, task, forget, retain, factors = setting
    g_f, g_r = mean_gradient(model, task, forget), mean_gradient(model, task, retain)
    plain = ekfac_scores(model, factors, g_f, g_r, retain_penalty=0.0)
    balanced = ekfac_scores(model, factors, g_f, g_r, retain_penalty=1.0)
    for name in plain:
        if torch.isfinite(plain[name]).all():
            assert (balanced[name] <= plain[name] + 1e-15).all()

"""Damping chosen on data: the search restores the model exactly, its stacked scoring
equals one scoring per candidate, its responses equal an independent fine-tune, and it
picks the regime its perturbations live in (a negative control: one tiny gradient step
is answered best by the largest damping, a converged convex refit by a small one)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from attribution import Damping, FactorArguments, InputError, LanguageModelingTask, fit_factors
from attribution.damping_search import (
    SearchArguments,
    candidate_predictions,
    choose_damping,
    perturbation_responses,
    probe_losses,
    random_halves,
)
from attribution.influence import ScoreArguments, pairwise_scores

from .models import VOCAB, random_examples, tiny_llama

TASK = LanguageModelingTask(pad_id=0)


class FrozenFeatures(nn.Module):
    """A fixed random embedding, then one tracked Linear head: the loss is convex in the
    head, so fine-tuning on a half converges to that half's optimum."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.embed.weight.requires_grad_(False)
        self.blocks = nn.ModuleList([nn.Linear(width, VOCAB)])

    def forward(self, input_ids, attention_mask=None):
        return self.blocks[0](self.embed(input_ids))


@functools.cache
def convex_setting():
    train, probes = random_examples(80, seed=1), random_examples(12, seed=2)
    model = trained_convex_model(train)
    return model, train, probes, fit(model, train)


def trained_convex_model(train, steps=200):
    torch.manual_seed(0)
    model = FrozenFeatures().double()
    optimizer = torch.optim.Adam(model.blocks.parameters(), lr=3e-2)
    batch = TASK.collate(train)
    for _ in range(steps):
        optimizer.zero_grad()
        TASK.loss(model, batch).mean().backward()
        optimizer.step()
    return model.eval()


def fit(model, train):
    arguments = FactorArguments(strategy="ekfac", fisher="empirical", dtype="float64")
    return fit_factors(model, TASK, train, arguments)


def test_the_model_is_restored_bit_for_bit_with_its_gradient_flags():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    train, probes = random_examples(12, seed=1), random_examples(3, seed=2)
    factors = fit(model, train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    search = SearchArguments(perturbations=3, steps=4, learning_rate=1e-2)
    choose_damping(model, TASK, train, probes, factors, search)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not model.training


def test_responses_equal_an_independent_fine_tune_of_a_copy():
    model = tiny_llama()
    train, probes = random_examples(12, seed=1), random_examples(3, seed=2)
    factors = fit(model, train)
    search = SearchArguments(perturbations=3, steps=5, learning_rate=1e-2, batch_size=4)
    masks = random_halves(len(train), 3, seed=0)
    found = perturbation_responses(model, TASK, train, probes, factors, masks, search)
    base = probe_losses(model, TASK, probes, 4)
    for k in range(3):  # the obvious loop: a copy, Adam on the tracked modules' parameters
        twin = copy.deepcopy(model)
        params = [p for n, p in twin.named_parameters() if ".layers." in n and "norm" not in n]
        optimizer = torch.optim.Adam(params, lr=1e-2)
        chosen = masks[k].nonzero().flatten()
        generator = torch.Generator().manual_seed(search.seed + k + 1)
        order = []
        for _ in range(5):
            if len(order) < 4:
                order += chosen[torch.randperm(len(chosen), generator=generator)].tolist()
            picked, order = order[:4], order[4:]
            optimizer.zero_grad()
            TASK.loss(twin, TASK.collate([train[i] for i in picked])).mean().backward()
            optimizer.step()
        expected = probe_losses(twin, TASK, probes, 4) - base
        torch.testing.assert_close(found[k], expected, rtol=1e-10, atol=1e-12)


def test_stacked_candidates_equal_one_scoring_per_candidate():
    model = tiny_llama()
    train, probes = random_examples(10, seed=1), random_examples(3, seed=2)
    factors = fit(model, train)
    search = SearchArguments(factors=(0.01, 1.0), perturbations=4)
    masks = random_halves(len(train), 4, seed=0)
    scoring = ScoreArguments(dtype="float64", batch_size=4)
    stacked = candidate_predictions(model, TASK, train, probes, factors, masks, search, scoring)
    assert [d.factor for d in search.damping_candidates()] == [0.01, 1.0, 0.1]  # + the default
    for damping, found in zip(search.damping_candidates(), stacked, strict=True):
        arguments = ScoreArguments(dtype="float64", batch_size=4, damping=damping)
        scores = pairwise_scores(model, TASK, probes, train, factors, arguments).total
        torch.testing.assert_close(found, -(masks.double() @ scores.T), rtol=1e-9, atol=1e-12)


def test_a_converged_convex_refit_prefers_small_damping():
    model, train, probes, factors = convex_setting()
    search = SearchArguments(
        factors=(1e-3, 0.1, 1e3), perturbations=8, steps=60, learning_rate=5e-2, batch_size=40
    )
    choice = choose_damping(model, TASK, train, probes, factors, search)
    agreement = {row["damping"]: row["agreement"] for row in choice.candidates}
    assert choice.damping.factor < 1e3
    small, large = Damping(factor=1e-3).describe(), Damping(factor=1e3).describe()
    assert agreement[small] > agreement[large] + 0.05


def test_negative_control_one_tiny_sgd_step_prefers_the_largest_damping():
    """One small SGD step moves θ by −η∇L_S: a plain gradient, which (G + λI)⁻¹ only
    reproduces as λ → ∞; the search must say so rather than favour small damping."""
    model, train, probes, factors = convex_setting()
    search = SearchArguments(
        factors=(1e-3, 0.1, 1e3),
        perturbations=8,
        steps=1,
        learning_rate=1e-4,
        batch_size=40,
        optimizer="sgd",
    )
    choice = choose_damping(model, TASK, train, probes, factors, search)
    assert choice.damping.factor == 1e3


def test_the_choice_is_reproducible_and_seeded():
    model = tiny_llama()
    train, probes = random_examples(12, seed=1), random_examples(3, seed=2)
    factors = fit(model, train)
    search = SearchArguments(perturbations=4, steps=3, learning_rate=1e-2)
    first = choose_damping(model, TASK, train, probes, factors, search)
    again = choose_damping(model, TASK, train, probes, factors, search)
    assert first.candidates == again.candidates
    assert not torch.equal(random_halves(12, 4, 0), random_halves(12, 4, 1))


@pytest.mark.parametrize(
    "bad",
    [
        {"factors": ()},
        {"factors": (-1.0,)},
        {"factors": (float("nan"),)},
        {"perturbations": 2},
        {"steps": 0},
        {"learning_rate": 0.0},
        {"batch_size": True},
        {"optimizer": "lbfgs"},
        {"margin": -1.0},
    ],
)
def test_bad_search_arguments_are_refused(bad):
    with pytest.raises(InputError):
        SearchArguments(**bad)


def test_too_few_training_examples_are_refused():
    model = tiny_llama()
    train = random_examples(3, seed=1)
    with pytest.raises(InputError, match="at least 4"):
        choose_damping(model, TASK, train, train, fit(model, train))


def test_responses_that_are_pure_noise_keep_the_default_and_say_so(monkeypatch):
    """When the measured loss changes carry no signal (here: replaced by seeded noise),
    every candidate's agreement is noise and the default rule must stay."""
    import attribution.damping_search as search_module

    def noise(model, task, train, probes, factors, masks, search, progress=None):
        generator = torch.Generator().manual_seed(0)
        return torch.randn(len(masks), len(probes), generator=generator, dtype=torch.float64)

    monkeypatch.setattr(search_module, "perturbation_responses", noise)
    model = tiny_llama()
    train, probes = random_examples(12, seed=1), random_examples(12, seed=2)
    factors = fit(model, train)
    choice = choose_damping(model, TASK, train, probes, factors, SearchArguments(steps=1))
    assert choice.damping == Damping() and choice.versus_default["kept_default"]
    assert choice.describe().startswith("kept 0.1 × mean eigenvalue")

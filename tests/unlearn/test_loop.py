"""The masked loop: for every objective and every scope, only in-scope elements move."""

from __future__ import annotations

import copy

import pytest
import torch

from attribution import FactorArguments, LanguageModelingTask, fit_factors
from attribution.errors import InputError, NonFiniteError
from tests.attribution.models import random_examples, tiny_llama
from unlearn import METHODS, SCOPES, ScopeArguments, UnlearnArguments, choose_scope, unlearn


class StubTokenizer:
    """Just enough of a tokenizer for the IDK objective (ids from the tiny vocabulary)."""

    unk_token_id, eos_token_id = None, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5, 6, 7]}


@pytest.fixture(scope="module")
def setting():
    model = tiny_llama()
    task = LanguageModelingTask(pad_id=0)
    task.tokenizer = StubTokenizer()
    forget, retain = random_examples(6, seed=1), random_examples(12, seed=2)
    factors = fit_factors(
        model, task, forget + retain, FactorArguments(strategy="ekfac", dtype="float64")
    )
    return model, task, forget, retain, factors


def run(setting, method, scope_method, sparsity=0.1, ranking="global", **extra):
    base, task, forget, retain, factors = setting
    model = copy.deepcopy(base)
    scope = choose_scope(
        model, task, forget, retain, ScopeArguments(scope_method, sparsity, ranking), factors
    )
    settings = {"steps": 3, "lr": 1e-2, "batch_size": 4, "weight_decay": 0.1}
    settings.update({"retain_budget": None, "eval_every": 1, **extra})
    arguments = UnlearnArguments(method=method, **settings)
    result = unlearn(model, task, forget, retain, scope, arguments, factors)
    return base, model, scope, result


# distill needs text records that name a subject: tests/unlearn/test_stranger.py checks its
# scope on the tiny world.
@pytest.mark.parametrize("scope_method", SCOPES)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "distill"])
def test_only_in_scope_elements_change(setting, method, scope_method):
    if method == "newton":  # the line search needs a budget; per-tensor ranking puts some
        # of the scope in every tracked module (a global one may take embeddings only)
        base, model, scope, result = run(
            setting, method, scope_method, ranking="per_tensor", retain_budget=10.0
        )
    else:
        base, model, scope, result = run(setting, method, scope_method)
    before, after = dict(base.named_parameters()), dict(model.named_parameters())
    moved_in_scope = total_in_scope = 0
    for name, mask in scope.masks.items():
        changed = before[name].detach() != after[name].detach()
        assert not (changed & ~mask).any(), f"{name} changed outside the scope"
        moved_in_scope += int((changed & mask).sum())
        total_in_scope += int(mask.sum())
    for name in before.keys() - scope.masks.keys():
        assert torch.equal(before[name], after[name])
    if method == "newton":
        assert moved_in_scope > 0  # only tracked modules have curvature: embeddings stay
    else:
        assert moved_in_scope / total_in_scope > 0.9  # weight decay moves every element
    assert result.steps_run >= 1


def test_plain_adamw_with_a_masked_gradient_moves_weights_outside_the_scope(setting):
    """Negative control: WAGLE's way (mask the gradient, keep torch's AdamW) is not scoped."""
    base, task, forget, retain, _factors = setting
    model = copy.deepcopy(base)
    scope = choose_scope(model, task, forget, retain, ScopeArguments(method="random", sparsity=0.1))
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.register_hook(lambda g, m=scope.masks[name]: g * m)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    loss = task.loss(model, task.collate(forget)).sum()
    loss.backward()
    optimizer.step()
    name = "model.layers.0.mlp.up_proj.weight"
    mask = scope.masks[name]
    assert (params[name].detach()[~mask] != dict(base.named_parameters())[name][~mask]).any()


def test_same_seed_same_edit(setting):
    _, first, _, _ = run(setting, "npo", "wagle")
    _, second, _, _ = run(setting, "npo", "wagle")
    for (n, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_retain_budget_steps_back_to_the_last_state_within_it(setting):
    base, task, forget, retain, _factors = setting
    model = copy.deepcopy(base)
    scope = choose_scope(model, task, forget, retain, ScopeArguments(method="all"))
    arguments = UnlearnArguments(method="ga", steps=30, lr=0.2, retain_budget=0.05, eval_every=1)
    result = unlearn(model, task, forget, retain, scope, arguments)
    assert result.stopped == "retain budget"
    assert result.end.retain_loss <= result.start.retain_loss + 0.05 + 1e-9


def test_forget_target_stops_early(setting):
    base, task, forget, retain, _ = setting
    model = copy.deepcopy(base)
    scope = choose_scope(model, task, forget, retain, ScopeArguments(method="all"))
    arguments = UnlearnArguments(
        method="ga", steps=50, lr=0.05, forget_target=0.0, retain_budget=None, eval_every=1
    )
    result = unlearn(model, task, forget, retain, scope, arguments)
    assert (result.stopped, result.steps_run) == ("forget target", 1)


def test_nan_loss_is_a_clear_error(setting):
    base, task, forget, retain, _ = setting
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    scope = choose_scope(model, task, forget, retain, ScopeArguments(method="random"))
    bad = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}]
    with pytest.raises(NonFiniteError, match="loss became nan"):
        unlearn(model, task, bad, retain, scope, UnlearnArguments(method="gd", steps=1))


@pytest.mark.parametrize(
    ("forget", "retain", "message"),
    [
        ([], random_examples(3), "forget set is empty"),
        (random_examples(3), [], "retain set is empty"),
        (random_examples(3), random_examples(3), "identical"),
    ],
)
def test_bad_sets(setting, forget, retain, message):
    model, task, *_ = setting
    scope = choose_scope(
        model, task, random_examples(2), random_examples(2, seed=9), ScopeArguments(method="all")
    )
    with pytest.raises(InputError, match=message):
        unlearn(copy.deepcopy(model), task, forget, retain, scope)


def test_bad_arguments():
    with pytest.raises(InputError, match="unknown method 'forgetful'"):
        UnlearnArguments(method="forgetful")
    with pytest.raises(InputError, match="steps must be an integer"):
        UnlearnArguments(steps=0)
    with pytest.raises(InputError, match="lr must be"):
        UnlearnArguments(lr=float("nan"))

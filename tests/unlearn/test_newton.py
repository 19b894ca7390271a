"""The scoped Newton step: its line search on a synthetic loss, the masking helpers
bit for bit, and the whole step on a tiny trained model (forget loss up, retain loss
within its budget, nothing outside the scope moved, the step exactly η × the direction).
"""

from __future__ import annotations

import copy

import pytest
import torch

from attribution import FactorArguments, LanguageModelingTask, fit_factors
from attribution.curvature import Damping
from attribution.errors import InputError
from tests.attribution.models import random_examples, tiny_llama
from unlearn import Scope, ScopeArguments, UnlearnArguments, choose_scope, measure, unlearn
from unlearn.importance import mean_gradient, newton_direction
from unlearn.monitor import Measurement
from unlearn.newton import _line_search, _scoped, _set
from unlearn.scope import full_scope, mask_from_scores

TASK = LanguageModelingTask(pad_id=0)
FORGET, RETAIN = random_examples(5, seed=1), random_examples(9, seed=2)
ETA0 = len(FORGET) / (len(FORGET) + len(RETAIN))


def bits(tensor):
    """The raw bytes of a tensor (NaN payloads and the sign of zero included)."""
    return tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()


# --- the line search, on a synthetic loss


class Synthetic:
    """retain(η) = start + η and forget(η) = 10 η; records every η evaluated."""

    def __init__(self, start=1.0, retain=None):
        self.start, self.calls = start, []
        self.retain = retain or (lambda eta: eta)

    def __call__(self, eta):
        self.calls.append(eta)
        return Measurement(len(self.calls), 10 * eta, self.start + self.retain(eta))


def newton_arguments(**kw):
    return UnlearnArguments(method="newton", **kw)


def grid(eta0, last_k):
    """η₀ × 4ᵏ for k = −8 … last_k."""
    return [eta0 * 4.0**k for k in range(-8, last_k + 1)]


def test_line_search_refines_the_last_good_eta_by_two():
    # budget 5: the grid passes 0.5 and 2, fails at 8; the refinement 4 is within it
    evaluate = Synthetic()
    eta, point = _line_search(evaluate, 0.5, newton_arguments(retain_budget=5.0), 1.0)
    assert evaluate.calls == [*grid(0.5, 2), 4.0]
    assert eta == 4.0 and point.retain_loss == 5.0 and point.forget_loss == 40.0


def test_line_search_keeps_the_grid_eta_when_the_refinement_is_over_budget():
    # budget 2 (reached exactly at η = 2: within); 8 and then 4 are over it
    evaluate = Synthetic()
    eta, point = _line_search(evaluate, 0.5, newton_arguments(retain_budget=2.0), 1.0)
    assert evaluate.calls == [*grid(0.5, 2), 4.0]
    assert eta == 2.0 and point.retain_loss == 3.0


@pytest.mark.parametrize(("max_scale", "last_k"), [(4096.0, 6), (100.0, 3), (1.0, 0)])
def test_line_search_stops_at_the_largest_scale_without_refining(max_scale, last_k):
    evaluate = Synthetic(retain=lambda eta: 1e-9 * eta)
    arguments = newton_arguments(retain_budget=1.0, newton_max_scale=max_scale)
    eta, point = _line_search(evaluate, 0.5, arguments, 1.0)
    assert evaluate.calls == grid(0.5, last_k)  # never past η₀ × max_scale, no refinement
    assert eta == 0.5 * 4.0**last_k and point.forget_loss == 10 * eta


def test_line_search_stops_early_at_the_forget_target():
    evaluate = Synthetic()
    arguments = newton_arguments(retain_budget=100.0, forget_target=19.0)
    eta, point = _line_search(evaluate, 0.5, arguments, 1.0)
    assert evaluate.calls == grid(0.5, 1)  # forget(0.5) = 5 < 19 <= forget(2) = 20
    assert eta == 2.0 and point.forget_loss == 20.0


def test_line_search_finds_nothing_when_even_the_smallest_eta_is_over_budget():
    evaluate = Synthetic(retain=lambda eta: 0.5 + eta)
    eta, point = _line_search(evaluate, 0.5, newton_arguments(retain_budget=0.4), 1.0)
    assert (eta, point) == (0, None)
    assert evaluate.calls == [0.5 * 4.0**-8]


def test_line_search_keeps_the_largest_eta_before_the_first_failure():
    # retain is not monotone: the search stops at the first η over budget
    evaluate = Synthetic(retain=lambda eta: 10.0 if 0.1 < eta < 1 else 0.0)
    eta, _ = _line_search(evaluate, 0.5, newton_arguments(retain_budget=1.0), 1.0)
    assert evaluate.calls == [*grid(0.5, -1), 0.0625]  # 0.125 fails; 2 would fit again
    assert eta == 0.0625  # 2 × 0.03125, the refinement, fits (0.0625 < 0.1)


# --- _scoped and _set


def test_scoped_zeroes_out_of_scope_elements_and_drops_empty_tensors():
    d = {
        "a": torch.tensor([[1.0, -2.0], [3.0, 4.0]], dtype=torch.float64),
        "b": torch.tensor([5.0, 6.0]),
        "c": torch.tensor([7.0]),
    }
    scope = Scope(
        {
            "a": torch.tensor([[True, False], [False, True]]),
            "b": torch.tensor([False, False]),  # no element in scope
        }  # "c": no mask at all
    )
    out = _scoped(d, scope)
    assert list(out) == ["a"]
    assert out["a"].dtype == torch.float64
    assert torch.equal(out["a"], torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    assert _scoped(d, Scope({})) == {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_set_moves_only_in_scope_elements_by_eta_times_d(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g).to(dtype)
    base[0, 0], base[0, 1], base[0, 2] = -0.0, float("nan"), 1e-40  # odd bits out of scope
    mask = torch.rand(6, 5, generator=g) < 0.4
    mask[0, :3] = False
    d = torch.where(mask, torch.randn(6, 5, generator=g, dtype=torch.float64), 0.0)
    params = {"w": torch.nn.Parameter(base.clone())}
    saved = {"w": base.clone()}
    for eta in (3.0, 0.25):  # the second call starts from the base, not from the first
        _set(params, saved, {"w": d}, eta)
    after = params["w"].detach()
    outside = ~mask
    assert bits(after[outside]) == bits(base[outside])
    expected = (base.double() + 0.25 * d).to(dtype)  # η d added in float64, rounded once
    assert bits(after[mask]) == bits(expected[mask])
    if dtype == torch.float64:
        torch.testing.assert_close(after[mask] - base[mask], 0.25 * d[mask], rtol=1e-12, atol=0)
    assert params["w"].dtype == dtype
    _set(params, saved, {"w": d}, 0.0)
    assert bits(params["w"]) == bits(base)


def test_set_leaves_tensors_outside_the_direction_alone():
    params = {n: torch.nn.Parameter(torch.ones(3)) for n in ("a", "b")}
    _set(params, {"a": torch.ones(3)}, {"a": torch.tensor([0.0, 1.0, 0.0])}, 2.0)
    assert params["a"].tolist() == [1.0, 3.0, 1.0]
    assert params["b"].tolist() == [1.0, 1.0, 1.0]


# --- the whole step on a tiny trained model


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama fitted to forget + retain (a random one has nothing to forget)."""
    model = tiny_llama()
    batch = TASK.collate(FORGET + RETAIN)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        TASK.loss(model, batch).mean().backward()
        optimizer.step()
    for p in model.parameters():
        p.grad = None
    factors = fit_factors(
        model, TASK, FORGET + RETAIN, FactorArguments(strategy="ekfac", dtype="float64")
    )
    return model, factors


def run_newton(trained, scope=None, **kw):
    model, factors = copy.deepcopy(trained[0]), trained[1]
    scope = scope or full_scope(model)
    result = unlearn(model, TASK, FORGET, RETAIN, scope, newton_arguments(**kw), factors)
    return model, scope, result


@pytest.fixture(scope="module")
def ekfac_scope(trained):
    """The top 20 % by EK-FAC score (tracked modules only, some tensors partly in scope)."""
    model, factors = trained
    arguments = ScopeArguments(method="ekfac", sparsity=0.2)
    return choose_scope(model, TASK, FORGET, RETAIN, arguments, factors)


@pytest.mark.parametrize("which", ["full", "ekfac"])
def test_newton_raises_the_forget_loss_within_the_retain_budget(trained, ekfac_scope, which):
    scope = ekfac_scope if which == "ekfac" else None
    model, scope, result = run_newton(trained, scope, retain_budget=0.1)
    start, end = result.start, result.end
    assert result.stopped == "steps" and result.steps_run == 1 and len(result.history) == 2
    assert end.forget_loss > start.forget_loss + 0.1  # measured: 1.108 → 1.440 (ekfac)
    assert end.retain_loss <= start.retain_loss + 0.1
    (iteration,) = result.details["newton"]["iterations"]
    assert result.details["newton"]["eta0"] == ETA0
    on_grid = {ETA0 * 4.0**k * m for k in range(-8, 7) for m in (1, 2)}
    assert iteration["eta"] > 0 and iteration["eta"] in on_grid
    # the history's last point is the model as it was left
    assert end.forget_loss == pytest.approx(measure(model, TASK, FORGET, 8), abs=1e-12)
    assert end.retain_loss == pytest.approx(measure(model, TASK, RETAIN, 8), abs=1e-12)


@pytest.mark.parametrize("damping", [Damping(), Damping(value=0.3)])
def test_newton_step_is_eta_times_the_scoped_direction(trained, ekfac_scope, damping):
    original, factors = trained
    scope = ekfac_scope
    model, _, result = run_newton(trained, scope, retain_budget=0.1, damping=damping)
    eta = result.details["newton"]["iterations"][0]["eta"]
    direction = newton_direction(original, factors, mean_gradient(original, TASK, FORGET), damping)
    before, after = dict(original.named_parameters()), dict(model.named_parameters())
    moved = 0
    for name, mask in scope.masks.items():
        old, new = before[name].detach(), after[name].detach()
        assert bits(new[~mask]) == bits(old[~mask]), name  # out of scope: bit-identical
        if name not in direction:
            assert bits(new) == bits(old), name  # in scope but not tracked: untouched
            continue
        expected = torch.where(mask, eta * direction[name], 0.0)
        torch.testing.assert_close(new - old, expected, rtol=1e-9, atol=1e-15)
        moved += int((new != old).sum())
    assert moved > 0


def test_newton_honours_the_damping(trained, ekfac_scope):
    scope = ekfac_scope
    default, _, _ = run_newton(trained, scope, retain_budget=0.1)
    damped, _, _ = run_newton(trained, scope, retain_budget=0.1, damping=Damping(value=0.3))
    assert any(
        not torch.equal(p, q)
        for p, q in zip(default.parameters(), damped.parameters(), strict=True)
    )


def test_newton_iterations_each_stay_within_the_budget(trained, ekfac_scope):
    _, _, result = run_newton(trained, ekfac_scope, retain_budget=0.1, newton_iterations=3)
    assert result.steps_run == 3 and len(result.history) == 4
    iterations = result.details["newton"]["iterations"]
    assert [i["iteration"] for i in iterations] == [1, 2, 3]
    assert all(i["eta"] > 0 for i in iterations)
    start = result.start
    for point in result.history[1:]:
        assert point.retain_loss <= start.retain_loss + 0.1
    forget = [p.forget_loss for p in result.history]
    assert forget == sorted(forget)  # measured: 1.108, 1.440, 1.584, 1.727


def test_newton_stops_at_the_forget_target(trained, ekfac_scope):
    start = measure(trained[0], TASK, FORGET, 8)
    target = start + 0.05
    _, _, result = run_newton(
        trained, ekfac_scope, retain_budget=0.1, forget_target=target, newton_iterations=3
    )
    assert result.stopped == "forget target" and result.steps_run == 1
    assert result.end.forget_loss >= target


def test_newton_with_no_room_in_the_budget_leaves_the_model_as_it_was(trained, ekfac_scope):
    # measured: even the smallest step (η₀ × 4⁻⁸) raises the retain loss a little
    model, _, result = run_newton(trained, ekfac_scope, retain_budget=0.0)
    assert result.stopped == "retain budget"
    assert result.details["newton"]["iterations"] == [{"iteration": 1, "eta": 0.0}]
    assert result.end == Measurement(1, result.start.forget_loss, result.start.retain_loss)
    for p, q in zip(model.parameters(), trained[0].parameters(), strict=True):
        assert bits(p) == bits(q)


def test_newton_refuses_missing_factors_and_a_missing_budget(trained):
    model = copy.deepcopy(trained[0])
    scope = full_scope(model)
    with pytest.raises(InputError, match="curvature factors"):
        unlearn(model, TASK, FORGET, RETAIN, scope, newton_arguments(retain_budget=0.1), None)
    with pytest.raises(InputError, match="retain budget"):
        unlearn(
            model, TASK, FORGET, RETAIN, scope, newton_arguments(retain_budget=None), trained[1]
        )


def test_newton_refuses_a_scope_without_tracked_parameters(trained):
    model = copy.deepcopy(trained[0])
    scores = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    scores["model.embed_tokens.weight"] += 1.0  # only the (untracked) embedding in scope
    scope = mask_from_scores(scores, 0.01)
    with pytest.raises(InputError, match="no parameter of a module the factors track"):
        unlearn(model, TASK, FORGET, RETAIN, scope, newton_arguments(retain_budget=0.1), trained[1])

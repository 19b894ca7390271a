"""The influence (Newton) unlearning step, restricted to a scope.

Removing examples F from a model trained to minimise the mean loss over N examples moves
the optimum, to first order, by

    Δθ = (1/N) H⁻¹ Σ_{z∈F} ∇ℓ(z) = (|F|/N) H⁻¹ ḡ_F

(Koh & Liang 2017). With the damped EK-FAC curvature P = G + λI in place of H, the step is
θ_S ← θ_S + η (P⁻¹ ḡ_F)_S on the in-scope elements S of the tracked modules (λ is
``arguments.damping``); it raises the forget loss. η is found by a line search on a
geometric grid around η₀ = |F| / (|F| + |R|) (the removal's own scale) that keeps the
largest η whose retain loss stays within ``retain_budget`` nats/token of the start (and
stops at ``forget_target`` if given).
With ``newton_iterations`` > 1 the gradient is recomputed and the step repeated.
"""

from __future__ import annotations

import torch

from attribution.curvature import Factors
from attribution.errors import InputError
from attribution.progress import evaluating
from unlearn.importance import mean_gradient, newton_direction, trainable
from unlearn.monitor import Monitor, UnlearnResult
from unlearn.scope import Scope


def newton_unlearn(
    model, task, forget, retain, scope: Scope, arguments, factors: Factors | None, progress
) -> UnlearnResult:
    """Apply the scoped, line-searched Newton step in place (see the module docstring)."""
    if factors is None:
        raise InputError("the newton method needs curvature factors (fit them or give --factors)")
    if arguments.retain_budget is None:
        raise InputError("the newton method's line search needs a retain budget")
    params = trainable(model)
    monitor = Monitor(model, task, forget, retain, arguments.batch_size)
    result = UnlearnResult(history=[monitor.measure(0)])
    eta0 = len(forget) / (len(forget) + len(retain))
    iterations = []
    with evaluating(model):
        for iteration in range(arguments.newton_iterations):
            gradient = mean_gradient(
                model, task, forget, arguments.batch_size, progress, "forget gradient"
            )
            direction = _scoped(
                newton_direction(model, factors, gradient, arguments.damping), scope
            )
            if not direction:
                raise InputError("the scope holds no parameter of a module the factors track")
            base = {n: params[n].detach().clone() for n in direction}
            best, best_point = _line_search(
                lambda eta, b=base, d=direction, i=iteration: _try(
                    params, b, d, eta, monitor, i + 1
                ),
                eta0,
                arguments,
                result.start.retain_loss,
            )
            _set(params, base, direction, best)
            iterations.append({"iteration": iteration + 1, "eta": best})
            result.steps_run = iteration + 1
            if best_point is None:
                result.stopped = "retain budget"
                break
            result.history.append(best_point)
            if (
                arguments.forget_target is not None
                and best_point.forget_loss >= arguments.forget_target
            ):
                result.stopped = "forget target"
                break
    result.details["newton"] = {"eta0": eta0, "iterations": iterations}
    if result.stopped == "retain budget":
        result.history.append(monitor.measure(result.steps_run))
    return result


def _line_search(evaluate, eta0: float, arguments, start_retain: float):
    """The largest η on a geometric grid whose retain loss stays within the budget.

    The grid runs η₀ × 4ᵏ from η₀ × 4⁻⁸ (the exact removal scale η₀ often overshoots:
    the damped inverse amplifies directions of small curvature) up to
    η₀ × ``newton_max_scale``; the last good η is then refined once by a factor 2.
    Returns ``(η, measurement)``, or ``(0, None)`` when even the smallest η is over budget.
    """
    budget = start_retain + arguments.retain_budget
    target = arguments.forget_target
    best, best_point, bad = 0.0, None, None
    eta = eta0 * 4.0**-8
    while eta <= eta0 * arguments.newton_max_scale:
        point = evaluate(eta)
        if point.retain_loss > budget:
            bad = eta
            break
        best, best_point = eta, point
        if target is not None and point.forget_loss >= target:
            return best, best_point
        eta *= 4
    if best_point is not None and bad is not None:
        point = evaluate(2 * best)
        if point.retain_loss <= budget:
            best, best_point = 2 * best, point
    return best, best_point


def _try(params, base, direction, eta, monitor, step):
    _set(params, base, direction, eta)
    return monitor.measure(step)


def _scoped(direction: dict[str, torch.Tensor], scope: Scope) -> dict[str, torch.Tensor]:
    """The direction on in-scope elements only (tensors with none are dropped)."""
    out = {}
    for name, d in direction.items():
        mask = scope.masks.get(name)
        if mask is not None and bool(mask.any()):
            out[name] = torch.where(mask.to(d.device), d, torch.zeros_like(d))
    return out


@torch.no_grad()
def _set(
    params, base: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], eta: float
) -> None:
    """θ = θ_base + η d on the in-scope elements; the rest is written back unchanged.

    Only in-scope elements differ from ``base``; out-of-scope ones are copied from the
    saved base bits, so they stay bit-identical.
    """
    for name, d in direction.items():
        param = params[name]
        moved = (base[name].double() + eta * d.double()).to(param.dtype)
        param.data.copy_(torch.where(d != 0, moved, base[name]))

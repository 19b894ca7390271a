"""Importance scores per parameter, from which a scope keeps the top fraction.

Every score is a dict ``{parameter name: tensor shaped like the parameter}``; larger
means "more responsible for the forget set". See :mod:`unlearn.scope` for the formulas.
Mean gradients are of the per-example summed completion NLL (the task's loss):

    ḡ = (1/n) Σᵢ ∇θ ℓ(zᵢ)

computed with ``torch.autograd.grad`` (the model's ``.grad`` fields are never touched);
under ``torchrun`` each rank sums its share of the examples and the sums are
all-reduced, so every rank has the same ḡ.

>>> import torch
>>> net = torch.nn.Linear(2, 1, bias=False)
>>> with torch.no_grad():
...     _ = net.weight.copy_(torch.tensor([[1.0, -3.0]]))
>>> magnitude_scores(net)["weight"].tolist()
[[1.0, 3.0]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from attribution.curvature import Damping, Factors
from attribution.distributed import all_reduce_sums, current_shard
from attribution.errors import InputError, NonFiniteError
from attribution.modules import from_parameter_gradients, to_parameter_gradients
from attribution.task import Task, batches
from unlearn.scope import Scope, ScopeArguments, full_scope, mask_from_scores


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an unlearner may touch (those with ``requires_grad``)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def mean_gradient(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    batch_size: int = 16,
    progress: bool | None = None,
    desc: str = "gradient",
    loss: Callable[[dict[str, torch.Tensor], int, int], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """ḡ = (1/n) Σᵢ ∇θ ℓ(zᵢ) for every trainable parameter (float32 or wider).

    ℓ is the task's loss, or ``loss(batch, first, last)`` — the summed loss of
    ``examples[first:last]`` collated as ``batch`` — when given.
    """
    if len(examples) == 0:
        raise InputError(f"no examples to take the {desc} of")
    params = trainable(model)
    names, tensors = list(params), list(params.values())
    total = {
        n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
        for n, p in params.items()
    }
    shard = current_shard()  # under torchrun: this rank's share, then the sums all-reduced
    low, high = shard.bounds(0, len(examples))
    failed = {"loss": torch.zeros((), device=tensors[0].device)}  # a non-finite loss seen
    seen = ""  # the value, on the rank that saw it
    for first, last, batch in batches(model, task, examples, batch_size, desc, progress, low, high):
        value = task.loss(model, batch).sum() if loss is None else loss(batch, first, last)
        if not torch.isfinite(value):
            failed["loss"] += 1
            seen = f" ({value.item()})"
            break
        grads = torch.autograd.grad(value, tensors, allow_unused=True)
        for name, g in zip(names, grads, strict=True):
            if g is not None:
                total[name] += g
    all_reduce_sums(failed, shard)  # every rank learns of it, so none waits for the others
    if failed["loss"].item():
        raise NonFiniteError(f"the {desc} loss is not finite{seen}")
    all_reduce_sums(total, shard)
    return {n: acc / len(examples) for n, acc in total.items()}


def newton_direction(
    model: nn.Module,
    factors: Factors,
    gradient: Mapping[str, torch.Tensor],
    damping: Damping | float | None = None,
) -> dict[str, torch.Tensor]:
    """d = (G + λI)⁻¹ ḡ per tracked module, returned per parameter (others absent)."""
    named = dict(model.named_modules())
    direction = {}
    for module_name in factors.modules:
        module = named.get(module_name)
        if module is None:
            raise InputError(f"the factors track {module_name!r}, which the model does not have")
        weight, bias = f"{module_name}.weight", f"{module_name}.bias"
        if weight not in gradient:
            continue
        layout = from_parameter_gradients(
            module, gradient[weight].double(), gradient[bias].double() if bias in gradient else None
        )
        solved = factors.inverse_product(module_name, layout, damping)
        for key, value in to_parameter_gradients(module, solved).items():
            direction[f"{module_name}.{key}"] = value.to(gradient[weight].dtype).reshape(
                gradient[f"{module_name}.{key}"].shape
            )
    return direction


def ekfac_scores(
    model: nn.Module,
    factors: Factors,
    forget_gradient: Mapping[str, torch.Tensor],
    retain_gradient: Mapping[str, torch.Tensor],
    retain_penalty: float = 1.0,
    damping: Damping | float | None = None,
) -> dict[str, torch.Tensor]:
    """s_i = |d_i ḡ_f,i| − β |d_i ḡ_r,i|, d the Newton direction; untracked: −inf."""
    direction = newton_direction(model, factors, forget_gradient, damping)
    scores = {}
    for name, g_f in forget_gradient.items():
        if name in direction:
            d = direction[name]
            scores[name] = (d * g_f).abs() - retain_penalty * (d * retain_gradient[name]).abs()
        else:
            scores[name] = torch.full_like(g_f, -math.inf)
    return scores


def wagle_scores(
    model: nn.Module,
    forget_gradient: Mapping[str, torch.Tensor],
    retain_gradient: Mapping[str, torch.Tensor],
    mu: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """s = |(θ − ḡ_r/μ) ⊙ ḡ_f| (WAGLE's weight attribution)."""
    params = trainable(model)
    return {
        n: ((params[n].detach() - retain_gradient[n] / mu) * g).abs()
        for n, g in forget_gradient.items()
    }


def saliency_scores(forget_gradient: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """s = |ḡ_f| (SalUn's gradient saliency)."""
    return {n: g.abs() for n, g in forget_gradient.items()}


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """s = |θ|."""
    return {n: p.detach().abs() for n, p in trainable(model).items()}


def random_scores(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Uniform noise from ``seed`` (on the CPU, so every device gives the same scope)."""
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=generator) for n, p in trainable(model).items()}


def choose_scope(
    model: nn.Module,
    task: Task,
    forget: Sequence[Any],
    retain: Sequence[Any],
    arguments: ScopeArguments,
    factors: Factors | None = None,
    batch_size: int = 16,
    progress: bool | None = None,
    forget_gradient: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> Scope:
    """The scope of ``arguments.method`` at ``arguments.sparsity``.

    ``factors`` are needed for ``ekfac``; ``all`` and a sparsity of 1 keep everything.
    ``forget_gradient()``: computes ḡ_f when the forget term is not the NLL's (e.g. the
    gradient of the unlearning objective itself), called only by scopes that rank by it;
    by default the mean gradient of the task's loss.
    """
    method = arguments.method
    if method == "all" or (arguments.sparsity == 1 and arguments.granularity == "parameter"):
        return full_scope(model)
    if method == "magnitude":
        scores = magnitude_scores(model)
    elif method == "random":
        scores = random_scores(model, arguments.seed)
    else:
        if forget_gradient is not None:
            g_f = forget_gradient()
        else:
            g_f = mean_gradient(model, task, forget, batch_size, progress, "forget gradient")
        if method == "saliency":
            scores = saliency_scores(g_f)
        else:
            g_r = mean_gradient(model, task, retain, batch_size, progress, "retain gradient")
            if method == "wagle":
                scores = wagle_scores(model, g_f, g_r, arguments.wagle_mu)
            else:
                if factors is None:
                    raise InputError("the ekfac scope needs EK-FAC factors")
                scores = ekfac_scores(
                    model, factors, g_f, g_r, arguments.retain_penalty, arguments.damping
                )
    return mask_from_scores(
        {n: s.cpu() for n, s in scores.items()},
        arguments.sparsity,
        arguments.ranking,
        arguments.granularity,
    )

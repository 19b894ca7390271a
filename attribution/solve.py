"""Exact damped solves by conjugate gradient, preconditioned by the fitted curvature.

EK-FAC approximates the curvature G of the tracked parameters block by block (one block
per module, Kronecker-factored eigenbasis); influence needs (G + D)⁻¹ ∇ℓ(q), D the
per-module damping λ_m I. This module solves that system with the exact G, the matrix
EK-FAC's eigenvalue correction measures the diagonal of: with N training examples z and
their per-example gradients G_z (labels as the factor fit drew them: the data's for the
empirical Fisher, the same seeded samples for the true Fisher),

    G v = (1/N) Σ_z G_z ⟨G_z, v⟩,     ⟨A, B⟩ = Σ_modules Σ_ij A_ij B_ij,

one pass over the training set per product (every module's cross terms included, which
the block-diagonal approximation leaves out; under ``torchrun`` each rank passes over its
share and the products are all-reduced, so every rank takes the same CG steps). With
``curvature="hessian"``, G is instead the Hessian of the mean training loss with respect
to the tracked parameters, H v by double backpropagation (what dattri's CG influence
uses; it may be indefinite: a query whose direction has no positive curvature stops
moving). Conjugate gradient on A = G + D, batched over queries (each query its own step
sizes), with the fitted factors' damped inverse as the preconditioner M⁻¹ and
warm-started from its solution x₀ = M⁻¹ b:

    r₀ = b − A x₀,  z₀ = M⁻¹ r₀,  p₀ = z₀;
    αₖ = ⟨rₖ, zₖ⟩ / ⟨pₖ, A pₖ⟩,  xₖ₊₁ = xₖ + αₖ pₖ,  rₖ₊₁ = rₖ − αₖ A pₖ,
    zₖ₊₁ = M⁻¹ rₖ₊₁,  βₖ = ⟨rₖ₊₁, zₖ₊₁⟩ / ⟨rₖ, zₖ⟩,  pₖ₊₁ = zₖ₊₁ + βₖ pₖ.

With ``identity`` factors M = I: plain conjugate gradient (as dattri's CG influence), the
control the preconditioner is measured against. Zero iterations return the factors' own
solution; more iterations converge to the exact damped solve (tested against a dense
float64 solve on a tiny model).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attribution.curvature import Damping, Factors, training_passes
from attribution.distributed import all_reduce_sums, current_shard
from attribution.errors import InputError
from attribution.gradients import example_gradients
from attribution.modules import from_parameter_gradients, select_modules, to_parameter_gradients
from attribution.task import Task, batches

Vectors = dict[str, torch.Tensor]  # module → [n_q, out, in (+1)]


@dataclass
class Solve:
    """The solution per module, and the relative residual ‖b − A x‖ / ‖b‖ per query after
    the warm start and after each iteration (``residuals[k]`` has one value per query)."""

    solution: Vectors
    residuals: list[torch.Tensor] = field(default_factory=list)


CURVATURES = ("fisher", "hessian")


def curvature_product(
    model: nn.Module,
    task: Task,
    train: Sequence[Any],
    factors: Factors,
    vectors: Mapping[str, torch.Tensor],
    progress: bool | None = False,
    curvature: str = "fisher",
) -> Vectors:
    """G V for a batch of vectors V (module → [n_q, out, in (+1)]): one training pass."""
    if curvature not in CURVATURES:
        raise InputError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    modules = select_modules(model, factors.modules)
    if curvature == "hessian":
        return hessian_product(model, task, train, modules, vectors, factors.arguments, progress)
    arguments = factors.arguments
    result = {name: torch.zeros_like(v) for name, v in vectors.items()}
    shard = current_shard()
    low, high = shard.bounds(0, len(train))
    for _, records in training_passes(
        model, task, train, arguments, modules, "lambda", low, high, progress
    ):
        gradients = {n: example_gradients(r).to(vectors[n].dtype) for n, r in records.items()}
        weights = sum(  # ⟨G_z, V_q⟩: [batch, n_q]
            torch.einsum("boi,qoi->bq", gradients[name], vectors[name]) for name in vectors
        )
        for name in vectors:
            result[name] += torch.einsum("bq,boi->qoi", weights, gradients[name])
    all_reduce_sums(result, shard)
    return {name: value / max(len(train), 1) for name, value in result.items()}


def hessian_product(
    model: nn.Module,
    task: Task,
    train: Sequence[Any],
    modules: Mapping[str, nn.Module],
    vectors: Mapping[str, torch.Tensor],
    arguments: Any,
    progress: bool | None = False,
) -> Vectors:
    """H V, H = ∇²((1/N) Σ_z ℓ(z)) over the tracked modules' weights (and biases), every
    query's vector at once (``is_grads_batched``): one double-backward pass per batch."""
    tangents = {name: to_parameter_gradients(modules[name], v) for name, v in vectors.items()}
    owners = [(name, key) for name, split in tangents.items() for key in split]
    params = [getattr(modules[name], key) for name, key in owners]
    directions = [tangents[n][k].to(p.dtype) for (n, k), p in zip(owners, params, strict=True)]
    flags = [p.requires_grad for p in params]
    result = {name: torch.zeros_like(v) for name, v in vectors.items()}
    shard = current_shard()
    low, high = shard.bounds(0, len(train))
    try:
        for p in params:
            p.requires_grad_(True)
        with twice_differentiable(model), warnings.catch_warnings():
            # vmap over the double backward falls back to a loop for some ops: slower, exact
            warnings.filterwarnings("ignore", message="There is a performance drop")
            shared = batches(model, task, train, arguments.batch_size, "H v", progress, low, high)
            for _, _, batch in shared:
                with torch.enable_grad():
                    loss = task.loss(model, batch).sum() / max(len(train), 1)
                    grads = torch.autograd.grad(loss, params, create_graph=True)
                    products = torch.autograd.grad(
                        grads, params, grad_outputs=directions, is_grads_batched=True
                    )
                found = dict(zip(owners, products, strict=True))
                for name in vectors:
                    result[name] += from_parameter_gradients(
                        modules[name], found[(name, "weight")], found.get((name, "bias"))
                    ).to(result[name].dtype)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    all_reduce_sums(result, shard)
    return result


@contextlib.contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[None]:
    """A Hugging Face model's attention as plain operations (``eager``) inside the block:
    fused attention kernels (SDPA on the CPU) have no second derivative."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def damped_product(
    model,
    task,
    train,
    factors: Factors,
    vectors: Mapping[str, torch.Tensor],
    damping,
    progress,
    curvature: str = "fisher",
) -> Vectors:
    """(G + D) V, D = λ_m I per module (the factors' damping rule)."""
    product = curvature_product(model, task, train, factors, vectors, progress, curvature)
    return {n: product[n] + factors.damping(n, damping) * v for n, v in vectors.items()}


def inner(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """⟨a, b⟩ per query, summed over modules: [n_q]."""
    return sum((a[name] * b[name]).sum(dim=(-2, -1)) for name in a)


def conjugate_gradient(
    model: nn.Module,
    task: Task,
    train: Sequence[Any],
    factors: Factors,
    rhs: Mapping[str, torch.Tensor],
    damping: Damping | float | None = None,
    iterations: int = 10,
    progress: bool | None = False,
    preconditioned: bool = True,
    curvature: str = "fisher",
) -> Solve:
    """Solve (G + D) x = b for each query's b (module → [n_q, out, in (+1)]); see the
    module docstring. ``preconditioned=False``: plain CG from x₀ = 0 on the same system
    (D still the factors' damping), the control. A query whose residual reaches exactly 0
    stops moving."""

    def precondition(vectors: Mapping[str, torch.Tensor]) -> Vectors:
        if not preconditioned:
            return dict(vectors)
        return {n: factors.inverse_product(n, v, damping) for n, v in vectors.items()}

    def apply(vectors: Mapping[str, torch.Tensor]) -> Vectors:
        return damped_product(model, task, train, factors, vectors, damping, progress, curvature)

    norm = inner(rhs, rhs).sqrt().clamp(min=torch.finfo(next(iter(rhs.values())).dtype).tiny)
    if preconditioned:  # warm start: r₀ = b − A x₀ costs one training pass
        x = precondition(rhs)
        ax = apply(x)
        r = {n: rhs[n] - ax[n] for n in rhs}
    else:  # x₀ = 0: r₀ = b, no pass needed
        x = {n: torch.zeros_like(v) for n, v in rhs.items()}
        r = dict(rhs)
    z = precondition(r)
    p = dict(z)
    rz = inner(r, z)
    solve = Solve(x, [inner(r, r).sqrt() / norm])
    for _ in range(iterations):
        ap = apply(p)
        along = inner(p, ap)  # pᵀ A p: the curvature along p
        alpha = torch.where(along > 0, rz / along.clamp(min=1e-300), 0.0)
        x = {n: x[n] + _per_query(alpha, p[n]) for n in x}
        r = {n: r[n] - _per_query(alpha, ap[n]) for n in r}
        z = precondition(r)
        rz_next = inner(r, z)
        beta = torch.where(rz != 0, rz_next / torch.where(rz != 0, rz, 1.0), 0.0)
        p = {n: z[n] + _per_query(beta, p[n]) for n in p}
        rz = rz_next
        solve.residuals.append(inner(r, r).sqrt() / norm)
    solve.solution = x
    return solve


def _per_query(scale: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """scale[q] · vectors[q] for [n_q] scales and [n_q, out, in] vectors."""
    return scale.to(vectors.dtype)[:, None, None] * vectors

"""Exact influence on a model small enough for dense curvature, and each method's agreement.

On a small MLP (64-32-10, 2410 parameters, trained on the digits setting's 1000
training images), the exact scores are

    score(q, z) = ∇ℓ(q)ᵀ (C + λI)⁻¹ ∇ℓ(z),   λ = 0.1 × mean eigenvalue of C = 0.1 tr(C) / P,

with every parameter of the model (both layers, weights and biases: exactly the
parameters the tracked modules hold) and C, in float64, one of

- ``gauss_newton``: the damped Gauss-Newton G = (1/N) Σₙ Jₙᵀ (diag(pₙ) − pₙpₙᵀ) Jₙ, Jₙ the
  Jacobian of the logits (for the cross-entropy, the Fisher in expectation over labels
  drawn from the model: what ``fisher="true"`` estimates);
- ``hessian``: the dense Hessian of the mean training loss, reverse-over-reverse
  ``torch.func.jacrev`` in chunks of rows. It need not be positive definite: its smallest
  eigenvalue is recorded, and when that is below −λ the damped system is indefinite;
  ``hessian_shifted`` then adds λ − (smallest eigenvalue) instead, which makes it positive
  definite (the usual fix, Koh & Liang 2017).

Each method's scores [n_query, n_train] on the same model are compared to both with the
Pearson and Spearman correlation of all entries, and the mean over queries of the
per-query Spearman correlation (what matters for ranking training examples).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn import functional as F

DAMPING_FACTOR = 0.1
HESSIAN_CHUNK = 128  # Hessian rows per reverse pass (bounds memory)


def _flat(model: nn.Module) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return flat, shapes


def _unflat(flat: torch.Tensor, shapes) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape in shapes:
        size = shape.numel()
        out[name] = flat[start : start + size].view(shape)
        start += size
    return out


def exact_scores(model: nn.Module, x_train, y_train, x_query, y_query) -> dict[str, Any]:
    """Exact damped Gauss-Newton and Hessian influence scores, float64 (module docstring)."""
    net = _double_copy(model)
    flat, shapes = _flat(net)

    def logits_of(theta, x):
        return functional_call(net, _unflat(theta, shapes), (x.unsqueeze(0),))[0]

    def loss_of(theta, x, y):
        return F.cross_entropy(logits_of(theta, x).unsqueeze(0), y.unsqueeze(0))

    xt, xq = x_train.double(), x_query.double()
    started = time.perf_counter()
    train_grads = vmap(grad(loss_of), in_dims=(None, 0, 0))(flat, xt, y_train)  # [N, P]
    query_grads = vmap(grad(loss_of), in_dims=(None, 0, 0))(flat, xq, y_query)  # [Q, P]
    jac = vmap(jacrev(logits_of), in_dims=(None, 0))(flat, xt)  # [N, K, P]
    probs = torch.softmax(vmap(logits_of, in_dims=(None, 0))(flat, xt), -1)  # [N, K]
    h_jac = probs[:, :, None] * jac - probs[:, :, None] * (probs[:, None, :] @ jac)  # H J
    gauss_newton = jac.reshape(-1, flat.numel()).T @ h_jac.reshape(-1, flat.numel())
    gauss_newton /= xt.shape[0]
    gn_seconds = time.perf_counter() - started

    def mean_loss(theta):
        return vmap(loss_of, in_dims=(None, 0, 0))(theta, xt, y_train).mean()

    started = time.perf_counter()
    dense_hessian = jacrev(jacrev(mean_loss), chunk_size=HESSIAN_CHUNK)(flat)  # [P, P]
    hessian_seconds = time.perf_counter() - started
    result = {"n_parameters": flat.numel(), "matrices": {}}
    scores = {}
    for name, matrix, seconds in (
        ("gauss_newton", gauss_newton, gn_seconds),
        ("hessian", dense_hessian, hessian_seconds),
    ):
        matrix = (matrix + matrix.T) / 2
        eig = torch.linalg.eigvalsh(matrix)
        lam = DAMPING_FACTOR * eig.mean().item()
        variants = {name: lam}
        if eig.min().item() + lam <= 0:  # also shifted to positive definite
            variants[f"{name}_shifted"] = lam - eig.min().item()
        for variant, damping in variants.items():
            damped = matrix + damping * torch.eye(flat.numel(), dtype=matrix.dtype)
            solved = torch.linalg.solve(damped, train_grads.T)
            scores[variant] = (query_grads @ solved).detach()  # [Q, N]
            result["matrices"][variant] = {
                "damping": damping,
                "min_eigenvalue": eig.min().item(),
                "max_eigenvalue": eig.max().item(),
                "indefinite_after_damping": bool(eig.min().item() + damping <= 0),
                "seconds": seconds,
            }
    result["scores"] = scores
    return result


def _double_copy(model: nn.Module) -> nn.Module:
    from copy import deepcopy

    return deepcopy(model).double().eval()


def correlations(scores: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman over all entries, and the mean per-query Spearman."""
    from scipy.stats import pearsonr, spearmanr

    a, b = scores.detach().double().numpy(), exact.detach().double().numpy()
    per_query = [spearmanr(a[i], b[i]).statistic for i in range(a.shape[0])]
    return {
        "pearson": float(pearsonr(a.ravel(), b.ravel()).statistic),
        "spearman": float(spearmanr(a.ravel(), b.ravel()).statistic),
        "per_query_spearman": float(torch.tensor(per_query).nanmean()),
    }


def agreement(
    method_scores: Mapping[str, torch.Tensor], exact: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {exact kind: correlations}}``; the exact kinds also against each other."""
    table = {m: {k: correlations(s, e) for k, e in exact.items()} for m, s in method_scores.items()}
    table["exact-gauss-newton"] = {
        k: correlations(exact["gauss_newton"], e) for k, e in exact.items()
    }
    return table

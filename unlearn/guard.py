"""What attribution chooses for the edit: the guard set, and the forget set's closure.

**The guard set**: training examples the edit would damage most, predicted by influence
(or, the control, as many drawn at random: :func:`random_guard_indices`). Measured on
three worlds × three seeds (benchmarks/results/stranger.md), either guard cuts the
neighbour damage of stranger distillation, and influence's choice did not beat the random
one of the same size — which is why ``excise forget`` defaults to the random guard.

Removing a forget set F moves the parameters, to first order, along its Newton direction
Δθ = η P⁻¹ ḡ_F (P the damped curvature; :mod:`unlearn.newton`). The loss of a training
example z then changes by

    Δℓ(z) ≈ ∇ℓ(z)ᵀ Δθ = (η/|F|) Σ_{q∈F} ∇ℓ(q)ᵀ P⁻¹ ∇ℓ(z) = (η/|F|) Σ_{q∈F} score(q, z),

a column sum of the pairwise influence scores that attribution computes with the forget
records as queries. The examples outside F with the largest predicted rise are the
collateral the edit should be kept from: added to the retain set (not replacing it),
they are its guard.

**The closure**: training examples outside F that carry F's facts (near-duplicates,
paraphrases). A forget record q is its own strongest proponent, score(q, q); any other
training example z with score(q, z) ≥ score(q, q) supports q's answer as strongly as q
does, and forgetting q while keeping z would leave the fact learnable from z.

>>> import torch
>>> scores = torch.tensor([[0.5, 2.0, -1.0, 3.0], [0.5, 1.0, -1.0, 3.0]])  # [forget, train]
>>> predicted_damage(scores).tolist()
[1.0, 3.0, -2.0, 6.0]
>>> guard_indices(scores, n=2, exclude={3})  # example 3 is a forget record itself
[1, 0]
>>> closure_indices(torch.tensor([[2.0, 0.5, 2.5], [1.0, 3.0, 0.1]]), [0, 1])  # q0, q1 at 0, 1
[2]
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

import torch


def predicted_damage(scores: torch.Tensor) -> torch.Tensor:
    """Σ over forget queries of score(q, z) per training example z (∝ its predicted loss
    rise under the forget set's Newton step), from ``scores`` [n_forget, n_train]."""
    return scores.double().sum(0)


def guard_indices(scores: torch.Tensor, n: int, exclude: Collection[int] = ()) -> list[int]:
    """The ``n`` training examples (not in ``exclude``) with the largest predicted damage,
    most damaged first; only those predicted to be damaged at all (damage > 0)."""
    damage = predicted_damage(scores)
    order = torch.argsort(damage, descending=True, stable=True).tolist()
    chosen = [i for i in order if i not in set(exclude) and damage[i] > 0]
    return chosen[:n]


def random_guard_indices(
    n_train: int, n: int, exclude: Collection[int] = (), seed: int = 0
) -> list[int]:
    """``n`` training positions (not in ``exclude``) drawn uniformly without replacement.

    >>> random_guard_indices(6, 3, exclude={0, 1}, seed=0) == random_guard_indices(6, 3, {0, 1})
    True
    >>> sorted(random_guard_indices(4, 9, exclude={2}))
    [0, 1, 3]
    """
    outside = [i for i in range(n_train) if i not in set(exclude)]
    return random.Random(seed).sample(outside, min(n, len(outside)))


def with_guard(retain: Sequence[dict], guard: Sequence[dict]) -> list[dict]:
    """The retain set and, after it, the guard records it does not hold already (by id).

    >>> with_guard([{"id": "a"}], [{"id": "a"}, {"id": "b"}])
    [{'id': 'a'}, {'id': 'b'}]
    """
    held = {r["id"] for r in retain}
    return [*retain, *(z for z in guard if z["id"] not in held)]


def closure_indices(scores: torch.Tensor, own: Sequence[int]) -> list[int]:
    """Training examples (not forget records) that some forget query's score ranks at or
    above that query's own record: ``scores`` [n_forget, n_train], ``own[q]`` the training
    position of forget query q. Sorted by position."""
    if len(own) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} forget queries, {len(own)} positions of their own")
    own_scores = scores[torch.arange(scores.shape[0]), torch.as_tensor(list(own))]  # [n_forget]
    strong = (scores >= own_scores[:, None]).any(0)  # [n_train]
    strong[list(own)] = False
    return torch.nonzero(strong).flatten().tolist()

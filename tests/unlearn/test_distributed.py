"""Unlearning data-parallel over two processes (gloo) edits the weights one process does.

Each rank takes its share of every forget and retain batch, and the gradients are
all-reduced before the masked update; masks are chosen identically on every rank, so
everything out of scope stays bit-identical there too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attribution import FactorArguments, LanguageModelingTask, fit_factors
from tests.attribution.models import random_examples, tiny_llama
from unlearn import ScopeArguments, UnlearnArguments, choose_scope, unlearn
from unlearn.importance import mean_gradient

TASK = LanguageModelingTask(pad_id=0)
FORGET, RETAIN = random_examples(8, seed=1), random_examples(16, seed=2)
STEPS = 4


def _edit(method, forget=FORGET):
    """The tiny model edited with ``method`` in an EK-FAC scope; (before, after, result)."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    factors = fit_factors(
        model, TASK, FORGET + RETAIN, FactorArguments(strategy="ekfac", dtype="float64")
    )
    scope = choose_scope(model, TASK, forget, RETAIN, ScopeArguments("ekfac", 0.2), factors)
    arguments = UnlearnArguments(
        method=method, steps=STEPS, lr=1e-2, batch_size=4, eval_every=2, retain_budget=None
    )
    result = unlearn(model, TASK, forget, RETAIN, scope, arguments, factors)
    return base, model, scope, result


def _worker(rank, rendezvous, out, method, n_forget=None):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        _, model, scope, result = _edit(method, FORGET[:n_forget])
        shares = result.details["data_parallel"]
        masks = {name: mask.clone() for name, mask in scope.masks.items()}
        masks["retain gradient"] = mean_gradient(tiny_llama(), TASK, RETAIN, batch_size=3)
        torch.save(
            {"state": model.state_dict(), "shares": shares, "masks": masks}, out / f"rank-{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["npo"])  # with a frozen reference; gd is its retain half
def test_two_processes_unlearn_the_weights_of_one(tmp_path, method):
    base, alone, scope, result = _edit(method)
    mp.spawn(_worker, args=(tmp_path / "rendezvous", tmp_path, method), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    before = base.state_dict()
    gradient = mean_gradient(tiny_llama(), TASK, RETAIN, batch_size=3)
    for rank in ranks:  # the scope's mean gradients are shared among the ranks, all-reduced
        shared = rank["masks"].pop("retain gradient")
        assert shared.keys() == gradient.keys()
        for name, value in gradient.items():
            torch.testing.assert_close(shared[name], value, rtol=1e-9, atol=1e-12)
        assert rank["masks"].keys() == scope.masks.keys()  # so the same masks
        assert all(torch.equal(rank["masks"][n], m) for n, m in scope.masks.items())
    for name, value in alone.state_dict().items():
        for rank in ranks:  # every rank ends with the same model: the one-process one
            torch.testing.assert_close(rank["state"][name], value, rtol=1e-9, atol=1e-12)
            if name not in scope.masks:  # the proof holds on every rank
                assert torch.equal(rank["state"][name], before[name]), name
    examples = STEPS * 2 * 4  # forget + retain batches of 4
    assert result.details["data_parallel"] == {"world_size": 1, "examples_per_rank": [examples]}
    for rank in ranks:
        assert rank["shares"] == {"world_size": 2, "examples_per_rank": [examples // 2] * 2}
    changed = [n for n, v in alone.state_dict().items() if not torch.equal(v, before[n])]
    assert changed  # the edit did something


def test_a_short_last_batch_with_fewer_examples_than_ranks_is_shared_without_a_crash(tmp_path):
    """5 forget examples in batches of 4: the second step's batch has one example, so one
    rank's share is empty; that rank sits the step out and the edit goes on, in scope."""
    mp.spawn(_worker, args=(tmp_path / "rendezvous", tmp_path, "gd", 5), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name  # the ranks agree
    counts = ranks[0]["shares"]["examples_per_rank"]
    assert sum(counts) == STEPS * 4 + 4 + 1 + 4 + 1  # retain 4 a step; forget 4, 1, 4, 1

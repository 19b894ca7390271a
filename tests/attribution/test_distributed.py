"""Two processes (gloo on the CPU) give the factors and scores of one, each doing its share.

The workers are real processes joined by ``torch.distributed`` (a file rendezvous), as
``torchrun`` would start them; rank 0 writes the stores. The artifacts' metadata must say
that the two ranks split the training set (counts summing to N, neither doing it all):
two processes that each redo the whole job give the same factors (their doubled sums are
divided by doubled counts) and must be caught by the counts alone (negative control).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attribution import FactorArguments, LanguageModelingTask, fit_factors, self_scores
from attribution.damping_search import SearchArguments, choose_damping
from attribution.distributed import Shard, all_reduce_sums, current_shard, gather
from attribution.index import Index, IndexArguments, build_index
from attribution.influence import ScoreArguments, pairwise_scores, stored_pairwise_scores
from attribution.store import FactorStore, IndexStore, ScoreStore

from .models import random_examples, tiny_llama

TASK = LanguageModelingTask(pad_id=0)
N_TRAIN = 11  # odd: the shares differ by one
FACTOR_ARGS = FactorArguments(strategy="ekfac", fisher="true", dtype="float64", partitions=2)
SCORE_ARGS = ScoreArguments(dtype="float64", partitions=2, batch_size=3, per_module=True)
INDEX_ARGS = IndexArguments(dimension=6, method="projection", dtype="float64", partitions=2)
SEARCH_ARGS = SearchArguments(perturbations=5, steps=3, batch_size=2)  # 5 halves: 2 + 3
CG_ARGS = {
    curvature: ScoreArguments(
        dtype="float64", batch_size=3, cg_iterations=2, cg_curvature=curvature
    )
    for curvature in ("fisher", "hessian")
}


def _job(folder, refine=True):
    """Factors, stored pairwise scores and self-influence of the tiny model, in ``folder``;
    with ``refine``, CG-refined scores and the damping search's agreements too."""
    model = tiny_llama()
    train, queries = random_examples(N_TRAIN, seed=3), random_examples(3, seed=4)
    factors = fit_factors(model, TASK, train, FACTOR_ARGS, folder / "factors")
    scores = stored_pairwise_scores(
        model, TASK, queries, train, factors, folder / "scores", SCORE_ARGS
    )
    build_index(model, TASK, train, factors, INDEX_ARGS, folder / "index")
    if not refine:
        return factors, scores, self_scores(model, TASK, train, factors, SCORE_ARGS), {}
    refined = {  # conjugate gradient: each curvature product is one shared training pass
        curvature: pairwise_scores(model, TASK, queries, train, factors, arguments).total
        for curvature, arguments in CG_ARGS.items()
    }
    search = choose_damping(model, TASK, train, queries, factors, SEARCH_ARGS, SCORE_ARGS)
    refined["search"] = torch.tensor([row["agreement"] for row in search.candidates])
    return factors, scores, self_scores(model, TASK, train, factors, SCORE_ARGS), refined


def _worker(rank, world_size, rendezvous, folder, redo_everything):
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    try:
        if redo_everything:  # the bug the counts must catch: every rank does every example
            Shard.bounds = lambda self, start, stop: (start, stop)
        _, scores, values, refined = _job(folder, refine=not redo_everything)
        if rank == 0:
            result = {"total": scores.total, "self": values, **refined}
            torch.save(result, folder / "result.pt")
    finally:
        dist.destroy_process_group()


def _run_two(tmp_path, redo_everything=False):
    folder = tmp_path / ("redo" if redo_everything else "two")
    folder.mkdir()
    mp.spawn(
        _worker,
        args=(2, tmp_path / f"rendezvous-{folder.name}", folder, redo_everything),
        nprocs=2,
    )
    return folder


def _shares(metadata):
    return int(metadata["world_size"]), json.loads(metadata["examples_per_rank"])


def _really_shared(metadata, n):
    world_size, counts = _shares(metadata)
    return world_size == len(counts) == 2 and sum(counts) == n and max(counts) < n


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    (tmp / "one").mkdir()
    one = _job(tmp / "one")
    return tmp, one, _run_two(tmp)


def test_two_processes_fit_the_factors_of_one(runs):
    _, (factors, *_), two = runs
    store = FactorStore(two / "factors")
    for stage in ("covariance", "eigendecomposition", "lambda"):
        saved = store.load_nested(stage)
        for module in factors.modules:
            for key, value in saved[module].items():
                expected = factors.tensors[module][key]
                if key.endswith("eigenvectors"):  # a sign per column is arbitrary
                    value, expected = value.abs(), expected.abs()
                torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_two_processes_give_the_scores_of_one(runs):
    _, (_, scores, values, _), two = runs
    result = torch.load(two / "result.pt", weights_only=True)
    torch.testing.assert_close(result["total"], scores.total, rtol=1e-8, atol=1e-10)
    saved = ScoreStore(two / "scores").load("pairwise")
    torch.testing.assert_close(saved["scores"], scores.total, rtol=1e-8, atol=1e-10)
    for name, value in scores.per_module.items():
        torch.testing.assert_close(saved[f"module/{name}"], value, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(result["self"], values, rtol=1e-8, atol=1e-10)


def test_two_processes_refine_by_conjugate_gradient_and_search_damping_as_one(runs):
    """Each CG product (Fisher or Hessian) is the ranks' shares all-reduced: the refined
    scores equal one process's (a rank redoing the whole set would double the product);
    the damping search's fine-tuned halves are shared and gathered in order, so every
    candidate's agreement equals one process's."""
    _, (*_, refined), two = runs
    result = torch.load(two / "result.pt", weights_only=True)
    for curvature, expected in refined.items():
        torch.testing.assert_close(result[curvature], expected, rtol=1e-8, atol=1e-10)


def test_two_processes_build_the_index_of_one(runs):
    tmp, _, two = runs
    ours, theirs = Index.load(two / "index"), Index.load(tmp / "one" / "index")
    torch.testing.assert_close(ours.vectors(), theirs.vectors(), rtol=1e-8, atol=1e-10)
    store = IndexStore(two / "index")
    parts = sorted(store.folder.glob("vectors.part-*.safetensors"))
    counts = [
        json.loads(store.metadata(p.name.removesuffix(".safetensors"))["examples_per_rank"])
        for p in parts
    ]
    assert sum(map(sum, counts)) == N_TRAIN and all(min(c) > 0 for c in counts)


def test_each_rank_did_its_share_and_the_artifacts_say_so(runs):
    tmp, _, two = runs
    factor_store, score_store = FactorStore(two / "factors"), ScoreStore(two / "scores")
    for stage in ("covariance", "lambda"):
        assert _really_shared(factor_store.metadata(stage), N_TRAIN), stage
    assert _really_shared(score_store.metadata("pairwise"), N_TRAIN)
    assert _shares(score_store.metadata("pairwise"))[1] == [5, 6]  # ⌊11/2⌋ per part split
    one = ScoreStore(tmp / "one" / "scores").metadata("pairwise")
    assert _shares(one) == (1, [N_TRAIN])


def test_ranks_that_each_redo_the_whole_job_are_caught(tmp_path):
    redo = _run_two(tmp_path, redo_everything=True)
    metadata = FactorStore(redo / "factors").metadata("covariance")
    assert _shares(metadata) == (2, [N_TRAIN, N_TRAIN])
    assert not _really_shared(metadata, N_TRAIN)
    assert not _really_shared(ScoreStore(redo / "scores").metadata("pairwise"), N_TRAIN)


def test_without_a_process_group_there_is_one_share():
    shard = current_shard()
    assert (shard.rank, shard.world_size, shard.bounds(2, 9)) == (0, 1, (2, 9))
    sums = {"m": {"x": torch.ones(2)}}
    all_reduce_sums(sums, shard)
    assert torch.equal(sums["m"]["x"], torch.ones(2)) and gather(5, shard) == [5]


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 12])
def test_shares_cover_a_range_once_and_differ_by_at_most_one(world_size):
    spans = [Shard(r, world_size).bounds(4, 15) for r in range(world_size)]
    covered = [i for low, high in spans for i in range(low, high)]
    assert covered == list(range(4, 15))
    sizes = [high - low for low, high in spans]
    assert max(sizes) - min(sizes) <= 1

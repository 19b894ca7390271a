"""The gradient index against exact EK-FAC scores: exact at full dimension, degrading
gracefully below, a negative control, invariances, resuming and refusals."""

from __future__ import annotations

import re

import pytest
import torch

import attribution.index as index_module
from attribution import Damping, InputError, LanguageModelingTask
from attribution.errors import FactorMismatchError
from attribution.index import (
    Index,
    IndexArguments,
    IndexPart,
    build_index,
    index_scores,
    projection_shape,
)
from attribution.influence import ScoreArguments, pairwise_scores

from .models import random_examples, tiny_gpt2, tiny_llama
from .test_influence import fit  # float64 EK-FAC (or another strategy), empirical Fisher

TASK = LanguageModelingTask(pad_id=0)
F64 = ScoreArguments(dtype="float64")


def arguments(**given):
    return IndexArguments(**{"dtype": "float64", **given})


def pearson(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.fixture(scope="module")
def setting():
    model = tiny_gpt2()
    train, queries = random_examples(24, seed=1), random_examples(6, seed=2)
    factors = fit(model, train)
    exact = pairwise_scores(model, TASK, queries, train, factors, F64).total
    return model, train, queries, factors, exact


@pytest.mark.parametrize("method", ["eigen", "projection"])
@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_full_dimension_equals_pairwise_scores(method, strategy):
    model = tiny_llama()
    train, queries = random_examples(11, seed=3), random_examples(4, seed=4)
    factors = fit(model, train, strategy)
    damping = Damping(factor=0.3)
    expected = pairwise_scores(
        model, TASK, queries, train, factors, ScoreArguments(dtype="float64", damping=damping)
    ).total
    index = build_index(model, TASK, train, factors, arguments(method=method, damping=damping))
    assert index.floats_per_example == sum(s.numel() for s in _scales(index))
    found = index_scores(model, TASK, queries, index, damping=damping)
    torch.testing.assert_close(found, expected, rtol=1e-9, atol=1e-12)


def _scales(index):
    return [basis["scale"] for basis in index.bases.values()]


@pytest.mark.parametrize("method", ["eigen", "projection"])
def test_agreement_degrades_gracefully_with_the_dimension(setting, method):
    """Fewer stored coordinates, lower agreement, but far from none at half of them."""
    model, train, queries, factors, exact = setting
    agreement = {}
    for dimension in (None, 64, 16):
        index = build_index(
            model, TASK, train, factors, arguments(method=method, dimension=dimension)
        )
        agreement[dimension] = pearson(index_scores(model, TASK, queries, index), exact)
    assert agreement[None] == pytest.approx(1.0, abs=1e-12)
    assert 0.6 < agreement[64] < 1.0 - 1e-4, agreement
    assert 0.2 < agreement[16] < agreement[None], agreement
    assert index.floats_per_example <= 16 * len(index.modules)


def test_eigen_keeps_the_largest_eigenvalues(setting):
    model, train, _, factors, _ = setting
    index = build_index(model, TASK, train, factors, arguments(dimension=5))
    for name, basis in index.bases.items():
        eig = factors.eigenvalues(name).flatten()
        kept = eig[basis["keep"]]
        assert basis["keep"].numel() == 5
        assert kept.min() >= torch.topk(eig, 5).values.min()


def test_projection_shape_fits_the_budget():
    for n_out, n_in in ((24, 9), (8, 33), (1, 5), (64, 64)):
        for dimension in (1, 2, 7, 30, 100, 10_000):
            r_s, r_a = projection_shape(n_out, n_in, dimension)
            assert 1 <= r_s <= n_out and 1 <= r_a <= n_in
            assert r_s * r_a <= max(dimension, 1)
            assert r_s * r_a >= min(dimension, n_out * n_in) // 2  # most of the budget used


@pytest.mark.parametrize("control", ["shuffled coordinates", "another model's gradients"])
def test_a_wrong_index_agrees_poorly(setting, control):
    """Negative control: the same machinery with the wrong vectors must not agree."""
    model, train, queries, factors, exact = setting
    if control == "shuffled coordinates":
        index = build_index(model, TASK, train, factors, arguments())
        vectors = index.vectors()
        permutation = torch.randperm(vectors.shape[1], generator=torch.Generator().manual_seed(0))
        index.parts = [IndexPart(0, len(train), vectors=vectors[:, permutation])]
    else:
        other = tiny_gpt2(seed=5)
        index = build_index(other, TASK, train, factors, arguments())
    found = index_scores(model, TASK, queries, index)
    assert abs(pearson(found, exact)) < 0.5


def test_batch_size_and_partitions_do_not_change_the_index(setting):
    model, train, queries, factors, _ = setting
    reference = build_index(model, TASK, train, factors, arguments(method="projection"))
    for given in ({"batch_size": 5}, {"partitions": 4}, {"batch_size": 1, "partitions": 3}):
        index = build_index(model, TASK, train, factors, arguments(method="projection", **given))
        torch.testing.assert_close(index.vectors(), reference.vectors())
    torch.testing.assert_close(
        index_scores(model, TASK, queries, reference, batch_size=2),
        index_scores(model, TASK, queries, reference),
    )


def test_ranges_built_apart_make_one_index(setting, tmp_path):
    """Two builds of disjoint ranges (as two processes would) fill one folder."""
    model, train, queries, factors, exact = setting
    given = arguments(partitions=2)
    first = build_index(model, TASK, train, factors, given, tmp_path / "i", start=0, stop=10)
    assert [(p.start, p.stop) for p in first.parts] == [(0, 5), (5, 10)]
    with pytest.raises(InputError, match="holds 10 of its 24 training examples"):
        index_scores(model, TASK, queries, Index.load(tmp_path / "i", model))
    build_index(model, TASK, train, factors, given, tmp_path / "i", start=10)
    loaded = Index.load(tmp_path / "i", model)
    torch.testing.assert_close(index_scores(model, TASK, queries, loaded), exact)


class Killed(Exception):
    """Stands for the process being killed in the middle of a build."""


def test_a_killed_build_resumes_and_equals_an_uninterrupted_one(setting, tmp_path, monkeypatch):
    model, train, queries, factors, _ = setting
    given = arguments(method="projection", dimension=20, partitions=3)
    real = index_module.part_vectors
    calls, killed = [], []

    def dies_on_the_second_part(*args, **kwargs):
        calls.append(args[6:8])
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "part_vectors", dies_on_the_second_part)
    with pytest.raises(Killed):
        build_index(model, TASK, train, factors, given, tmp_path / "i")
    left = sorted(p.name for p in (tmp_path / "i").iterdir() if not p.name.startswith("."))
    assert left == ["arguments.json", "basis.safetensors", "vectors.part-0-8.safetensors"]
    calls.clear()
    resumed = build_index(model, TASK, train, factors, given, tmp_path / "i")
    assert calls == [(8, 16), (16, 24)]  # only the missing parts
    monkeypatch.undo()
    fresh = build_index(model, TASK, train, factors, given)
    torch.testing.assert_close(resumed.vectors(), fresh.vectors(), rtol=0, atol=0)
    loaded = Index.load(tmp_path / "i", model)
    torch.testing.assert_close(
        index_scores(model, TASK, queries, loaded), index_scores(model, TASK, queries, fresh)
    )


def test_a_folder_built_otherwise_is_refused(setting, tmp_path):
    model, train, _, factors, _ = setting
    folder = tmp_path / "i"
    build_index(model, TASK, train, factors, arguments(dimension=8), folder)
    with pytest.raises(FactorMismatchError, match="made with dimension=8, this run asks"):
        build_index(model, TASK, train, factors, arguments(dimension=9), folder)
    with pytest.raises(FactorMismatchError, match="made with method='eigen'"):
        build_index(
            model, TASK, train, factors, arguments(dimension=8, method="projection"), folder
        )
    with pytest.raises(FactorMismatchError, match="other training data"):
        build_index(model, TASK, train[:-1], factors, arguments(dimension=8), folder)
    with pytest.raises(FactorMismatchError, match="another model"):
        build_index(tiny_gpt2(seed=7), TASK, train, factors, arguments(dimension=8), folder)
    with pytest.raises(FactorMismatchError, match="other factors"):
        build_index(model, TASK, train, fit(model, train[:12]), arguments(dimension=8), folder)
    with pytest.raises(FactorMismatchError, match="built for another model"):
        Index.load(folder, tiny_gpt2(seed=7))
    # the batch size does not change the result: a rerun with another one reuses the folder
    build_index(model, TASK, train, factors, arguments(dimension=8, batch_size=3), folder)


def test_a_damping_other_than_the_index_s_is_refused(setting):
    model, train, queries, factors, _ = setting
    index = build_index(model, TASK, train, factors, arguments(damping=Damping(value=0.5)))
    with pytest.raises(
        FactorMismatchError, match=re.escape("built with damping 0.5, not 0.1 × mean")
    ):
        index_scores(model, TASK, queries, index, damping=Damping())
    with pytest.raises(FactorMismatchError, match=r"not 0\.25"):
        index_scores(model, TASK, queries, index, damping=0.25)
    index_scores(model, TASK, queries, index, damping=0.5)  # its own is fine


def test_identity_factors_and_bad_arguments_are_refused(setting):
    model, train, _, _, _ = setting
    identity = fit(model, train, "identity")
    with pytest.raises(InputError, match="identity factors have none"):
        build_index(model, TASK, train, identity)
    for given, message in (
        ({"dimension": 0}, "dimension must be an integer >= 1 or None, got 0"),
        ({"method": "pca"}, "method must be one of eigen, projection"),
        ({"partitions": 0}, "partitions must be an integer >= 1"),
        ({"dtype": "float16"}, "dtype must be float32 or float64"),
        ({"storage": "int8"}, "storage must be one of float32, float16, bfloat16; got 'int8'"),
    ):
        with pytest.raises(InputError, match=message):
            IndexArguments(**given)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_16_bit_storage_rounds_the_vectors_and_little_else(setting, storage):
    """Vectors computed in dtype, stored in 16 bits, upcast for the product."""
    model, train, queries, factors, _ = setting
    full = build_index(model, TASK, train, factors, arguments(dimension=64))
    half = build_index(model, TASK, train, factors, arguments(dimension=64, storage=storage))
    stored = index_module.STORAGE[storage]
    assert half.vectors().dtype == stored
    torch.testing.assert_close(half.vectors(), full.vectors().to(stored), rtol=0, atol=0)
    found = index_scores(model, TASK, queries, half)
    expected = index_scores(model, TASK, queries, full)
    assert found.dtype == torch.float64 and not torch.equal(found, expected)
    assert pearson(found, expected) > 0.999


def test_the_product_upcasts_a_chunk_at_a_time(setting, monkeypatch):
    """Chunks across part boundaries give the same scores as one product."""
    model, train, queries, factors, _ = setting
    given = arguments(dimension=8, storage="float16", partitions=3)
    index = build_index(model, TASK, train, factors, given)
    whole = index_scores(model, TASK, queries, index)
    monkeypatch.setattr(index_module, "CHUNK_FLOATS", 5 * index.floats_per_example)  # 5 rows
    torch.testing.assert_close(index_scores(model, TASK, queries, index), whole)


def test_an_index_from_before_the_storage_field_loads_as_stored(setting, tmp_path):
    import json

    model, train, queries, factors, _ = setting
    built = build_index(model, TASK, train, factors, arguments(dimension=8), tmp_path / "i")
    described = json.loads((tmp_path / "i" / "arguments.json").read_text())
    del described["arguments"]["storage"]
    (tmp_path / "i" / "arguments.json").write_text(json.dumps(described))
    old = Index.load(tmp_path / "i", model)
    assert old.arguments.storage is None and old.arguments.storage_dtype == torch.float64
    torch.testing.assert_close(
        index_scores(model, TASK, queries, old), index_scores(model, TASK, queries, built)
    )


def test_vectors_that_overflow_float16_are_refused(setting, monkeypatch):
    model, train, _, factors, _ = setting
    real = index_module.part_vectors
    monkeypatch.setattr(index_module, "part_vectors", lambda *a, **k: real(*a, **k) * 1e6)
    with pytest.raises(InputError, match=r"\[0, 24\) overflow float16; store them in bfloat16"):
        build_index(model, TASK, train, factors, arguments(storage="float16"))
    build_index(model, TASK, train, factors, arguments(storage="bfloat16"))  # its range is wider

"""benchmarks/stranger.py on the tiny world: every configuration runs and is reported."""

from __future__ import annotations

import pytest

from benchmarks.stranger import CONFIGS, SCOPES, measure_world, paired, table


def test_every_configuration_is_measured_against_the_null(tiny_world):
    world = measure_world(tiny_world, seeds=[0], steps=10, guard=8)
    null = world["null"]
    assert len(null["d"]) == null["draws"] == 20
    assert 0 < null["median"] <= null["p90"] <= 1
    assert world["base_d"] > null["p90"]  # the base model is no stranger to its forget set
    assert sum(world["guard_by_split"].values()) == 8
    runs = {r["config"]: r for r in world["runs"]}
    assert set(runs) == set(CONFIGS)
    for run in runs.values():
        assert 0 <= run["d"] <= 1 and 0 <= run["p"] <= 1
        assert run["retain"] <= 0.5 and run["seconds"] > 0
    assert runs["distill"]["guard_added"] == runs["simnpo"]["guard_added"] == 0
    assert 0 < runs["distill+guard"]["guard_added"] <= 8
    assert 0 < runs["distill+random"]["guard_added"] <= 8
    # the unguarded neighbours are the neighbours minus those the guard added
    assert runs["distill"]["neighbor_unguarded"] == runs["distill"]["neighbor"]
    rendered = table([world])
    assert all(f"| {config} |" in rendered for config in CONFIGS)


def test_scopes_edit_their_share_and_utility_is_measured(tiny_world):
    chosen = tuple(c for c in SCOPES if c.name in SCOPE_NAMES)
    world = measure_world(tiny_world, [0], steps=5, guard=8, configs=chosen, utility=True)
    runs = {r["config"]: r for r in world["runs"]}
    assert set(runs) == set(SCOPE_NAMES)
    assert abs(runs["distill+guard ekfac 1%"]["edited"] - 0.01) < 0.002
    assert abs(runs["distill+guard random 1%"]["edited"] - 0.01) < 0.002
    assert runs["distill all"]["edited"] > 0.99
    assert 0 < world["base_utility"] <= 1
    assert all(0 <= r["utility"] <= 1 for r in runs.values())
    assert all(r["best_step"] is not None and r["best_step"] <= 5 for r in runs.values())


SCOPE_NAMES = ("distill+guard ekfac 1%", "distill+guard random 1%", "distill all")


def test_paired_differences_and_their_bootstrap_interval():
    def run(config, seed, value):
        return {"config": config, "seed": seed, "neighbor": value}

    worlds = [
        {"world": "w0", "runs": [run("a", 0, -0.1), run("b", 0, -0.5), run("a", 1, -0.2)]},
        {"world": "w1", "runs": [run("a", 0, -0.3), run("b", 0, -0.4), run("b", 1, -0.9)]},
    ]
    result = paired(worlds, "a", "b", "neighbor")
    assert result["n"] == 2  # only (world, seed) pairs where both ran
    assert result["mean"] == pytest.approx((0.4 + 0.1) / 2)
    assert 0.1 - 1e-9 <= result["low"] <= result["mean"] <= result["high"] <= 0.4 + 1e-9
    assert result["wins"] == 2
    assert paired(worlds, "a", "missing", "neighbor")["n"] == 0

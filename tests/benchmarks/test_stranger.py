"""benchmarks/stranger.py on the tiny world: every configuration runs and is reported."""

from __future__ import annotations

from benchmarks.stranger import CONFIGS, measure_world, table


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

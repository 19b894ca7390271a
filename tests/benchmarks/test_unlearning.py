"""The unlearning benchmark's core on the tiny world: two methods, the unscoped and one
scoped configuration (default and matched pass), a few steps; the report's structure,
and nothing outside the scope changed."""

from __future__ import annotations

import json
import time

import pytest
import torch

from benchmarks.unlearning import (
    TITLE,
    Bench,
    Config,
    arguments_for,
    configurations,
    finish,
    load_bench,
    new_report,
    run_benchmark,
    run_configuration,
    shared_scope,
    target_check,
)
from unlearn import UnlearnArguments


@pytest.fixture(scope="module")
def bench(tiny_world) -> Bench:
    torch.set_num_threads(1)
    return load_bench(tiny_world)


def test_configurations_put_the_unscoped_run_first_and_matched_last():
    runs = configurations("npo", ["ekfac", "all"], [0.01, 0.05], [0.05])
    assert runs[0] == Config("npo", "all", 1.0)
    assert [r.sparsity for r in runs[1:3]] == [0.01, 0.05] and not runs[1].matched
    assert runs[-1] == Config("npo", "ekfac", 0.05, matched=True)
    assert runs[-1].label == "npo / ekfac 0.05 / matched"


def test_matched_arguments_target_the_unscoped_forget_loss():
    plan = {"matched_steps": 7, "matched_eval_every": 1, "matched_newton_iterations": 2}
    unscoped = {"metrics": {"forget_loss": 1.5}}
    matched = Config("ga", "ekfac", 0.05, matched=True)
    defaults = UnlearnArguments(method="ga")
    assert arguments_for(Config("ga", "all", 1.0), defaults, unscoped, 0.0, plan) is defaults
    arguments = arguments_for(matched, defaults, unscoped, 0.0, plan)
    assert (arguments.forget_target, arguments.steps, arguments.newton_iterations) == (1.5, 7, 2)
    assert arguments_for(matched, defaults, None, 0.0, plan) is None  # nothing to match
    assert arguments_for(matched, defaults, unscoped, 1.49, plan) is None  # it forgot nothing


def test_target_check_needs_matched_forgetting_half_the_shift_and_few_parameters():
    def row(scope, fraction, forget, shift):
        metrics = {"forget_loss": forget, "neighbor_shift": {"abs_log_prob_change": shift}}
        label = f"npo / {scope} {fraction}"
        return {
            "method": "npo",
            "scope": scope,
            "fraction": fraction,
            "label": label,
            "metrics": metrics,
        }

    unscoped = row("all", 1.0, 1.0, 2.0)
    rows = [unscoped, row("ekfac", 0.05, 1.1, 0.9), row("wagle", 0.05, 0.9, 0.1)]
    rows += [row("saliency", 0.2, 1.2, 0.1)]  # too many parameters
    verdict = target_check(rows, base_forget_loss=0.0)["npo"]
    assert verdict["best"] == "npo / ekfac 0.05" and verdict["met"]
    assert verdict["meeting"] == ["npo / ekfac 0.05"] and verdict["matching_runs"] == 1
    assert verdict["shift_ratio"] == pytest.approx(0.45)
    rows[1] = row("ekfac", 0.05, 1.1, 1.1)
    verdict = target_check(rows, base_forget_loss=0.0)["npo"]
    assert not verdict["met"] and verdict["best"] == "npo / ekfac 0.05"
    forgot_nothing = target_check([unscoped, row("ekfac", 0.05, 1.1, 0.1)], 0.99)["npo"]
    assert not forgot_nothing["met"] and forgot_nothing["best"] is None


def test_a_scoped_run_changes_nothing_outside_its_scope(bench):
    config = Config("npo", "ekfac", 0.05)
    row, model = run_configuration(bench, config, UnlearnArguments(steps=3, eval_every=1))
    scope = shared_scope(bench, "ekfac", 0.05)[0]
    base = dict(bench.base.named_parameters())
    moved = 0
    for name, param in model.named_parameters():
        outside = ~scope.masks[name]
        assert torch.equal(param.detach()[outside], base[name].detach()[outside]), name
        moved += int((param.detach() != base[name].detach()).sum())
    assert 0 < moved <= scope.edited
    assert row["changed"] == moved and row["changed_outside_scope"] == 0 and row["proof_holds"]
    assert row["fraction"] == pytest.approx(0.05, abs=1e-4) and row["steps_run"] == 3


def test_the_benchmark_writes_its_json_and_table(bench, tmp_path):
    started = time.perf_counter()
    plan = {
        "scopes": ["all", "ekfac"],
        "sparsities": [0.05],
        "matched": [0.05],
        "matched_steps": 2,
        "matched_eval_every": 1,
        "matched_newton_iterations": 1,
        "arguments": UnlearnArguments(steps=2, eval_every=1),
    }
    report = new_report(bench, plan, ["--test"], threads=1)
    run_benchmark(bench, ["ga"], plan, report, tmp_path, started)
    saved = json.loads((tmp_path / "unlearning.json").read_text())
    assert [b["model"] for b in saved["baselines"]] == ["base", "reference"]
    assert saved["plan"]["arguments"]["steps"] == 2 and saved["wall_seconds"] > 0
    labels = [r["label"] for r in saved["results"]]
    assert labels[:2] == ["ga / all", "ga / ekfac 0.05"]  # the matched run only if ga forgot
    for r in saved["results"]:
        assert r["changed_outside_scope"] == 0 and r["arguments"]["method"] == "ga"
        metrics = r["metrics"]
        assert metrics["forget_loss"] > 0 and 0 <= metrics["forget_probability"] <= 1
        assert set(metrics["neighbor_shift"]) >= {"abs_log_prob_change", "kl"}
        assert metrics["forget_quality"]["n"] == len(bench.sets["forget"])
    assert set(saved["target"]["ga"]) >= {"unscoped_forget_loss", "best", "met"}
    table = (tmp_path / "unlearning.md").read_text()
    assert table.startswith(f"# {TITLE}") and "| *reference* |" in table
    assert table.count("\n| ga | ") == len(saved["results"]) + 1  # + its target verdict
    finish(saved, tmp_path)  # a saved report can be written again

"""Issue 13's measurement: does the edit land where retraining lands, and does attribution help?

On each world (the embedded default world, and the same generator with other seeds: ``excise
world --seed S``), for each edit seed, four configurations edit a copy of the base model
within the 5 % ekfac scope:

- ``simnpo``: today's ``excise forget`` default (SimNPO, 120 steps, retain budget 0.5);
- ``distill``: stranger distillation, lr 1e-2, ``--steps`` steps, calibrated stop (the
  forget truth ratios matched to the original model's on holdout people), no retain budget;
- ``distill+guard``: the same, with the 96 training examples outside the forget set that
  influence predicts the edit damages most added to the retain set (:mod:`unlearn.guard`);
- ``distill+random``: the same, with 96 random non-forget training examples instead (the
  control of the same size).

Reported per run: KS D (and p) of the forget truth ratios against the reference model's
(retrained without the forget set); the perfect-stranger null of D on that world (the
original model with holdout names swapped in, 20 draws: median, 90th percentile); mean
Δ log p on neighbour (all, and those not in the guard), retain and world records; seconds.
The table gives the median and range over edit seeds.

    python -m benchmarks.stranger --worlds 0,1,2 --seeds 0,1,2      # ~45 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from analysis.calibration import TruthRatioMatch, split_truth_ratios, stranger_null
from analysis.shift import knowledge_shift
from attribution import FactorArguments, LanguageModelingTask, fit_factors, pairwise_scores
from attribution.data import subject_pool
from benchmarks.common import machine_info, results_folder, write_report
from unlearn import ScopeArguments, UnlearnArguments, scoped_edit
from unlearn.guard import guard_indices

CONFIGS = ("simnpo", "distill", "distill+guard", "distill+random")
GUARD_OF = {"distill+guard": "influence", "distill+random": "random"}  # which guard set
GUARD = 96
SPARSITY = 0.05


def world_folder(seed: int, size: str) -> Path:
    """The embedded world of ``seed`` (built into the cache when missing)."""
    from excise.world import PRESETS, build_world

    return build_world(PRESETS[size](seed=seed), progress=False)[0]


def measure_world(folder: Path, seeds: list[int], steps: int, guard: int) -> dict[str, Any]:
    """Every configuration × edit seed on one world, and the world's null."""
    from excise.models import load_model
    from excise.world import read_split

    base, tokenizer = load_model(folder / "base")
    reference, _ = load_model(folder / "reference")
    task = LanguageModelingTask(tokenizer)
    splits = {
        s: read_split(folder, s) for s in ("forget", "retain", "neighbor", "world", "holdout")
    }
    train = splits["forget"] + splits["retain"] + splits["neighbor"] + splits["world"]
    target = split_truth_ratios(reference, task, splits["forget"])
    null = stranger_null(
        base, task, splits["forget"], splits["holdout"], target,
        split_truth_ratios(base, task, splits["forget"]),
    )  # fmt: skip
    factors = fit_factors(base, task, train, FactorArguments(), None, False)
    scores = pairwise_scores(base, task, splits["forget"], train, factors).total
    forget_ids = {r["id"] for r in splits["forget"]}
    outside = [i for i, z in enumerate(train) if z["id"] not in forget_ids]
    guards = {"influence": guard_indices(scores, guard, set(range(len(train))) - set(outside))}
    holdout_match = TruthRatioMatch.to_holdout(base, task, splits["forget"], splits["holdout"])
    rows = []
    for seed in seeds:
        guards["random"] = random.Random(seed).sample(outside, len(guards["influence"]))
        for config in CONFIGS:
            chosen = guards[GUARD_OF[config]] if config in GUARD_OF else []
            rows.append(
                _run(
                    config,
                    seed,
                    base,
                    task,
                    splits,
                    train,
                    chosen,
                    target,
                    factors,
                    steps,
                    holdout_match,
                )
            )
    return {
        "world": folder.name,
        "null": {k: null.get(k) for k in ("median", "p90", "draws", "d")},
        "base_d": null.get("after_d"),
        "guard_by_split": _by_split([train[i] for i in guards["influence"]], splits),
        "runs": rows,
    }


def _run(config, seed, base, task, splits, train, chosen, target, factors, steps, match) -> dict:
    held = {r["id"] for r in splits["retain"]}
    added = [train[i] for i in chosen if train[i]["id"] not in held]
    model, started = copy.deepcopy(base), time.perf_counter()
    if config == "simnpo":
        arguments, criterion = UnlearnArguments(method="simnpo", steps=120, seed=seed), None
    else:
        criterion = match  # the original's holdout truth ratios, computed once per world
        arguments = UnlearnArguments(
            method="distill", lr=1e-2, steps=steps, eval_every=10, retain_budget=None,
            stop="calibrated", strangers=subject_pool(splits["holdout"]), seed=seed,
        )  # fmt: skip
    scoped_edit(
        model, task, splits["forget"], splits["retain"] + added,
        ScopeArguments(method="ekfac", sparsity=SPARSITY, seed=seed), arguments, factors,
        frozen=base, criterion=criterion, progress=False,
    )  # fmt: skip
    d = _ks(split_truth_ratios(model, task, splits["forget"]), target)
    guarded = {r["id"] for r in added}
    free = [r for r in splits["neighbor"] if r["id"] not in guarded]
    return {
        "config": config,
        "seed": seed,
        "d": d[0],
        "p": d[1],
        "neighbor": _shift(base, model, task, splits["neighbor"]),
        "neighbor_unguarded": _shift(base, model, task, free) if free else None,
        "retain": _shift(base, model, task, splits["retain"]),
        "world": _shift(base, model, task, splits["world"]),
        "guard_added": len(added),
        "seconds": time.perf_counter() - started,
    }


def _ks(ratios, target) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    result = ks_2samp(ratios, target)
    return float(result.statistic), float(result.pvalue)


def _shift(before, after, task, records) -> float:
    return knowledge_shift(before, after, task, records)["log_prob_change"]["mean"]


def _by_split(records, splits) -> dict[str, int]:
    where = {r["id"]: name for name, rs in splits.items() for r in rs}
    counts: dict[str, int] = {}
    for record in records:
        counts[where[record["id"]]] = counts.get(where[record["id"]], 0) + 1
    return counts


def table(worlds: list[dict[str, Any]]) -> str:
    """Median [min, max] over edit seeds of each configuration, per world."""
    lines = [
        "| world | null D median / p90 | config | D | neighbour Δ log p | neighbour (unguarded) "
        "| retain | world | s |",
        "|---|---|---|---|---|---|---|---|---:|",
    ]
    for world in worlds:
        null = f"{world['null']['median']:.3f} / {world['null']['p90']:.3f}"
        for config in CONFIGS:
            runs = [r for r in world["runs"] if r["config"] == config]
            cells = [_spread([r[k] for r in runs]) for k in ("d", "neighbor")]
            cells.append(_spread([r["neighbor_unguarded"] for r in runs]))
            cells += [_spread([r[k] for r in runs]) for k in ("retain", "world")]
            seconds = statistics.median(r["seconds"] for r in runs)
            lines.append(
                f"| {world['world']} | {null} | {config} | {' | '.join(cells)} | {seconds:.0f} |"
            )
    return "\n".join(lines) + "\n"


def _spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="0", help="world seeds, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="edit seeds, comma-separated")
    parser.add_argument("--size", default="default", choices=("tiny", "default"))
    parser.add_argument("--steps", type=int, default=400, help="distillation steps")
    parser.add_argument("--guard", type=int, default=GUARD)
    parser.add_argument("--results", type=Path, help="output folder (default: results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    worlds = [
        measure_world(world_folder(int(w), args.size), seeds, args.steps, args.guard)
        for w in args.worlds.split(",")
    ]
    report = {
        "worlds": worlds,
        "machine": machine_info(1, peers=()),
        "seconds": time.perf_counter() - started,
    }
    folder = results_folder(args.results, quick=False)
    title = "Stranger distillation, the calibrated stop and the guard set (issue 13)"
    write_report("stranger", title, report, table(worlds), folder)
    print(f"written to {folder} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()

"""Issue 13's measurement: does the edit land where retraining lands, and does attribution help?

On each world (the embedded default world, and the same generator with other seeds: ``excise
world --seed S``), for each edit seed, each configuration of a set edits a copy of the base
model. ``--set main`` (the 5 % ekfac scope):

- ``simnpo``: the earlier ``excise forget`` default (SimNPO, 120 steps, retain budget 0.5);
- ``distill``: stranger distillation, lr 1e-2, ``--steps`` steps, calibrated stop (the
  forget truth ratios matched to the original model's on holdout people), no retain budget
  (today's default recipe, :mod:`excise.recipes`);
- ``distill+guard``: the same, with the 96 training examples outside the forget set that
  influence predicts the edit damages most added to the retain set (:mod:`unlearn.guard`);
- ``distill+random``: the same, with 96 random non-forget training examples instead (the
  control of the same size; today's ``excise forget`` default guard).

``--set scopes``: ``distill`` with the influence guard in the ekfac, random and saliency
scopes at 1 % and 5 %, and unscoped (``all``) with and without the guard.

Reported per run: KS D (and p) of the forget truth ratios against the reference model's
(retrained without the forget set); the perfect-stranger null of D on that world (the
original model with holdout names swapped in, 20 draws: median, 90th percentile); mean
Δ log p on neighbour (all, and those not in the guard), retain and world records; the
audit's model utility (``--utility``); the edited share; the calibrated stop's step;
seconds. The table gives the median and range over edit seeds, then paired differences
(same world and seed) of each choice against its control, with a bootstrap interval.

    python -m benchmarks.stranger --worlds 0,1,2 --seeds 0,1,2      # ~45 min on 2 cores
    python -m benchmarks.stranger --set scopes --utility --threads 2  # ~45 min
    python -m benchmarks.stranger --render results/stranger.json      # tables only
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.calibration import TruthRatioMatch, split_truth_ratios, stranger_null
from analysis.shift import knowledge_shift
from attribution import FactorArguments, LanguageModelingTask, fit_factors, pairwise_scores
from attribution.data import subject_pool
from benchmarks.common import machine_info, results_folder, write_report
from unlearn import ScopeArguments, UnlearnArguments, scoped_edit
from unlearn.guard import guard_indices, random_guard_indices, with_guard

GUARD = 96
SPARSITY = 0.05
BOOTSTRAP = 10_000  # resamples of the paired (world, seed) differences


@dataclass(frozen=True)
class Config:
    """One edit: the objective, its scope and the guard set added to the retain set."""

    method: str  # simnpo (120 steps, retain budget) | distill (calibrated stop)
    scope: str = "ekfac"
    sparsity: float = SPARSITY
    guard: str | None = None  # influence | random (the control of the same size)

    @property
    def name(self) -> str:
        name = self.method + {"influence": "+guard", "random": "+random", None: ""}[self.guard]
        if (self.scope, self.sparsity) == ("ekfac", SPARSITY):
            return name
        return f"{name} {self.scope}" + ("" if self.scope == "all" else f" {self.sparsity:.0%}")


MAIN = (
    Config("simnpo"),
    Config("distill"),
    Config("distill", guard="influence"),
    Config("distill", guard="random"),
)
SCOPES = (
    *(
        Config("distill", scope, sparsity, guard="influence")
        for scope in ("ekfac", "random", "saliency")
        for sparsity in (0.01, 0.05)
    ),
    Config("distill", "all", 1.0, guard="influence"),
    Config("distill", "all", 1.0),
)
SETS = {"main": MAIN, "scopes": SCOPES}
PAIRS = {  # (attribution's choice, its control) per set
    "main": [
        ("distill+guard", "distill+random"),
        ("distill+guard", "distill"),  # and each guard against none
        ("distill+random", "distill"),
    ],
    "scopes": [
        ("distill+guard ekfac 1%", "distill+guard random 1%"),
        ("distill+guard", "distill+guard random 5%"),
        ("distill+guard ekfac 1%", "distill+guard saliency 1%"),
        ("distill+guard", "distill+guard saliency 5%"),
    ],
}
CONFIGS = tuple(c.name for c in MAIN)


def world_folder(seed: int, size: str) -> Path:
    """The embedded world of ``seed`` (built into the cache when missing)."""
    from excise.world import PRESETS, build_world

    return build_world(PRESETS[size](seed=seed), progress=False)[0]


def measure_world(
    folder: Path,
    seeds: list[int],
    steps: int,
    guard: int,
    configs: tuple[Config, ...] = MAIN,
    utility: bool = False,
) -> dict[str, Any]:
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
    own = {i for i, z in enumerate(train) if z["id"] in forget_ids}
    guards = {"influence": guard_indices(scores, guard, own)}
    world = World(
        base, task, splits, train, target, factors, steps,
        TruthRatioMatch.to_holdout(base, task, splits["forget"], splits["holdout"]), utility,
    )  # fmt: skip
    rows = []
    for seed in seeds:
        guards["random"] = random_guard_indices(len(train), len(guards["influence"]), own, seed)
        for config in configs:
            rows.append(_run(world, config, seed, guards[config.guard] if config.guard else []))
    return {
        "world": folder.name,
        "null": {k: null.get(k) for k in ("median", "p90", "draws", "d")},
        "base_d": null.get("after_d"),
        "base_utility": _utility(base, task, splits) if utility else None,
        "guard_by_split": _by_split([train[i] for i in guards["influence"]], splits),
        "runs": rows,
    }


@dataclass(frozen=True)
class World:
    """What every run on one world shares (computed once)."""

    base: Any
    task: LanguageModelingTask
    splits: dict[str, list]
    train: list
    target: Any  # the reference model's forget truth ratios
    factors: Any
    steps: int
    holdout_match: TruthRatioMatch  # the calibrated stop's criterion
    utility: bool


def _run(world: World, config: Config, seed: int, chosen: list[int]) -> dict[str, Any]:
    base, task, splits = world.base, world.task, world.splits
    retain = with_guard(splits["retain"], [world.train[i] for i in chosen])
    added = retain[len(splits["retain"]) :]
    model, started = copy.deepcopy(base), time.perf_counter()
    if config.method == "simnpo":
        arguments, criterion = UnlearnArguments(method="simnpo", steps=120, seed=seed), None
    else:
        criterion = world.holdout_match
        arguments = UnlearnArguments(
            method="distill", lr=1e-2, steps=world.steps, eval_every=10, retain_budget=None,
            stop="calibrated", strangers=subject_pool(splits["holdout"]), seed=seed,
        )  # fmt: skip
    scope = ScopeArguments(method=config.scope, sparsity=config.sparsity, seed=seed)
    edit = scoped_edit(
        model, task, splits["forget"], retain, scope, arguments,
        world.factors, frozen=base, criterion=criterion, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    d = _ks(split_truth_ratios(model, task, splits["forget"]), world.target)
    guarded = {r["id"] for r in added}
    free = [r for r in splits["neighbor"] if r["id"] not in guarded]
    return {
        "config": config.name,
        "seed": seed,
        "d": d[0],
        "p": d[1],
        "neighbor": _shift(base, model, task, splits["neighbor"]),
        "neighbor_unguarded": _shift(base, model, task, free) if free else None,
        "retain": _shift(base, model, task, splits["retain"]),
        "world": _shift(base, model, task, splits["world"]),
        "utility": _utility(model, task, splits) if world.utility else None,
        "edited": edit.scope.edited / sum(p.numel() for p in model.parameters()),
        "steps": edit.result.steps_run,
        "best_step": edit.result.details.get("calibrated_stop", {}).get("best_step"),
        "stopped": edit.result.stopped,
        "guard_added": len(added),
        "seconds": seconds,
    }


def _utility(model, task, splits) -> float:
    """The audit's model utility (harmonic mean over the utility splits the world has:
    retain and world)."""
    from analysis.metrics import split_metrics
    from analysis.utility import UTILITY_SPLITS, model_utility

    metrics = {s: split_metrics(model, task, s, splits[s]) for s in UTILITY_SPLITS if s in splits}
    return model_utility(metrics)["value"]


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


def paired(worlds: list[dict[str, Any]], a: str, b: str, key: str, seed: int = 0) -> dict:
    """``a − b`` of ``key`` over runs paired by (world, edit seed): mean and a 95 % interval.

    The interval is the percentile bootstrap over pairs (``BOOTSTRAP`` resamples); ``wins``
    counts pairs where ``a`` is larger. Pairs share the world and the seed (batch order,
    random guard draw), so their difference removes both.
    """
    runs = {(w["world"], r["seed"], r["config"]): r[key] for w in worlds for r in w["runs"]}
    keys = sorted({(w, s) for w, s, c in runs if c == a and (w, s, b) in runs})
    diffs = [runs[(w, s, a)] - runs[(w, s, b)] for w, s in keys]
    if not diffs:
        return {"a": a, "b": b, "key": key, "n": 0}
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(BOOTSTRAP))
    return {
        "a": a,
        "b": b,
        "key": key,
        "n": len(diffs),
        "mean": statistics.fmean(diffs),
        "low": means[int(0.025 * BOOTSTRAP)],
        "high": means[int(0.975 * BOOTSTRAP) - 1],
        "wins": sum(d > 0 for d in diffs),
    }


def table(worlds: list[dict[str, Any]], comparisons: list[dict] | None = None) -> str:
    """Median [min, max] over edit seeds of each configuration, per world; then the paired
    differences of each attribution choice against its control."""
    lines = [
        "| world | null D median / p90 | config | edited | D | neighbour Δ log p "
        "| neighbour (unguarded) | retain | world | utility | stop step | s |",
        "|---|---|---|---:|---|---|---|---|---|---|---:|---:|",
    ]
    for world in worlds:
        null = f"{world['null']['median']:.3f} / {world['null']['p90']:.3f}"
        names = list(dict.fromkeys(r["config"] for r in world["runs"]))
        for name in names:
            runs = [r for r in world["runs"] if r["config"] == name]
            edited = statistics.median(r.get("edited", SPARSITY) for r in runs)
            cells = [_spread([r[k] for r in runs]) for k in ("d", "neighbor")]
            cells.append(_spread([r["neighbor_unguarded"] for r in runs]))
            cells += [_spread([r.get(k) for r in runs]) for k in ("retain", "world", "utility")]
            stops = [r.get("best_step") for r in runs]
            steps = f"{statistics.median(stops):.0f}" if None not in stops else "–"
            seconds = statistics.median(r["seconds"] for r in runs)
            lines.append(
                f"| {world['world']} | {null} | {name} | {edited:.1%} | {' | '.join(cells)} "
                f"| {steps} | {seconds:.0f} |"
            )
    if comparisons:
        lines += [
            "",
            "| a − b (paired by world and seed) | of | pairs | mean | 95 % interval | a > b |",
            "|---|---|---:|---:|---|---:|",
        ]
        for c in comparisons:
            if c["n"]:
                lines.append(
                    f"| {c['a']} − {c['b']} | {c['key']} | {c['n']} | {c['mean']:+.3f} "
                    f"| [{c['low']:+.3f}, {c['high']:+.3f}] | {c['wins']}/{c['n']} |"
                )
    return "\n".join(lines) + "\n"


def comparisons_of(worlds: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> list[dict]:
    """Each pair on neighbour and world shift (higher: less damage) and D (lower: closer)."""
    return [paired(worlds, a, b, key) for a, b in pairs for key in ("neighbor", "world", "d")]


def _spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def render(path: Path) -> None:
    """Recompute the comparisons and the markdown of a finished run's JSON, in place."""
    import json

    report = json.loads(path.read_text())
    pairs = PAIRS[report.get("set", "main")]
    report["comparisons"] = comparisons_of(report["worlds"], pairs)
    markdown = table(report["worlds"], report["comparisons"])
    title = path.with_suffix(".md").read_text().splitlines()[0].removeprefix("# ")
    write_report(path.stem, title, report, markdown, path.parent)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="0", help="world seeds, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="edit seeds, comma-separated")
    parser.add_argument("--size", default="default", choices=("tiny", "default"))
    parser.add_argument("--set", default="main", choices=tuple(SETS), help="which configs")
    parser.add_argument("--steps", type=int, default=400, help="distillation steps")
    parser.add_argument("--guard", type=int, default=GUARD)
    parser.add_argument("--utility", action="store_true", help="also the audit's utility")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, help="output folder (default: results/)")
    parser.add_argument(
        "--render", type=Path, help="only rewrite the tables of this results JSON (no runs)"
    )
    args = parser.parse_args(argv)
    if args.render:
        render(args.render)
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_info(args.threads, peers=())  # its load average: at the start
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = SETS[args.set]
    worlds = []
    for w in args.worlds.split(","):
        folder = world_folder(int(w), args.size)
        worlds.append(measure_world(folder, seeds, args.steps, args.guard, configs, args.utility))
    comparisons = comparisons_of(worlds, PAIRS[args.set])
    report = {
        "set": args.set,
        "worlds": worlds,
        "comparisons": comparisons,
        "machine": machine,
        "seconds": time.perf_counter() - started,
    }
    folder = results_folder(args.results, quick=False)
    name = "stranger" if args.set == "main" else f"stranger_{args.set}"
    title = "Stranger distillation, the calibrated stop and the guard set (issue 13)"
    write_report(name, f"{title}: {args.set}", report, table(worlds, comparisons), folder)
    print(f"written to {folder} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()

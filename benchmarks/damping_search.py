"""Damping chosen on data (``attribution.damping_search``) against the fixed heuristic
(0.1 × each module's mean eigenvalue), by LDS on the fidelity benchmark's cached
retraining ground truth (``python -m benchmarks.fidelity`` builds it).

For each setting and search seed: the search's choice (no retraining: K fine-tunes of
the trained model on random halves), the LDS of EK-FAC at the chosen damping, at the
heuristic, and at every candidate (the oracle's pick is the best of these, chosen on the
evaluation data itself: a ceiling, not a method), with paired differences over queries.

    python -m benchmarks.damping_search --setting digits --setting world --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from attribution import Damping, ScoreArguments
from attribution.artifacts import utc_timestamp
from attribution.damping_search import SearchArguments, choose_damping
from benchmarks.common import RESULTS, write_report
from benchmarks.fidelity import lds, summary
from benchmarks.fidelity_methods import BATCH_SIZE, excise_factors, excise_pairwise
from benchmarks.fidelity_sweep import cached_setting


def evaluate(setting_name: str, seeds: list[int], search: SearchArguments) -> dict[str, Any]:
    """LDS per candidate damping, and the search's choice per seed, on one setting."""
    setting, model, masks, measured = cached_setting(setting_name)
    factors = excise_factors(setting, model, "ekfac", "empirical")
    per_candidate = {}
    for damping in [Damping(), *search.damping_candidates()]:
        arguments = ScoreArguments(batch_size=BATCH_SIZE, damping=damping)
        scores = excise_pairwise(setting, model, factors, arguments)
        per_candidate[damping.describe()] = lds(scores, masks, measured)
    heuristic = per_candidate[Damping().describe()]
    choices = []
    for seed in seeds:
        started = time.perf_counter()
        choice = choose_damping(
            model,
            setting.task,
            setting.train,
            setting.queries,
            factors,
            SearchArguments(**{**search.to_dict(), "seed": seed}),
            ScoreArguments(batch_size=BATCH_SIZE),
            progress=False,
        )
        chosen = per_candidate[choice.damping.describe()]
        choices.append(
            {
                "seed": seed,
                "chosen": choice.damping.describe(),
                "lds": summary(chosen),
                "minus_heuristic": paired(chosen, heuristic),
                "search_seconds": round(time.perf_counter() - started, 1),
                "agreement": choice.candidates,
            }
        )
    return {
        "setting": setting_name,
        "describe": setting.describe(),
        "heuristic": Damping().describe(),
        "lds": {name: summary(values) for name, values in per_candidate.items()},
        "choices": choices,
    }


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean ± s.e. of a − b over the queries where both are finite."""
    diff = (a - b)[torch.isfinite(a - b)].double()
    return {"mean": diff.mean().item(), "stderr": diff.std().item() / math.sqrt(diff.numel())}


def markdown(results: list[dict[str, Any]], search: SearchArguments, command: str) -> str:
    lines = [
        "| setting | search seed | chosen damping | LDS chosen | LDS heuristic (0.1 ×) | "
        "chosen − heuristic (paired) | best candidate (oracle) | search s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lds_ = result["lds"]
        oracle = max(lds_, key=lambda name: lds_[name]["mean"])
        heuristic = lds_[result["heuristic"]]
        for c in result["choices"]:
            d = c["minus_heuristic"]
            lines.append(
                f"| {result['setting']} | {c['seed']} | {c['chosen']} | "
                f"{c['lds']['mean']:.3f} ± {c['lds']['stderr']:.3f} | "
                f"{heuristic['mean']:.3f} ± {heuristic['stderr']:.3f} | "
                f"{d['mean']:+.3f} ± {d['stderr']:.3f} | {oracle}: {lds_[oracle]['mean']:.3f} | "
                f"{c['search_seconds']} |"
            )
    lines += [
        "",
        "LDS of EK-FAC at every candidate (mean ± s.e. over queries):",
        "",
        "| setting | " + " | ".join(results[0]["lds"]) + " |",
        "|---|" + "---:|" * len(results[0]["lds"]),
    ]
    for result in results:
        cells = [f"{v['mean']:.3f}" for v in result["lds"].values()]
        lines.append(f"| {result['setting']} | " + " | ".join(cells) + " |")
    a = search
    lines += [
        "",
        f"Search: {a.perturbations} random halves, {a.steps} Adam steps (lr {a.learning_rate:g}, "
        f"batch {a.batch_size}) on the tracked modules per half; probes = the queries.",
        f"{utc_timestamp()}. Command: `{command}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", choices=("digits", "world"), required=True)
    parser.add_argument("--seeds", default="0,1,2", help="search seeds (comma-separated)")
    parser.add_argument("--steps", type=int, default=SearchArguments.steps)
    parser.add_argument("--learning-rate", type=float, default=SearchArguments.learning_rate)
    parser.add_argument("--name", default="damping_search", help="results file name")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    search = SearchArguments(steps=args.steps, learning_rate=args.learning_rate)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [evaluate(name, seeds, search) for name in args.setting]
    command = "python -m benchmarks.damping_search " + " ".join(
        [f"--setting {s}" for s in args.setting]
        + [f"--seeds {args.seeds}", f"--steps {args.steps}"]
        + [f"--learning-rate {args.learning_rate:g}"]
    )
    table = markdown(results, search, command)
    title = "Damping chosen on data vs the fixed heuristic (EK-FAC, LDS)"
    write_report(args.name, title, {"command": command, "results": results}, table, RESULTS)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LDS of excise's EK-FAC and conjugate-gradient solves across damping, on the fidelity
benchmark's cached retraining ground truth (``python -m benchmarks.fidelity`` builds it).

Each configuration is ``curvature:damping:iterations:start`` — curvature ``fisher`` (the
empirical Fisher EK-FAC approximates) or ``hessian`` (of the mean training loss);
damping an absolute λ (``1e-2``) or a factor of each module's mean EK-FAC eigenvalue
(``f0.1``, the default rule); iterations of conjugate gradient (0: EK-FAC alone); start
``p`` (EK-FAC-preconditioned, warm-started from EK-FAC's solution) or ``n`` (plain CG from
zero). One model trained on the full training set; the same subsets for every row.

    python -m benchmarks.fidelity_sweep --setting digits fisher:f0.1:0:p hessian:1e-2:3:p
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from attribution import Damping, ScoreArguments
from attribution.artifacts import utc_timestamp
from benchmarks.common import RESULTS, write_report
from benchmarks.fidelity import (
    FIDELITY_CACHE,
    FULL,
    cached_model,
    ground_truth,
    lds,
    make_setting,
    subset_masks,
    summary,
)
from benchmarks.fidelity_methods import BATCH_SIZE, excise_factors, excise_pairwise


def parse_configuration(text: str) -> dict[str, Any]:
    """``curvature:damping:iterations:start`` as a dict (see the module docstring).

    >>> parse_configuration("hessian:1e-2:3:p")["damping"]
    Damping(value=0.01, factor=0.1)
    """
    curvature, damping, iterations, start = text.split(":")
    value = (
        Damping(factor=float(damping[1:]))
        if damping.startswith("f")
        else Damping(value=float(damping))
    )
    return {
        "name": text,
        "curvature": curvature,
        "damping": value,
        "iterations": int(iterations),
        "preconditioned": start == "p",
    }


def cached_setting(setting_name: str):
    """``(setting, model, masks, measured)``: the setting, its full-data model (seed 0) and
    the fidelity benchmark's subsets and measured query losses, from the cache."""
    setting = make_setting(setting_name, argparse.Namespace(digits_data=None))
    folder = FIDELITY_CACHE / setting.key()
    model = cached_model(setting, folder, "full", range(len(setting.train)), 0, True)[1]
    masks = subset_masks(len(setting.train), FULL[setting_name]["subsets"])
    measured = ground_truth(setting, masks, FULL[setting_name]["seeds"], folder).mean(1)
    return setting, model, masks, measured


def sweep(
    setting_name: str, configurations: list[str], modules: str | None = None
) -> dict[str, Any]:
    """LDS (mean ± s.e. over queries) and seconds of every configuration on one setting;
    ``modules``: a regex of tracked modules instead of the setting's (excise's default)."""
    setting, model, masks, measured = cached_setting(setting_name)
    factors = excise_factors(setting, model, "ekfac", "empirical", modules)
    rows = []
    for text in configurations:
        config = parse_configuration(text)
        started = time.perf_counter()
        arguments = ScoreArguments(
            batch_size=BATCH_SIZE,
            damping=config["damping"],
            cg_iterations=config["iterations"],
            cg_curvature=config["curvature"],
            cg_preconditioned=config["preconditioned"],
        )
        scores = excise_pairwise(setting, model, factors, arguments)
        per_query = lds(scores, masks, measured)
        rows.append(
            {
                "configuration": text,
                "lds": summary(per_query),
                "per_query": per_query.tolist(),  # for paired comparisons across runs
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    tracked = sorted(factors.modules)
    return {
        "setting": setting_name,
        "describe": setting.describe(),
        "modules": modules,
        "tracked": tracked,
        "rows": rows,
    }


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        "| setting | tracked modules | curvature:damping:iterations:start | LDS | s |",
        "|---|---:|---|---:|---:|",
    ]
    for result in results:
        for row in result["rows"]:
            lds_ = row["lds"]
            lines.append(
                f"| {result['setting']} | {len(result['tracked'])} | `{row['configuration']}` | "
                f"{lds_['mean']:.3f} ± {lds_['stderr']:.3f} | {row['seconds']} |"
            )
    return "\n".join(lines) + f"\n\n{utc_timestamp()}. Command: `{command}`\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", choices=("digits", "world"), required=True)
    parser.add_argument("--name", default="fidelity_sweep", help="results file name")
    parser.add_argument("--modules", help="regex of tracked modules (default: the setting's)")
    parser.add_argument("configurations", nargs="+")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [sweep(name, args.configurations, args.modules) for name in args.setting]
    modules = [f"--modules '{args.modules}'"] if args.modules else []
    command = "python -m benchmarks.fidelity_sweep " + " ".join(
        [f"--setting {s}" for s in args.setting]
        + [f"--name {args.name}", *modules, *args.configurations]
    )
    title = "Attribution fidelity: EK-FAC and conjugate-gradient solves across damping"
    write_report(
        args.name,
        title,
        {"command": command, "results": results},
        markdown(results, command),
        RESULTS,
    )
    print(markdown(results, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

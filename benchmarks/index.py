"""The gradient index (``excise index``): agreement with exact EK-FAC scores as a function
of the stored dimension, and query latency with and without the index.

Setting: the tiny embedded world's trained ``base`` Llama (2 layers, width 64; the
modules ``excise attribute`` tracks by default: the blocks' Linear layers and the tied
``lm_head``), EK-FAC factors with its defaults (true Fisher, damping 0.1 × mean
eigenvalue), float32. Training set: the records the model was trained on (first
phrasing); queries: the reworded forget and retain questions (as the fidelity benchmark,
:class:`benchmarks.fidelity_settings.WorldSetting`).

Agreement: for each method (``eigen``, ``projection``) and dimension d (stored floats per
module and example), each query's scores over the training set from the index against
:func:`attribution.influence.pairwise_scores` with the same factors and damping: Pearson
and Spearman per query, mean ± standard error over queries.

Latency: one query against N training examples (the training set repeated to N), the
median of ``repeats`` runs (one run without the index: it is long, and the gap is wide):
without the index, ``pairwise_scores`` (the query's gradient,
preconditioned, then a pass of per-example gradients over the N examples); with it,
``index_scores`` (the query's gradient through the index's map, then one product with
the stored [N, D] matrix). The index's one-off build time is reported beside it.

    python -m benchmarks.index              # ~3 min on 2 busy cores
    python -m benchmarks.index --quick      # fewer dimensions and sizes, to cache/quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, results_folder, write_report

THREADS = 2
DIMENSIONS = (16, 64, 256, 1024, 4096, None)
QUICK_DIMENSIONS = (64, 1024, None)
METHODS = ("eigen", "projection")
SIZES = (1_000, 4_000)  # the pass without an index takes ~40 s at 4000 here
QUICK_SIZES = (500,)
FULL_INDEX_BYTES = 1.5e9  # the exact index (600 KB per example) is timed up to this size
LATENCY_DIMENSIONS = (None, 256)  # the index at full dimension (exact) and compressed
REPEATS = 3


def setting() -> tuple[Any, Any]:
    """The world setting and its trained base model (float32, eval, CPU)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.fidelity_settings import WorldSetting

    world = WorldSetting()
    model = AutoModelForCausalLM.from_pretrained(world.folder / "base", local_files_only=True)
    return world, model.float().eval()


def per_query(found: torch.Tensor, exact: torch.Tensor) -> dict[str, dict[str, float]]:
    """Pearson and Spearman of each query's row, as mean ± standard error."""
    from attribution.damping_search import rank_correlations

    x, y = found.double(), exact.double()
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    pearson = (xc * yc).sum(1) / (xc.norm(dim=1) * yc.norm(dim=1)).clamp(min=1e-300)
    spearman = rank_correlations(x.T, y.T)
    return {"pearson": mean_se(pearson), "spearman": mean_se(spearman)}


def mean_se(values: torch.Tensor) -> dict[str, float]:
    values = values[~torch.isnan(values)]
    return {
        "mean": values.mean().item(),
        "se": (values.std() / values.numel() ** 0.5).item(),
        "n": values.numel(),
    }


def agreement(world, model, factors, dimensions) -> list[dict[str, Any]]:
    from attribution.index import IndexArguments, build_index, index_scores
    from attribution.influence import ScoreArguments, pairwise_scores

    exact = pairwise_scores(
        model, world.task, world.queries, world.train, factors, ScoreArguments(), False
    ).total
    rows = []
    for method in METHODS:
        for dimension in dimensions:
            arguments = IndexArguments(dimension=dimension, method=method)
            started = time.perf_counter()
            index = build_index(model, world.task, world.train, factors, arguments, progress=False)
            built = time.perf_counter() - started
            found = index_scores(model, world.task, world.queries, index, progress=False)
            rows.append(
                {
                    "method": method,
                    "dimension": dimension,
                    "floats_per_example": index.floats_per_example,
                    "build_seconds": built,
                    **per_query(found, exact),
                }
            )
            print(f"  {method} d={dimension}: {rows[-1]['pearson']['mean']:.3f}", file=sys.stderr)
    return rows


def latency(world, model, factors, sizes, repeats) -> list[dict[str, Any]]:
    from attribution.index import IndexArguments, build_index, index_scores
    from attribution.influence import ScoreArguments, pairwise_scores

    query = world.queries[:1]
    rows = []
    for n in sizes:
        train = [world.train[i % len(world.train)] for i in range(n)]
        arguments = ScoreArguments(batch_size=64)

        def exact(train=train, arguments=arguments):
            pairwise_scores(model, world.task, query, train, factors, arguments, False)

        row = {"n_train": n, "without_index_seconds": median_time(exact, 1)}
        for dimension in LATENCY_DIMENSIONS:
            full_floats = sum(factors.eigenvalues(m).numel() for m in factors.modules)
            if dimension is None and n * full_floats * 4 > FULL_INDEX_BYTES:
                continue
            started = time.perf_counter()
            index = build_index(
                model,
                world.task,
                train,
                factors,
                IndexArguments(dimension=dimension, batch_size=64),
                progress=False,
            )
            build = time.perf_counter() - started
            index.vectors()  # in memory (built without a folder)

            def indexed(index=index):
                index_scores(model, world.task, query, index, progress=False)

            key = "full" if dimension is None else str(dimension)
            row[f"index_{key}"] = {
                "query_seconds": median_time(indexed, repeats),
                "build_seconds": build,
                "floats_per_example": index.floats_per_example,
                "megabytes": n * index.floats_per_example * 4 / 1e6,
            }
            del index
        rows.append(row)
        print(f"  N={n}: {row}", file=sys.stderr)
    return rows


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def markdown(report: dict[str, Any]) -> str:
    setting_ = report["setting"]
    lines = [
        f"{setting_['model']}; {setting_['n_train']} training records, "
        f"{setting_['n_queries']} queries; EK-FAC, true Fisher, damping 0.1 × mean eigenvalue, "
        f"{setting_['n_modules']} modules ({setting_['full_floats']} floats per example in "
        "full). Agreement with exact EK-FAC pairwise scores, per query (mean ± s.e.):",
        "",
        "| method | d per module | floats / example | Pearson | Spearman |",
        "|---|---|---|---|---|",
    ]
    for row in report["agreement"]:
        d = "full" if row["dimension"] is None else row["dimension"]
        p, s = row["pearson"], row["spearman"]
        lines.append(
            f"| {row['method']} | {d} | {row['floats_per_example']} | "
            f"{p['mean']:.3f} ± {p['se']:.3f} | {s['mean']:.3f} ± {s['se']:.3f} |"
        )
    lines += [
        "",
        "One query against N training examples (the training set repeated), median of "
        f"{report['repeats']} runs, seconds; the index's one-off build time beside it:",
        "",
        "| N | without index | index, full (exact) | build | index, eigen d=256 | build | "
        "index size (full / d=256) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["latency"]:
        full, small = row.get("index_full"), row["index_256"]
        exact = (
            f"{full['query_seconds']:.4f} | {full['build_seconds']:.1f}"
            if full
            else "(not run: too large) | –"
        )
        full_mb = row["n_train"] * setting_["full_floats"] * 4 / 1e6
        lines.append(
            f"| {row['n_train']} | {row['without_index_seconds']:.3f} | {exact} | "
            f"{small['query_seconds']:.4f} | {small['build_seconds']:.1f} | "
            f"{full_mb:.0f} MB / {small['megabytes']:.1f} MB |"
        )
    m = report["machine"]
    lines += [
        "",
        f"{m['threads']} threads on {m['cpu_count']} CPUs (shared with other work: timings "
        f"are indicative); torch {m['torch']}, excise {m['excise']}; {m['date']}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer dimensions and sizes")
    parser.add_argument("--sizes", help="comma-separated training-set sizes for the latency")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--results", type=Path, help="folder for index.json and index.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attribution import FactorArguments, fit_factors

    world, model = setting()
    factors = fit_factors(
        model, world.task, world.train, FactorArguments(modules=world.modules), progress=False
    )
    dimensions = QUICK_DIMENSIONS if args.quick else DIMENSIONS
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    report = {
        "setting": {
            **{k: v for k, v in world.describe().items() if k != "world"},
            "n_modules": len(factors.modules),
            "full_floats": sum(factors.eigenvalues(m).numel() for m in factors.modules),
        },
        "agreement": agreement(world, model, factors, dimensions),
        "latency": latency(world, model, factors, sizes, args.repeats),
        "repeats": args.repeats,
        "machine": machine_info(THREADS, peers=()),
    }
    table = markdown(report)
    write_report(
        "index",
        "Gradient index: agreement and latency",
        report,
        table,
        results_folder(args.results, args.quick),
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
median of ``repeats`` runs (each run's time kept in the JSON): without the index,
``pairwise_scores`` (the query's gradient, preconditioned, then a pass of per-example
gradients over the N examples); with it, ``index_scores`` (the query's gradient through
the index's map, then one product with the stored [N, D] matrix). The index's one-off
build time is reported beside it; indexes are built for real up to ``BUILT_SIZES``.

Large N (``LARGE_SIZES``, 100 000): the pass without the index is not run; its time is
extrapolated by a least-squares line t = a + b·N through the measured sizes (labelled as
such). Nor is the index built by a real pass (100 s on two quiet cores here, several
times that when they are shared): since the N examples
are the training set repeated, row i of the N-example index is row i mod n of the index
of one copy, so the d = 256 (eigen) index of one copy is built for real and its rows are
**tiled, not recomputed**, into an index folder of the format a real build writes (same
basis, arguments, fingerprints and parts; :func:`write_tiled`), once per ``STORAGE``
precision. That folder is loaded with :meth:`Index.load` and read into memory (the load
time reported apart), then each query is timed as above. The tiling is checked at
``TILING_CHECK`` examples (not a multiple of the 180 records): the scores of every query
from the tiled index against a real build's.

    python -m benchmarks.index              # ~1 min on 2 quiet cores (more when shared)
    python -m benchmarks.index --quick      # fewer dimensions and sizes, to cache/quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, results_folder, write_report

THREADS = 2
DIMENSIONS = (16, 64, 256, 1024, 4096, None)
QUICK_DIMENSIONS = (64, 1024, None)
METHODS = ("eigen", "projection")
SIZES = (1_000, 4_000, 10_000)  # the pass without an index takes ~40 s at 4000 here
QUICK_SIZES = (300, 500)
BUILT_SIZES = 4_000  # indexes built for real up to this N (10 000: ~3 min per build here)
LARGE_SIZES = (100_000,)  # tiled index (see the module docstring); without: extrapolated
QUICK_LARGE_SIZES = (2_000,)
LARGE_DIMENSION = 256  # eigen, the index timed at large N
STORAGE = ("float32", "float16")
TILING_CHECK = 1_000  # examples of the tiled-vs-built check (5 copies and 100 records)
QUICK_TILING_CHECK = 250
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

        times = run_times(exact, repeats)
        row = {
            "n_train": n,
            "without_index_seconds": statistics.median(times),
            "without_index_runs": times,
        }
        for dimension in LATENCY_DIMENSIONS if n <= BUILT_SIZES else ():
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
    return statistics.median(run_times(function, repeats))


def run_times(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def repeated(train: list, n: int) -> list:
    """The training set repeated to ``n`` examples: example i is ``train[i % len(train)]``."""
    return [train[i % len(train)] for i in range(n)]


def write_tiled(index, train, n: int, model, factors, folder: Path):
    """An index folder of ``repeated(train, n)`` whose rows are ``index``'s (built on one
    copy of ``train``) tiled, not recomputed: row i is row i mod len(train). Written as
    :func:`attribution.index.build_index` writes one (arguments, fingerprints, basis,
    the same parts), so :meth:`Index.load` reads it as any other."""
    from attribution.curvature import partition_bounds
    from attribution.distributed import work_record
    from attribution.store import IndexStore

    store = IndexStore.open_for(
        folder, index.arguments, model, factors, repeated(train, n), index.dimensions
    )
    store.save("basis", {f"{m}/{k}": t for m, b in index.bases.items() for k, t in b.items()})
    one_copy = index.vectors()  # [len(train), floats], as stored
    for a, b in partition_bounds(n, index.arguments.partitions):
        rows = one_copy[torch.arange(a, b) % len(train)]  # [b - a, floats]
        store.save(f"vectors.part-{a}-{b}", {"vectors": rows}, work_record([b - a]))


def tiling_check(world, model, factors, n: int) -> dict[str, Any]:
    """Every query's scores from a tiled index of ``n`` examples against a real build's:
    max |difference| / max |score|, and the share of stored rows that are bit-identical."""
    from attribution.index import Index, IndexArguments, build_index, index_scores

    arguments = IndexArguments(dimension=LARGE_DIMENSION, batch_size=64)
    train = repeated(world.train, n)
    built = build_index(model, world.task, train, factors, arguments, progress=False)
    one_copy = build_index(model, world.task, world.train, factors, arguments, progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "index"
        write_tiled(one_copy, world.train, n, model, factors, folder)
        tiled = Index.load(folder, model).in_memory()
        a, b = tiled.vectors(), built.vectors()
        found = index_scores(model, world.task, world.queries, tiled, progress=False)
    expected = index_scores(model, world.task, world.queries, built, progress=False)
    return {
        "n_train": n,
        "dimension": LARGE_DIMENSION,
        "scores_max_difference_over_max_score": (
            (found - expected).abs().max() / expected.abs().max()
        ).item(),
        "vectors_max_difference_over_max": ((a - b).abs().max() / b.abs().max()).item(),
        "identical_rows": (a == b).all(dim=1).double().mean().item(),
    }


def large_latency(world, model, factors, sizes, repeats) -> list[dict[str, Any]]:
    """Latency with a tiled d = 256 index (see the module docstring), per storage."""
    from attribution.index import Index, IndexArguments, build_index, index_scores, query_vectors

    query = world.queries[:1]
    rows = []
    for n in sizes:
        for storage in STORAGE:
            arguments = IndexArguments(dimension=LARGE_DIMENSION, batch_size=64, storage=storage)
            started = time.perf_counter()
            one_copy = build_index(
                model, world.task, world.train, factors, arguments, progress=False
            )
            build = time.perf_counter() - started
            scratch = Path(tempfile.mkdtemp(prefix="index-tiled-"))
            try:
                started = time.perf_counter()
                write_tiled(one_copy, world.train, n, model, factors, scratch / "index")
                tile = time.perf_counter() - started
                size = sum(p.stat().st_size for p in (scratch / "index").iterdir())
                started = time.perf_counter()
                index = Index.load(scratch / "index", model).in_memory()
                load = time.perf_counter() - started
            finally:
                shutil.rmtree(scratch)
            times = run_times(
                lambda index=index: index_scores(model, world.task, query, index, progress=False),
                repeats,
            )
            gradient = run_times(
                lambda index=index: query_vectors(model, world.task, query, index, progress=False),
                repeats,
            )
            rows.append(
                {
                    "n_train": n,
                    "dimension": LARGE_DIMENSION,
                    "method": "eigen",
                    "storage": storage,
                    "tiled_from": len(world.train),
                    "floats_per_example": index.floats_per_example,
                    "megabytes_on_disk": size / 1e6,
                    "one_copy_build_seconds": build,
                    "tile_and_write_seconds": tile,
                    "load_seconds": load,
                    "query_seconds": statistics.median(times),
                    "query_seconds_runs": times,
                    "query_gradient_seconds": statistics.median(gradient),
                }
            )
            del index
            print(f"  N={n} {storage}: {rows[-1]}", file=sys.stderr)
    return rows


def linear_fit(rows: list[dict[str, Any]], sizes) -> dict[str, Any]:
    """Least squares t = a + b·N through the measured times without the index, and its
    value at each of ``sizes`` (extrapolated, not measured)."""
    n = torch.tensor([float(r["n_train"]) for r in rows], dtype=torch.float64)
    t = torch.tensor([r["without_index_seconds"] for r in rows], dtype=torch.float64)
    design = torch.stack([torch.ones_like(n), n], dim=1)  # [sizes, 2]
    a, b = torch.linalg.lstsq(design, t[:, None]).solution[:, 0].tolist()
    return {
        "fitted_on": [int(x) for x in n.tolist()],
        "intercept_seconds": a,
        "seconds_per_example": b,
        "extrapolated_seconds": {str(size): a + b * size for size in sizes},
    }


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
        "One query against N training examples (the training set repeated), seconds, median "
        f"of {report['repeats']} runs; the index's one-off build time beside it (indexes "
        f"built for real up to N = {BUILT_SIZES}):",
        "",
        "| N | without index | index, full (exact) | build | index, eigen d=256 | build | "
        "index size (full / d=256) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["latency"]:
        lines.append(latency_line(row, setting_["full_floats"]))
    lines += large_lines(report)
    m = report["machine"]
    end = f", {_load(m['load_average_at_end'])} at the end" if "load_average_at_end" in m else ""
    lines += [
        "",
        f"{m['threads']} threads on {m['cpu_count']} CPUs (shared with other work: timings "
        f"are indicative; load average {_load(m['load_average_at_start'])} at the start"
        f"{end}); torch {m['torch']}, excise {m['excise']}; {m['date']}",
        "",
    ]
    return "\n".join(lines)


def _load(averages) -> str:
    """The 1-minute load average (what competes with the two threads)."""
    return f"{averages[0]:.1f}"


def latency_line(row: dict[str, Any], full_floats: int) -> str:
    """One row of the latency table (``–`` where no index was built)."""
    full, small = row.get("index_full"), row.get("index_256")
    if small is None:
        return f"| {row['n_train']} | {row['without_index_seconds']:.3f} | – | – | – | – | – |"
    exact = (
        f"{full['query_seconds']:.4f} | {full['build_seconds']:.1f}"
        if full
        else "(not run: too large) | –"
    )
    full_mb = row["n_train"] * full_floats * 4 / 1e6
    return (
        f"| {row['n_train']} | {row['without_index_seconds']:.3f} | {exact} | "
        f"{small['query_seconds']:.4f} | {small['build_seconds']:.1f} | "
        f"{full_mb:.0f} MB / {small['megabytes']:.1f} MB |"
    )


def large_lines(report: dict[str, Any]) -> list[str]:
    """The large-N table, the extrapolation without the index and the tiling check."""
    fit, check = report["without_index_fit"], report["tiling_check"]
    rows = report["large"]
    lines = [
        "",
        f"Large N, eigen d = {LARGE_DIMENSION}: the index of the {rows[0]['tiled_from']} "
        "records built for real, its rows **tiled (not recomputed)** into an N-row index "
        "folder, loaded into memory, then one query timed as above (median of "
        f"{report['repeats']} runs; the query's gradient alone beside it). Without the index: "
        "**extrapolated, not measured**, t = a + b·N fitted to the medians at N = "
        f"{', '.join(map(str, fit['fitted_on']))} above (a = {fit['intercept_seconds']:.1f} s, "
        f"b = {fit['seconds_per_example'] * 1e3:.2f} ms per example):",
        "",
        "| N | without index (extrapolated) | storage | index on disk | load | query | "
        "of which the query's gradient | build of one copy | tiling + writing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        without = fit["extrapolated_seconds"][str(row["n_train"])]
        lines.append(
            f"| {row['n_train']} | ~{without:.0f} | {row['storage']} | "
            f"{row['megabytes_on_disk']:.0f} MB | {row['load_seconds']:.2f} | "
            f"{row['query_seconds']:.3f} | {row['query_gradient_seconds']:.3f} | "
            f"{row['one_copy_build_seconds']:.1f} | {row['tile_and_write_seconds']:.1f} |"
        )
    lines += [
        "",
        f"Tiling check at N = {check['n_train']} (d = {check['dimension']}, float32): every "
        "query's scores from the tiled index against a real build of the N examples differ "
        f"by at most {check['scores_max_difference_over_max_score']:.1e} of the largest "
        f"score; stored vectors by at most {check['vectors_max_difference_over_max']:.1e} of "
        f"the largest coordinate ({check['identical_rows']:.0%} of the rows bit-identical).",
    ]
    return lines


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

    machine = machine_info(THREADS, peers=())  # before any work: the load average at start
    world, model = setting()
    factors = fit_factors(
        model, world.task, world.train, FactorArguments(modules=world.modules), progress=False
    )
    dimensions = QUICK_DIMENSIONS if args.quick else DIMENSIONS
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.sizes:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    large = QUICK_LARGE_SIZES if args.quick else LARGE_SIZES
    check = QUICK_TILING_CHECK if args.quick else TILING_CHECK
    agreement_rows = agreement(world, model, factors, dimensions)
    latency_rows = latency(world, model, factors, sizes, args.repeats)
    report = {
        "setting": {
            **{k: v for k, v in world.describe().items() if k != "world"},
            "n_modules": len(factors.modules),
            "full_floats": sum(factors.eigenvalues(m).numel() for m in factors.modules),
        },
        "agreement": agreement_rows,
        "latency": latency_rows,
        "without_index_fit": linear_fit(latency_rows, large),
        "large": large_latency(world, model, factors, large, args.repeats),
        "tiling_check": tiling_check(world, model, factors, check),
        "repeats": args.repeats,
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
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

"""Factors + pairwise scores as one job at benchmark b: excise against kronfluence 1.0.1.

The job: fit EK-FAC factors on the N = 2048 training sequences of ``benchmarks.factors``'
setting b (a randomly initialised GPT-2, 4 layers × 128, vocabulary 512, 128 tokens per
sequence, the four projections of every block tracked), then score 16 query sequences
(the 16 drawn right after them) against every training sequence: pairwise [16, N],
∇f(q)ᵀ (G + λI)⁻¹ ∇ℓ(z) with the summed token NLL as loss and measurement. Empirical
Fisher, damping 0.1 × mean Λ per module (excise's default, kronfluence's
``damping_factor=None``), float32 sums, batch 32, two threads, on the CPU.

Each tool runs in its own child process (this module with ``--tool``), so its peak
resident memory is its own, after an untimed warm-up (a fit on 64 sequences and 4 × 64
scores). The timed span runs from the token ids to the score tensor in memory:
kronfluence's three factor stages, ``compute_pairwise_scores`` and
``load_pairwise_scores`` (it writes factors and scores to disk as it goes, so excise
writes its factors to a folder too). The ratio is kronfluence seconds / excise seconds
within one run of this script.

Variants (``--variants``):

- ``ekfac``: both tools, the same estimator. Their scores are compared (Pearson and
  Spearman over all [16, N] entries; the issue's bar is Pearson ≥ 0.99).
- ``ekfac-lambda-0.25``: a cheaper estimator, not the same one: Λ fitted on a quarter of
  the training set, a random quarter in excise (``FactorArguments.lambda_fraction``), the
  first quarter in kronfluence (``lambda_max_examples``, which takes the data's head).
  Its scores are compared with kronfluence's full ``ekfac`` scores like every row; its
  attribution quality (LDS) is measured in ``benchmarks.fidelity``.
- ``bf16`` (both tools): the forward and backward passes under bfloat16 autocast
  (kronfluence's ``amp_dtype``), the factor and score sums still float32.

    python -m benchmarks.pipeline --quick               # 128 training sequences
    python -m benchmarks.pipeline                       # all variants, ~8 min
    python -m benchmarks.pipeline --variants ekfac      # the same-estimator comparison
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import (
    BATCH_SIZE,
    CACHE,
    DEVICE,
    THREADS,
    Sequences,
    build_model,
    cpu_snapshot,
    cpu_use,
    excise_examples,
    fit_excise_factors,
    fit_kronfluence_factors,
    fresh,
    kronfluence_analyzer,
    machine_info,
    make_sequences,
    peak_rss_mb,
    quiet_kronfluence,
    quietest_run,
    results_folder,
    run_child,
    tracked_modules,
    versions_note,
    write_report,
)
from benchmarks.factors import SETTINGS
from benchmarks.scores import agreement

PIPELINE_CACHE = CACHE / "pipeline"
SETTING = SETTINGS["b"]
N_QUERIES = 16
FISHER = "empirical"
WARMUP_TRAIN, WARMUP_QUERIES = 64, 4
QUICK_TRAIN = 128
REFERENCE = ("ekfac", "kronfluence")  # what every run's scores are compared with
TARGET_SPEEDUP = 2.0  # kronfluence seconds / excise seconds, same estimator
TARGET_CORRELATION = 0.99
BOTH = ("excise", "kronfluence")
VARIANTS: dict[str, dict[str, Any]] = {  # tools; excise's and kronfluence's factor options
    "ekfac": {"tools": BOTH, "excise": {}, "kronfluence": {}, "amp": None},
    "ekfac-lambda-0.25": {
        "tools": BOTH,
        "excise": {"lambda_fraction": 0.25},
        "kronfluence": {"lambda_max_examples": SETTING.n_sequences // 4},  # its first quarter
        "amp": None,
    },
    "bf16": {
        "tools": BOTH,
        "excise": {"autocast": "bfloat16"},
        "kronfluence": {},
        "amp": torch.bfloat16,
    },
}


def split(n_train: int = SETTING.n_sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_train`` of setting b's training sequences and the 16 queries drawn
    after all of them."""
    ids = make_sequences(SETTING, n=SETTING.n_sequences + N_QUERIES)
    return ids[:n_train], ids[SETTING.n_sequences :]


# --- the two tools ---------------------------------------------------------------------


def excise_job(model, modules, train_ids, query_ids, folder: Path, variant: dict) -> tuple:
    """excise's ``fit_factors`` then ``pairwise_scores``: seconds per stage, scores."""
    from attribution import LanguageModelingTask, pairwise_scores
    from attribution.influence import ScoreArguments

    options = variant["excise"]
    stages, factors = fit_excise_factors(
        model, train_ids, modules, "ekfac", FISHER, folder, **options
    )
    arguments = ScoreArguments(
        batch_size=BATCH_SIZE, dtype="float32", autocast=options.get("autocast", "none")
    )
    started = time.perf_counter()
    scores = pairwise_scores(
        model,
        LanguageModelingTask(pad_id=0),
        excise_examples(query_ids),
        excise_examples(train_ids),
        factors,
        arguments,
        progress=False,
    ).total
    stages["scores"] = time.perf_counter() - started
    return stages, scores


def kronfluence_job(model, modules, train_ids, query_ids, folder: Path, variant: dict) -> tuple:
    """kronfluence's three factor stages then its pairwise scores, loaded back."""
    from kronfluence.arguments import ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    analyzer = kronfluence_analyzer(model, train_ids[:2], modules, fresh(folder))
    stages = fit_kronfluence_factors(
        analyzer, train_ids, "ekfac", FISHER, "ekfac", variant["amp"], **variant["kronfluence"]
    )
    stages.pop("total")
    arguments = ScoreArguments(
        damping_factor=None,  # 0.1 × mean(Λ) per module; the default is 1e-8
        amp_dtype=variant["amp"],
        query_gradient_low_rank=None,
        per_sample_gradient_dtype=torch.float32,
        precondition_dtype=torch.float32,
        score_dtype=torch.float32,
    )
    started = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="ekfac",
        query_dataset=Sequences(query_ids),
        train_dataset=Sequences(train_ids),
        per_device_query_batch_size=BATCH_SIZE,
        per_device_train_batch_size=BATCH_SIZE,
        score_args=arguments,
        dataloader_kwargs=DataLoaderKwargs(num_workers=0),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
    stages["scores"] = time.perf_counter() - started
    return stages, scores


JOBS = {"excise": excise_job, "kronfluence": kronfluence_job}


# --- one tool in its own process -------------------------------------------------------


def run_tool(tool: str, variant_name: str, out: Path, threads: int, n_train: int) -> None:
    """Warm up, run the timed job, write ``result.json`` and ``scores.safetensors``."""
    torch.set_num_threads(threads)
    quiet_kronfluence()
    model, modules = build_model(SETTING).to(DEVICE), tracked_modules(SETTING)  # cpu unless
    train_ids, query_ids = split(n_train)  # EXCISE_BENCH_DEVICE says otherwise
    variant, job = VARIANTS[variant_name], JOBS[tool]
    job(model, modules, train_ids[:WARMUP_TRAIN], query_ids[:WARMUP_QUERIES], out / "warm", variant)
    before = cpu_snapshot()
    started = time.perf_counter()
    stages, scores = job(model, modules, train_ids, query_ids, fresh(out / "run"), variant)
    seconds = {**stages, "total": time.perf_counter() - started}
    cpu = cpu_use(before, cpu_snapshot())
    save_file({"scores": scores.float().cpu().contiguous()}, out / "scores.safetensors")
    result = {
        "tool": tool,
        "variant": variant_name,
        "version": metadata.version(tool),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "device": DEVICE,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE != "cpu" else None,
        "cpu": cpu,
        "load_average": os.getloadavg(),
        "shape": list(scores.shape),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


def tool_run(
    tool: str, variant: str, threads: int, n_train: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """One tool and variant in a fresh interpreter: its result and its scores."""
    out = fresh(PIPELINE_CACHE / variant / tool)
    arguments = ["--tool", tool, "--variant", variant, "--threads", str(threads)]
    arguments += ["--n-train", str(n_train)]
    result = run_child("benchmarks.pipeline", out, arguments)
    return result, load_file(out / "scores.safetensors")["scores"]


# --- the benchmark and its report ------------------------------------------------------


def benchmark(variants: list[str], threads: int, n_train: int) -> dict[str, Any]:
    """Every tool of every variant (the reference run first), then score agreement."""
    runs, scores = {}, {}
    order = [REFERENCE] + [(v, t) for v in variants for t in VARIANTS[v]["tools"]]
    for variant, tool in dict.fromkeys(order):
        print(f"[{variant}] {tool} ...", file=sys.stderr, flush=True)
        runs[f"{variant}/{tool}"], scores[(variant, tool)] = quietest_run(
            lambda v=variant, t=tool: tool_run(t, v, threads, n_train)
        )
    reference = scores[REFERENCE]
    for (variant, tool), values in scores.items():
        runs[f"{variant}/{tool}"]["agreement"] = agreement(values, reference)
    return {"runs": runs, "variants": variants, "n_train": n_train}


def markdown(report: dict[str, Any]) -> str:
    """One row per variant: each tool's stages, total, peak memory, and the agreement."""
    head = (
        "| variant | tool | covariance s | eigen s | lambda s | scores s | total s "
        "| kronfluence ekfac / this | peak MB | Pearson | Spearman | other cores |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    runs = report["runs"]
    reference_total = runs["/".join(REFERENCE)]["seconds"]["total"]
    rows = []
    for run in runs.values():
        s, agree = run["seconds"], run["agreement"]
        other = run["cpu"]["other_cores"]
        rows.append(
            f"| {run['variant']} | {run['tool']} | {s['covariance']:.1f} "
            f"| {s['eigendecomposition']:.2f} | {s['lambda']:.1f} | {s['scores']:.1f} "
            f"| {s['total']:.1f} | {reference_total / s['total']:.2f} "
            f"| {run['peak_rss_mb']:.0f} | {agree['pearson']:.6f} | {agree['spearman']:.6f} "
            f"| {'?' if other is None else f'{other:.2f}'} |"
        )
    same = {t: runs[f"ekfac/{t}"]["seconds"]["total"] for t in ("excise", "kronfluence")}
    speedup = same["kronfluence"] / same["excise"]
    correlation = runs["ekfac/excise"]["agreement"]["pearson"]
    met = "met" if speedup >= TARGET_SPEEDUP else "**not met**"
    s = SETTING
    note = (
        f"\nGPT-2 {s.n_layer} layers × {s.n_embd}, vocabulary {s.vocab_size}; "
        f"{report['n_train']} training sequences × {s.seq_len} tokens, {N_QUERIES} queries; "
        f"EK-FAC, Fisher {FISHER}, damping 0.1 × mean Λ; batch {BATCH_SIZE}; "
        f"{versions_note(report['machine'])}; one run per row (the quietest of up to "
        "3 if other processes were busy). Pearson/Spearman: the row's [16, N] scores "
        "against kronfluence's ekfac scores. Peak MB: the child's ru_maxrss, warm-up "
        "included.\n\n"
        f"Same estimator (ekfac): kronfluence/excise = {speedup:.2f}× "
        f"(target ≥ {TARGET_SPEEDUP:.0f}×: {met}); Pearson {correlation:.6f} "
        f"(target ≥ {TARGET_CORRELATION}).\n"
    )
    return head + "\n".join(rows) + "\n" + note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per tool")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_TRAIN} training sequences, to cache/quick"
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="folder (default: benchmarks/results; benchmarks/cache/quick with --quick)",
    )
    parser.add_argument("--n-train", type=int, help=argparse.SUPPRESS)  # child
    parser.add_argument("--tool", choices=tuple(JOBS), help=argparse.SUPPRESS)  # child
    parser.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)  # child
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # child
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in VARIANTS]
    if unknown or not args.names:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tool:
        run_tool(args.tool, args.variant, args.out, args.threads, args.n_train)
        return 0
    n_train = QUICK_TRAIN if args.quick else SETTING.n_sequences
    report = {
        "benchmark": "pipeline",
        "setting": SETTING.name,
        "quick": args.quick,
        "machine": machine_info(args.threads),
        **benchmark(args.names, args.threads, n_train),
    }
    table = markdown(report)
    folder = results_folder(args.results, args.quick)
    title = "Factors + pairwise scores at b: excise vs kronfluence"
    write_report("pipeline", title, report, table, folder)
    print(table)
    print(f"written to {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

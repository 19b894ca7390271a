"""Influence scores: excise against kronfluence 1.0.1, EK-FAC and identity, GPT-2, CPU.

Both tools score the same 16 query sequences against the same training sequences with
the same tiny randomly initialised GPT-2 (2 layers, width 64, 4 heads, vocabulary 512,
sequences of 32 tokens), tracked modules (the four projections of every block), Fisher
(empirical), loss and measurement (the summed token NLL of each sequence), damping
(0.1 × the mean eigenvalue Λ of each module: excise's default, kronfluence's with
``damping_factor=None``; none for ``identity``), float32, batch size 32 and two threads.
The data are uniformly random token sequences (seed 0): the training set is the first
512 or 2048 of them, the queries are the 16 after the first 2048, so both sizes share the
queries and the 512 set is the one ``benchmarks.factors`` fits in its setting a.

For each training-set size and strategy, each tool runs in its own child process (this
module with ``--tool``), so its peak resident memory is its own. The child warms up
(an untimed fit on 64 sequences and each measurement on 4 queries × 64 sequences), fits
the factors on the training set (timed, reported on its own row), then times, ``repeats``
times in turn, and reports the median of:

- ``pairwise``: scores [16, n_train], each the query measurement's gradient times the
  damped inverse curvature times the training example's loss gradient;
- ``per_token``: the same, split over the training example's tokens, [16, n_train, 32]
  (token t is input position t of the tracked modules; in both tools the per-token
  scores sum to the pairwise scores);
- ``self``: self-influence ∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z) of every training example, [n_train].

Each tool is timed through its public API from the data to the score tensor: excise's
``pairwise_scores`` / ``self_scores`` with the factors it fitted in memory; kronfluence's
``compute_pairwise_scores`` / ``compute_self_scores`` (which load the factors from its
output folder and write the scores there) followed by ``load_pairwise_scores`` /
``load_self_scores``. kronfluence uses no query batching (``query_gradient_low_rank``
None) and all 16 queries in one batch, as excise does.

Sign and scale (read from both tools' code, checked by the scale column): both score
∇f(q)ᵀ (G + λI)⁻¹ ∇ℓ(z) with f the query's summed NLL, so positive means that training on
z lowers the query's loss, and no alignment is needed. The two tools' EK-FAC Λ agree (see
``benchmarks.factors``), so the scores agree up to rounding.

    python -m benchmarks.scores --quick     # 512 training sequences only
    python -m benchmarks.scores             # 512 and 2048
    python -m benchmarks.scores --sizes 2048 --strategies ekfac --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.common import (
    BATCH_SIZE,
    CACHE,
    THREADS,
    TOOLS,
    Sequences,
    Setting,
    build_model,
    cpu_snapshot,
    cpu_use,
    current_rss_mb,
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

SCORE_CACHE = CACHE / "scores"
MODEL = Setting("tiny", n_layer=2, n_embd=64, n_head=4, n_positions=64, n_sequences=0, seq_len=32)
N_QUERIES = 16
MAX_TRAIN = 2048  # the queries are the sequences right after the largest training set
TRAIN_SIZES = (512, 2048)
STRATEGIES = ("ekfac", "identity")
MEASUREMENTS = ("pairwise", "per_token", "self")
FISHER = "empirical"
REPEATS = 3
WARMUP_TRAIN, WARMUP_QUERIES = 64, 4
TARGET_CORRELATION = {"ekfac": 0.99, "identity": 0.999}  # with kronfluence, pairwise
TARGET_PAIRWISE_SPEEDUP = 2.0  # kronfluence seconds / excise seconds
TARGET_PER_TOKEN_COST = 1.5  # excise per-token seconds / excise pairwise seconds


# --- data ------------------------------------------------------------------------------


def split(n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training sequences (the first ``n_train``) and the 16 query sequences."""
    if not 1 <= n_train <= MAX_TRAIN:
        raise ValueError(f"the training set has 1 to {MAX_TRAIN} sequences, not {n_train}")
    ids = make_sequences(MODEL, n=MAX_TRAIN + N_QUERIES)
    return ids[:n_train], ids[MAX_TRAIN:]


# --- the two tools ---------------------------------------------------------------------


class ExciseScorer:
    """excise's ``fit_factors``, ``pairwise_scores`` and ``self_scores``."""

    def __init__(self, model: nn.Module, modules: list[str], strategy: str, folder: Path):
        from attribution import LanguageModelingTask

        self.model, self.modules, self.strategy, self.folder = model, modules, strategy, folder
        self.task = LanguageModelingTask(pad_id=0)
        self.factors = None

    def prepare(self, ids: torch.Tensor) -> list[dict[str, list[int]]]:
        return excise_examples(ids)

    def fit(self, ids: torch.Tensor, name: str) -> dict[str, float]:
        seconds, self.factors = fit_excise_factors(
            self.model, ids, self.modules, self.strategy, FISHER, fresh(self.folder / name)
        )
        return seconds

    def _arguments(self, per_token: bool = False):
        from attribution.influence import ScoreArguments

        return ScoreArguments(batch_size=BATCH_SIZE, per_token=per_token, dtype="float32")

    def pairwise(self, queries, train) -> torch.Tensor:
        from attribution.influence import pairwise_scores

        args = self._arguments()
        return pairwise_scores(self.model, self.task, queries, train, self.factors, args).total

    def per_token(self, queries, train) -> torch.Tensor:
        from attribution.influence import pairwise_scores

        args = self._arguments(per_token=True)
        scores = pairwise_scores(self.model, self.task, queries, train, self.factors, args)
        return scores.per_token

    def self_influence(self, train) -> torch.Tensor:
        from attribution.influence import self_scores

        return self_scores(self.model, self.task, train, self.factors, self._arguments())


class KronfluenceScorer:
    """kronfluence's ``Analyzer``: factor stages, pairwise and self scores, loaded back."""

    def __init__(self, model: nn.Module, modules: list[str], strategy: str, folder: Path):
        sample = split(2)[0]
        self.analyzer = kronfluence_analyzer(model, sample, modules, fresh(folder))
        self.strategy = strategy
        self.factors_name = None

    def prepare(self, ids: torch.Tensor) -> Sequences:
        return Sequences(ids)

    def fit(self, ids: torch.Tensor, name: str) -> dict[str, float]:
        self.factors_name = name
        return fit_kronfluence_factors(self.analyzer, ids, self.strategy, FISHER, name)

    def _common(self, per_token: bool = False) -> dict[str, Any]:
        from kronfluence.arguments import ScoreArguments
        from kronfluence.utils.dataset import DataLoaderKwargs

        arguments = ScoreArguments(
            damping_factor=None,  # 0.1 × mean(Λ) per module; the default is 1e-8
            amp_dtype=None,
            compute_per_token_scores=per_token,
            query_gradient_low_rank=None,  # no query batching
            per_sample_gradient_dtype=torch.float32,
            precondition_dtype=torch.float32,
            score_dtype=torch.float32,
        )
        return {
            "factors_name": self.factors_name,
            "score_args": arguments,
            "per_device_train_batch_size": BATCH_SIZE,
            "dataloader_kwargs": DataLoaderKwargs(num_workers=0),
            "overwrite_output_dir": True,
        }

    def _pairwise(self, name: str, queries, train, per_token: bool) -> torch.Tensor:
        self.analyzer.compute_pairwise_scores(
            scores_name=name,
            query_dataset=queries,
            train_dataset=train,
            per_device_query_batch_size=BATCH_SIZE,
            **self._common(per_token),
        )
        return self.analyzer.load_pairwise_scores(name)["all_modules"]

    def pairwise(self, queries, train) -> torch.Tensor:
        return self._pairwise("pairwise", queries, train, per_token=False)

    def per_token(self, queries, train) -> torch.Tensor:
        return self._pairwise("per_token", queries, train, per_token=True)

    def self_influence(self, train) -> torch.Tensor:
        self.analyzer.compute_self_scores(scores_name="self", train_dataset=train, **self._common())
        return self.analyzer.load_self_scores("self")["all_modules"]


SCORERS = {"excise": ExciseScorer, "kronfluence": KronfluenceScorer}


# --- one tool in its own process -------------------------------------------------------


def run_tool(tool: str, n_train: int, strategy: str, repeats: int, out: Path, threads: int):
    """Warm up, fit, time each measurement; write ``result.json`` and
    ``scores.safetensors`` (the last repeat's scores) to ``out``."""
    torch.set_num_threads(threads)
    quiet_kronfluence()
    model, modules = build_model(MODEL), tracked_modules(MODEL)
    train_ids, query_ids = split(n_train)
    baseline_mb = current_rss_mb()
    scorer = SCORERS[tool](model, modules, strategy, out / tool)
    train, queries = scorer.prepare(train_ids), scorer.prepare(query_ids)

    warm_train = scorer.prepare(train_ids[:WARMUP_TRAIN])
    warm_queries = scorer.prepare(query_ids[:WARMUP_QUERIES])
    scorer.fit(train_ids[:WARMUP_TRAIN], "warmup")
    scorer.pairwise(warm_queries, warm_train)
    scorer.per_token(warm_queries, warm_train)
    scorer.self_influence(warm_train)

    before = cpu_snapshot()
    fit_seconds = scorer.fit(train_ids, strategy)
    peak_after_fit = peak_rss_mb()  # the warm-up's peak included
    jobs = {
        "pairwise": lambda: scorer.pairwise(queries, train),
        "per_token": lambda: scorer.per_token(queries, train),
        "self": lambda: scorer.self_influence(train),
    }
    samples: dict[str, list[float]] = {name: [] for name in MEASUREMENTS}
    scores: dict[str, torch.Tensor] = {}
    peaks = {"fit": peak_after_fit}  # ru_maxrss after each stage's first run
    for _ in range(repeats):
        for name in MEASUREMENTS:
            started = time.perf_counter()
            scores[name] = jobs[name]()
            samples[name].append(time.perf_counter() - started)
            peaks.setdefault(name, peak_rss_mb())
    cpu = cpu_use(before, cpu_snapshot())
    save_file({k: v.float().contiguous() for k, v in scores.items()}, out / "scores.safetensors")
    result = {
        "tool": tool,
        "version": metadata.version(tool),
        "n_train": n_train,
        "strategy": strategy,
        "seconds": {
            "fit": fit_seconds,
            **{name: statistics.median(values) for name, values in samples.items()},
        },
        "samples": samples,
        "shapes": {name: list(value.shape) for name, value in scores.items()},
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_after_mb": peaks,
        "baseline_rss_mb": baseline_mb,
        "cpu": cpu,
        "load_average": os.getloadavg(),
        "modules": modules,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


def tool_run(
    tool: str, n_train: int, strategy: str, repeats: int, threads: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One tool in a fresh interpreter: its result and its scores."""
    out = fresh(SCORE_CACHE / f"{n_train}-{strategy}" / tool)
    arguments = ["--tool", tool, "--n-train", str(n_train), "--strategy", strategy]
    arguments += ["--repeats", str(repeats), "--threads", str(threads)]
    result = run_child("benchmarks.scores", out, arguments)
    return result, load_file(out / "scores.safetensors")


# --- agreement -------------------------------------------------------------------------


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


def ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks of the flattened entries (ties, absent for continuous scores, are
    broken by position)."""
    x = x.double().flatten()
    result = torch.empty_like(x)
    result[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    return result


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(ranks(x), ranks(y))


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, Any]:
    """Pearson and Spearman correlation of the flattened scores, the least-squares
    scale ours ≈ s·theirs (1 when the conventions agree) and the relative error after it."""
    if ours.shape != theirs.shape:
        raise ValueError(f"score shapes differ: {list(ours.shape)} vs {list(theirs.shape)}")
    x, y = ours.double().flatten(), theirs.double().flatten()
    scale = (x @ y) / (y @ y)
    return {
        "pearson": pearson(x, y),
        "spearman": spearman(x, y),
        "scale": scale.item(),
        "relative_error": ((x - scale * y).norm() / x.norm()).item(),
        "shape": list(ours.shape),
    }


def token_sum_check(per_token: torch.Tensor, pairwise: torch.Tensor) -> dict[str, float]:
    """How far Σₜ per-token scores are from the pairwise scores (one tool's own)."""
    gap = (per_token.double().sum(-1) - pairwise.double()).abs().max().item()
    return {"max_abs_diff": gap, "relative": gap / pairwise.double().abs().max().item()}


# --- the benchmark and its report ------------------------------------------------------


def benchmark(n_train: int, strategy: str, repeats: int, threads: int) -> dict[str, Any]:
    """Both tools on one training-set size and strategy, then the agreement."""
    runs, scores = {}, {}
    for tool in TOOLS:
        print(f"[{n_train} train, {strategy}] {tool} ...", file=sys.stderr, flush=True)
        runs[tool], scores[tool] = quietest_run(
            lambda tool=tool: tool_run(tool, n_train, strategy, repeats, threads)
        )
    ours, theirs = scores["excise"], scores["kronfluence"]
    return {
        "n_train": n_train,
        "n_queries": N_QUERIES,
        "strategy": strategy,
        "runs": runs,
        "agreement": {name: agreement(ours[name], theirs[name]) for name in MEASUREMENTS},
        "token_sums": {
            tool: token_sum_check(scores[tool]["per_token"], scores[tool]["pairwise"])
            for tool in TOOLS
        },
    }


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, checked on every size and strategy."""
    checks = []
    for entry in results:
        where = f"{entry['n_train']} train, {entry['strategy']}"
        pair = entry["agreement"]["pairwise"]
        need = TARGET_CORRELATION[entry["strategy"]]
        low = min(pair["pearson"], pair["spearman"])
        checks.append(
            {
                "target": f"pairwise correlation with kronfluence ≥ {need} ({where})",
                "value": f"Pearson {pair['pearson']:.6f}, Spearman {pair['spearman']:.6f}",
                "met": low >= need,
            }
        )
        ours = entry["runs"]["excise"]["seconds"]
        theirs = entry["runs"]["kronfluence"]["seconds"]
        speedup = theirs["pairwise"] / ours["pairwise"]
        checks.append(
            {
                "target": f"excise ≥ {TARGET_PAIRWISE_SPEEDUP:g}× faster, pairwise ({where})",
                "value": f"{speedup:.2f}×",
                "met": speedup >= TARGET_PAIRWISE_SPEEDUP,
            }
        )
        cost = ours["per_token"] / ours["pairwise"]
        checks.append(
            {
                "target": f"excise per-token ≤ {TARGET_PER_TOKEN_COST:g}× its pairwise ({where})",
                "value": f"{cost:.2f}×",
                "met": cost <= TARGET_PER_TOKEN_COST,
            }
        )
    return checks


ROW_LABELS = {
    "fit": "fit factors",
    "pairwise": "pairwise [16, n]",
    "per_token": "per-token [16, n, 32]",
    "self": "self [n]",
}


def _notes(entry: dict[str, Any], row: str) -> str:
    runs = entry["runs"]
    if row == "fit":
        others = " / ".join(
            "?" if runs[t]["cpu"]["other_cores"] is None else f"{runs[t]['cpu']['other_cores']:.2f}"
            for t in TOOLS
        )
        return f"other processes during the child's timed span: {others} cores"
    agree = entry["agreement"][row]
    text = f"scale {agree['scale']:.6f}, err {agree['relative_error']:.1e}"
    if row == "per_token":
        sums = entry["token_sums"]
        cost = runs["excise"]["seconds"]["per_token"] / runs["excise"]["seconds"]["pairwise"]
        text += (
            f"; excise per-token/pairwise time {cost:.2f}×; max |Σₜ per-token − pairwise| "
            f"excise {sums['excise']['max_abs_diff']:.1e} "
            f"(rel {sums['excise']['relative']:.1e}), "
            f"kronfluence {sums['kronfluence']['max_abs_diff']:.1e}"
        )
    return text


def markdown(report: dict[str, Any]) -> str:
    """The timing, memory, agreement and targets tables."""
    head = (
        "| train | strategy | measurement | excise s | kronfluence s | kronfluence/excise "
        "| excise peak MB | kronfluence peak MB | Pearson | Spearman | notes |\n"
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for entry in report["results"]:
        runs = entry["runs"]
        for row in ("fit", *MEASUREMENTS):
            ours, theirs = runs["excise"]["seconds"][row], runs["kronfluence"]["seconds"][row]
            if row == "fit":
                ours, theirs = ours["total"], theirs["total"]
                corr = ("", "")
            else:
                agree = entry["agreement"][row]
                corr = (f"{agree['pearson']:.6f}", f"{agree['spearman']:.6f}")
            ratio = f"{theirs / ours:.2f}" if ours > 0 else "–"
            peaks = tuple(f"{runs[t]['peak_rss_after_mb'][row]:.0f}" for t in TOOLS)
            rows.append(
                f"| {entry['n_train']} | {entry['strategy']} | {ROW_LABELS[row]} "
                f"| {ours:.3f} | {theirs:.3f} | {ratio} | {peaks[0]} | {peaks[1]} "
                f"| {corr[0]} | {corr[1]} | {_notes(entry, row)} |"
            )
    checks = "\n".join(
        f"| {c['target']} | {c['value']} | {'met' if c['met'] else '**not met**'} |"
        for c in report["targets"]
    )
    note = (
        f"\n{N_QUERIES} queries × n training sequences of {MODEL.seq_len} tokens; GPT-2 "
        f"{MODEL.n_layer} layers × {MODEL.n_embd}, vocabulary {MODEL.vocab_size}; Fisher: "
        f"{FISHER}; damping 0.1 × mean Λ per module; batch {BATCH_SIZE}; float32; "
        f"median of {report['repeats']} runs per measurement (fit: one run, not part of the "
        f"score timings); {versions_note(report['machine'])}. Peak MB: the child "
        "process's peak resident memory (ru_maxrss) after the row's first run, so it "
        "includes the rows above it (and the untimed warm-up). Scale: least-squares s in "
        "excise ≈ s·kronfluence; err: relative error after it.\n"
    )
    targets_table = "\n\n| target | value | |\n|---|---|---|\n" + checks + "\n"
    return head + "\n".join(rows) + "\n" + note + targets_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 training sequences only")
    parser.add_argument(
        "--sizes", default=",".join(map(str, TRAIN_SIZES)), help="training-set sizes"
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="ekfac, identity")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads per tool")
    parser.add_argument(
        "--results",
        type=Path,
        help="folder for scores.json/.md (default: benchmarks/results; "
        "benchmarks/cache/quick with --quick)",
    )
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--n-train", type=int, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)  # child
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    sizes = "512" if args.quick else args.sizes
    try:
        args.size_list = [int(n) for n in sizes.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--sizes: integers, got {sizes!r}")
    if not args.size_list or not all(1 <= n <= MAX_TRAIN for n in args.size_list):
        parser.error(f"--sizes: between 1 and {MAX_TRAIN}")
    args.strategy_list = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not args.strategy_list or any(s not in STRATEGIES for s in args.strategy_list):
        parser.error(f"--strategies: choose from {', '.join(STRATEGIES)}")
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tool:
        run_tool(args.tool, args.n_train, args.strategy, args.repeats, args.out, args.threads)
        return 0
    started = time.perf_counter()
    machine = machine_info(args.threads)
    results = [
        benchmark(n, strategy, args.repeats, args.threads)
        for n in args.size_list
        for strategy in args.strategy_list
    ]
    report = {
        "benchmark": "scores",
        "quick": args.quick,
        "fisher": FISHER,
        "batch_size": BATCH_SIZE,
        "n_queries": N_QUERIES,
        "repeats": args.repeats,
        "model": {
            "n_layer": MODEL.n_layer,
            "n_embd": MODEL.n_embd,
            "n_head": MODEL.n_head,
            "vocab_size": MODEL.vocab_size,
            "seq_len": MODEL.seq_len,
        },
        "machine": machine,
        "results": results,
        "targets": targets(results),
        "wall_seconds": time.perf_counter() - started,
    }
    table = markdown(report)
    folder = results_folder(args.results, args.quick)
    title = "Influence scores: excise vs kronfluence"
    write_report("scores", title, report, table, folder)
    print(table)
    print(f"written to {folder} in {report['wall_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
